"""What every entry point shares: logging set-up, signals, and turning user errors into one-line messages."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable

from swarm.errors import SwarmError

logger = logging.getLogger("swarm")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def setup_logging(verbose: bool = False) -> None:
    """INFO speaks to volunteers; -v adds DEBUG, hivemind's own INFO messages and full tracebacks."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "INFO" if verbose else "WARNING")
    global _hivemind_level
    _hivemind_level = logging.INFO if verbose else logging.WARNING
    route_hivemind_logs()
    # bitsandbytes warns on some CPUs that an optional 4-bit kernel package is absent (we use 8-bit codecs
    # only); transformers notes config defaults; asyncio reports tasks hivemind leaves at exit. None of it
    # is actionable for a volunteer.
    for name in ("bitsandbytes", "transformers", "asyncio"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    if not verbose:
        for handler in logging.getLogger().handlers:  # inherited by hivemind's forked processes too
            handler.addFilter(_OneLineHivemind())
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")  # inside hivemind's uniform8 codec
        # hivemind's helper threads and finalizers raise while a peer shuts down (its p2pd may be gone first,
        # after a Ctrl-C reached the whole process group): one line each, not a traceback
        threading.excepthook = _one_line_thread_error
        sys.unraisablehook = _one_line_unraisable


def route_hivemind_logs() -> None:
    """hivemind installs its own log handler when it is imported: send its records through ours instead. Call it
    once hivemind is imported (roles import it lazily, so that bad input is answered before seconds of imports);
    before that it only sets the level of hivemind's loggers."""
    if "hivemind.utils.logging" in sys.modules:
        try:
            from hivemind.utils import logging as hivemind_logging

            hivemind_logging.use_hivemind_log_handler("nowhere")
        except Exception:  # another hivemind version: its own handler stays, which is harmless
            pass
    logging.getLogger("hivemind").setLevel(_hivemind_level)  # (taking its handler away resets the level)


_hivemind_level = logging.WARNING  # set by setup_logging


def _one_line_thread_error(args) -> None:
    if args.exc_type is SystemExit:
        return
    logger.warning("%s in thread %s: %s", args.exc_type.__name__, getattr(args.thread, "name", "?"),
                   str(args.exc_value)[:200])


def _one_line_unraisable(unraisable) -> None:
    logger.debug("Ignored %s in %r: %s", type(unraisable.exc_value).__name__, unraisable.object,
                 unraisable.exc_value)


class _OneLineHivemind(logging.Filter):
    """Without -v, hivemind's errors show as one line, not a traceback; and the traceback its DHT process logs
    when an averager exits with a request in flight (the socket that carried it is gone) is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("hivemind") or not record.exc_info:
            return True
        error = record.exc_info[1]
        if isinstance(error, (FileNotFoundError, ConnectionError)) and record.name == "hivemind.dht.dht":
            return False
        record.exc_info, record.exc_text = None, None
        return True


def install_stop_handlers() -> threading.Event:
    """SIGINT/SIGTERM set the returned event (a graceful stop); a second signal interrupts at once."""
    stop = threading.Event()
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked hivemind process (DHT, averager): end it, and the p2pd it started
            _signal_own_children(signal.SIGTERM)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stop.is_set():
            raise KeyboardInterrupt
        logger.info("Received %s: shutting down (send it again to force)", signal.Signals(signum).name)
        stop.set()

    global _installed
    _installed = handler
    reinstall_stop_handlers()
    os.register_at_fork(before=_remember_forking_process, after_in_child=_die_with_parent)
    return stop


_forking_pid = 0


def _remember_forking_process() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _die_with_parent() -> None:
    """In each forked helper (hivemind's DHT and averager processes): leave the peer's process group, and get
    SIGTERM when this peer's main process dies, even by kill -9, so no helper goes on averaging for a dead peer.
    The handler above then stops the helper's own children (p2pd) too.

    Why a group of its own: a Ctrl-C in a terminal, or a service manager's stop, signals the whole group. Helpers
    and their p2pd then died at once, while the main process, shutting down in order, waited forever on answers
    from them (found by benchmarks/soak.py). Now only the main process hears it, and it stops the helpers."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != _forking_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _signal_own_children(signum: int) -> None:
    """Signal this process's direct children, from /proc (Linux); elsewhere do nothing."""
    for children in Path("/proc/self/task").glob("*/children"):
        try:
            pids = children.read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                os.kill(int(pid), signum)
            except (ProcessLookupError, PermissionError, ValueError):
                pass


_installed: Callable | None = None


def reinstall_stop_handlers() -> None:
    """Put our SIGINT/SIGTERM handlers back. hivemind's averagers set SIGINT to "ignore" in the process that
    starts them (``run_in_background``), which would make Ctrl-C do nothing: call this after building one."""
    if _installed is not None:
        signal.signal(signal.SIGINT, _installed)
        signal.signal(signal.SIGTERM, _installed)


def run_entry(body: Callable[[], int]) -> int:
    """Run an entry point: user errors become ``error: ...`` on one line, never a traceback."""
    try:
        return body()
    except SwarmError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
