"""Emulated wide-area links: one network namespace per peer, joined by a bridge, egress limited with tbf.

    sudo .venv/bin/python -m benchmarks.wan --peers 2 --rate-mbit 50 --megabytes 30 --json wan.json

Owns the emulated network the other benchmarks run in, and its self-test (the command above): it sends a
stream of bytes between namespaces and compares the rate seen on the interface counters with the tbf rate.

Layout for a run by process PID with N peers: namespaces ``swbench-PID-0..N-1``; in namespace i the interface
``swbPIDpi`` with address 10.77.0.(i+2)/24, its veth twin ``swbPIDhi`` on the bridge ``swbPIDbr`` in the host
namespace. The bridge has no address: traffic stays between the namespaces made here. Each peer's egress is
limited by a tbf qdisc on its interface (netem, hence latency, is not available in these kernels).

Names carry the creating process's pid, so a later run removes what a crashed run left behind (and only that:
runs of live processes are left alone). Needs root; without it ``require_root`` raises ``NotRoot``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

logger = logging.getLogger(__name__)

NETNS_PREFIX = "swbench-"
LINK_PREFIX = "swb"
SUBNET = "10.77.0"
ROOT = Path(__file__).resolve().parent.parent
EXIT_SKIPPED = 77  # the benchmarks' exit status when not root (documented in benchmarks/README.md)


class NotRoot(RuntimeError):
    """The emulation needs root (network namespaces, tc)."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRoot("the WAN emulation needs root (ip netns, tc); run as root or skip this benchmark")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_leftovers() -> list[str]:
    """Remove namespaces and links made by benchmark runs whose process is gone; return what was removed."""
    removed = []
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = re.fullmatch(rf"{NETNS_PREFIX}(\d+)-\d+", name)
        if match and not _alive(int(match.group(1))):
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        match = re.fullmatch(rf"{LINK_PREFIX}(\d+)(br|h\d+)", name)
        if match and not _alive(int(match.group(1))):
            _ip("link", "delete", name, check=False)
            removed.append(name)
    if removed:
        logger.warning("Removed leftovers of an earlier crashed run: %s", ", ".join(removed))
    return removed


def our_leftovers(pid: int | None = None) -> list[str]:
    """Namespaces and links of run ``pid`` (default: this process) still present."""
    pid = os.getpid() if pid is None else pid
    names = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]
    names += [line.split(":")[1].strip().split("@")[0] for line in _ip("-o", "link", "show").stdout.splitlines()]
    return [n for n in names if n.startswith(f"{NETNS_PREFIX}{pid}-") or re.fullmatch(rf"{LINK_PREFIX}{pid}(br|h\d+)", n)]


