"""Smoke tests of benchmarks/ at toy size: rows written, bytes counted, namespaces and processes gone afterwards.

Figures are never asserted (they belong in benchmarks/RESULTS.md). The emulated-network benchmarks need root and
are skipped without it. The training benchmark's swarm run takes minutes even at toy size, so only its
single-process baseline and argument checks run here; set SWARM_BENCH_FULL=1 to run its toy swarm too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the WAN emulation needs root (ip netns, tc)")


def bench(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


def leftovers(pid: int) -> list[str]:
    """Namespaces and links of the benchmark run by process ``pid`` that still exist."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return ([n for n in names if n.startswith(f"swbench-{pid}-")]
            + re.findall(rf"\bswb{pid}(?:br|h\d+|p\d+)\b", links))


def alive_in_groups(groups: list[int]) -> list[psutil.Process]:
    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in groups and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def run_tracked(module: str, *args: str, timeout: float = 120) -> tuple[int, str, int]:
    proc = subprocess.Popen([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, proc.pid


@needs_root
def test_wan_link_counts_bytes_and_cleans_up(tmp_path):
    rc, out, pid = run_tracked("wan", "--peers", "2", "--rate-mbit", "200", "--megabytes", "2",
                               "--json", str(tmp_path / "wan.json"))
    assert rc == 0, out[-2000:]
    [row] = json.loads((tmp_path / "wan.json").read_text())
    assert row["tx_bytes"] >= 2_000_000 and row["rx_bytes"] >= 2_000_000
    assert leftovers(pid) == []


@needs_root
def test_averaging_toy_round(tmp_path):
    rc, out, pid = run_tracked("averaging", "--toy", "--json", str(tmp_path / "avg.json"))
    assert rc == 0, out[-3000:]
    [row] = json.loads((tmp_path / "avg.json").read_text())
    assert row["group_size"] == 2 and row["codec"] == "blockwise8"
    assert row["ar_tx_bytes"] > 0 and row["ar_rx_bytes"] > 0 and row["relative_error"] < 0.05
    assert leftovers(pid) == []
    assert alive_in_groups(row["process_groups"]) == []  # peers and their p2pd daemons


@needs_root
def test_interrupted_run_cleans_up():
    """SIGTERM in the middle of a (slow) link test: namespaces, links and the processes in them are gone."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.wan", "--rate-mbit", "1", "--megabytes", "100"], cwd=ROOT,
                            text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    started: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 30
        while len(started) < 2 and time.monotonic() < deadline and proc.poll() is None:
            started.update((c.pid, c) for c in psutil.Process(proc.pid).children(recursive=True))
            time.sleep(0.1)
        assert len(started) >= 2 and leftovers(proc.pid), "the link test did not start"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert leftovers(proc.pid) == []
    _, alive = psutil.wait_procs(list(started.values()), timeout=5)
    assert alive == []


def test_codec_bench_toy(tmp_path):
    result = bench("codec_bench", "--toy", "--codec", "uniform8", "--codec", "none", "--json", str(tmp_path / "c.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "c.json").read_text())
    assert [r["codec"] for r in rows] == ["uniform8", "none"]  # blockwise8 (bitsandbytes: slow import) runs in averaging
    assert all(r["compress_mb_s"] > 0 and r["extract_mb_s"] > 0 and r["memcpy_mb_s"] > 0 for r in rows)


def test_training_baseline_toy(tmp_path):
    result = bench("training", "--no-swarm", "--baseline", "--steps", "1", "--eval-batches", "1", "--batch-size", "2",
                   "--set", "averaging.target_batch_size=2", "--set", "model.n_layer=1", "--set", "model.d_model=32",
                   "--json", str(tmp_path / "t.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    [row] = json.loads((tmp_path / "t.json").read_text())
    assert row["variant"] == "single-process" and row["steps_reached"] == 1 and row["eval_loss"] > 0


@needs_root
@pytest.mark.skipif(not os.environ.get("SWARM_BENCH_FULL"), reason="a toy swarm takes ~3 min; SWARM_BENCH_FULL=1 runs it")
def test_training_toy_swarm(tmp_path):
    rc, out, pid = run_tracked("training", "--toy", "--json", str(tmp_path / "t.json"), timeout=600)
    assert rc == 0, out[-3000:]
    [row] = json.loads((tmp_path / "t.json").read_text())
    assert row["steps_reached"] >= 2 and row["tx_bytes_per_trainer"] > 0 and row["rounds_averaged"] >= 1
    assert leftovers(pid) == []
    assert alive_in_groups(row["process_groups"]) == []


@pytest.mark.parametrize("module,args", [
    ("averaging", ["--peers", "1"]), ("averaging", ["--values", "lots"]), ("wan", ["--megabytes", "-1"]),
    ("codec_bench", ["--repeats", "0"]), ("training", ["--variant", "fp64"]), ("peer_cpu", ["--trainers", "0"]),
])
def test_bad_arguments_are_one_line_errors(module, args):
    result = bench(module, *args, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error:" in result.stderr.strip().splitlines()[-1]