class Wan:
    """N namespaces on a bridge, each peer's egress limited to ``rate_mbit``. Use as a context manager."""

    def __init__(self, peers: int, *, rate_mbit: float):
        if not 1 <= peers <= 200:
            raise ValueError(f"peers must be 1..200, not {peers}")
        if not rate_mbit > 0:
            raise ValueError(f"rate_mbit must be positive, not {rate_mbit}")
        self.peers, self.rate_mbit, self.tag = peers, rate_mbit, os.getpid()
        self.bridge = f"{LINK_PREFIX}{self.tag}br"
        self.procs: list[subprocess.Popen] = []

    def namespace(self, i: int) -> str:
        return f"{NETNS_PREFIX}{self.tag}-{i}"

    def iface(self, i: int) -> str:
        return f"{LINK_PREFIX}{self.tag}p{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 2}"

    def __enter__(self) -> "Wan":
        require_root()
        cleanup_leftovers()
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for i in range(self.peers):
            ns, host_side = self.namespace(i), f"{LINK_PREFIX}{self.tag}h{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", host_side, "type", "veth", "peer", "name", self.iface(i), "netns", ns)
            _ip("link", "set", host_side, "master", self.bridge, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", self.iface(i))
            _ip("-n", ns, "link", "set", self.iface(i), "up")
            self._limit(ns, self.iface(i))
        logger.info("WAN up: %d namespaces on %s, egress %.0f Mbit/s each", self.peers, self.bridge, self.rate_mbit)

    def _limit(self, ns: str, iface: str) -> None:
        rate_bytes = self.rate_mbit * 1e6 / 8
        # burst >= one GSO super-packet (64 KiB) or tbf drops it; queue up to 100 ms at the link rate
        burst = max(2**17, int(rate_bytes * 0.004))
        limit = max(2**18, int(rate_bytes * 0.1))
        subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", iface, "root", "tbf", "rate", f"{self.rate_mbit}mbit",
                        "burst", str(burst), "limit", str(limit)], check=True, capture_output=True, text=True)

    def down(self) -> None:
        """Stop the processes started in the namespaces, then remove every namespace and link of this run.
        A second Ctrl-C or SIGTERM meanwhile is ignored: an interrupted cleanup would leave namespaces behind."""
        with _signals_ignored():
            self._down()

    def _down(self) -> None:
        self.stop_all()
        for i in range(self.peers):  # deleting the host end removes both ends at once (a namespace's go lazily)
            _ip("link", "delete", f"{LINK_PREFIX}{self.tag}h{i}", check=False)
            _ip("netns", "delete", self.namespace(i), check=False)
        _ip("link", "delete", self.bridge, check=False)
        left = our_leftovers(self.tag)
        if left:
            logger.error("Could not remove: %s", ", ".join(left))

    def counters(self, i: int) -> tuple[int, int]:
        """(tx_bytes, rx_bytes) of peer i's interface, read from sysfs inside its namespace."""
        stats = f"/sys/class/net/{self.iface(i)}/statistics"
        out = subprocess.run(["ip", "netns", "exec", self.namespace(i), "cat", f"{stats}/tx_bytes", f"{stats}/rx_bytes"],
                             check=True, capture_output=True, text=True).stdout.split()
        return int(out[0]), int(out[1])

    def popen(self, i: int, argv: Sequence[str], *, log: Path | None = None, cwd: Path = ROOT,
              **env: str) -> subprocess.Popen:
        """Start ``argv`` inside namespace i in a session of its own (so its helpers, p2pd included, stop with it)."""
        out = open(log, "w") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", self.namespace(i), *argv], cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
        finally:
            if log:
                out.close()
        self.procs.append(proc)
        return proc

    def stop_all(self, timeout: float = 8.0) -> None:
        """SIGTERM each started process's group (our children and theirs only), then SIGKILL what remains."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            for proc in self.procs:
                try:
                    os.killpg(proc.pid, sig)  # the group a session we started leads: p2pd and helpers too
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            for proc in self.procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if sig == signal.SIGTERM and all(_group_gone(p.pid) for p in self.procs):
                break
        self.procs = [p for p in self.procs if p.poll() is None]


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks (and ``Wan.down``) run on kill as on Ctrl-C."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


# --- self-test: stream bytes from peer 0 to peer 1 and compare the counters with the tbf rate ---

def _sink(port: int) -> int:
    with socket.create_server(("0.0.0.0", port)) as server:
        conn, _ = server.accept()
        with conn:
            while conn.recv(1 << 20):
                pass
    return 0


def _source(host: str, port: int, nbytes: int) -> int:
    chunk = b"\0" * (1 << 20)
    start = time.monotonic()
    for attempt in range(50):
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            time.sleep(0.1)
    else:
        return 1
    with conn:
        conn.settimeout(None)
        left = nbytes
        while left > 0:
            conn.sendall(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the sink closes once it has everything
    print(f"{time.monotonic() - start:.4f}")
    return 0


def link_test(wan: Wan, megabytes: float, port: int = 5201) -> dict:
    """Send ``megabytes`` MB from peer 0 to peer 1; the achieved rate from peer 0's tx counter."""
    sink = wan.popen(1, [sys.executable, "-m", "benchmarks.wan", "_sink", str(port)])
    time.sleep(0.5)
    tx0, _ = wan.counters(0)
    _, rx1 = wan.counters(1)
    log = Path(tempfile.gettempdir()) / f"{NETNS_PREFIX}{wan.tag}-source.log"
    source = wan.popen(0, [sys.executable, "-m", "benchmarks.wan", "_source", wan.address(1), str(port),
                           str(int(megabytes * 1e6))], log=log)
    try:
        if source.wait() != 0 or sink.wait(30) != 0:
            raise RuntimeError("link test: the byte stream between the namespaces failed")
        seconds = float(log.read_text().split()[-1])  # from connect to the sink's close, timed by the sender
    finally:
        log.unlink(missing_ok=True)
    tx = wan.counters(0)[0] - tx0
    rx = wan.counters(1)[1] - rx1
    return dict(rate_mbit=wan.rate_mbit, payload_bytes=int(megabytes * 1e6), tx_bytes=tx, rx_bytes=rx,
                seconds=round(seconds, 3), measured_mbit=round(tx * 8 / seconds / 1e6, 2),
                ratio_to_rate=round(tx * 8 / seconds / 1e6 / wan.rate_mbit, 3),
                overhead=round(tx / (megabytes * 1e6) - 1, 4))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=2, help="namespaces to create (>= 2; default 2)")
    parser.add_argument("--rate-mbit", type=float, action="append", help="egress limit, Mbit/s (repeatable; default 50)")
    parser.add_argument("--megabytes", type=float, default=30.0, help="bytes to stream per test, in MB (default 30)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--cleanup-only", action="store_true", help="remove leftovers of crashed runs and exit")
    args = parser.parse_args(argv)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: its directory does not exist")
    if args.peers < 2 or args.megabytes <= 0 or any(r <= 0 for r in args.rate_mbit or []):
        parser.error("--peers must be >= 2, --megabytes and --rate-mbit positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_sink"]:
        return _sink(int(argv[1]))
    if argv[:1] == ["_source"]:
        return _source(argv[1], int(argv[2]), int(argv[3]))
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        require_root()
    except NotRoot as error:
        print(f"skipped: {error}", file=sys.stderr)
        return EXIT_SKIPPED
    if args.cleanup_only:
        print(f"removed: {' '.join(cleanup_leftovers()) or 'nothing'}")
        return 0
    raise_on_sigterm()
    rows = []
    try:
        for rate in args.rate_mbit or [50.0]:
            with Wan(args.peers, rate_mbit=rate) as wan:
                rows.append(link_test(wan, args.megabytes))
                logger.info("link %.0f Mbit/s: %s", rate, rows[-1])
    except KeyboardInterrupt:
        logger.error("interrupted; namespaces and processes were removed")
        return 130
    print(f"{'rate Mbit/s':>12} {'measured':>9} {'ratio':>6} {'overhead':>9} {'seconds':>8}")
    for row in rows:
        print(f"{row['rate_mbit']:>12.0f} {row['measured_mbit']:>9.2f} {row['ratio_to_rate']:>6.3f} "
              f"{row['overhead']:>9.4f} {row['seconds']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
