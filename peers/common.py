"""What every entry point shares: logging set-up, signals, and turning user errors into one-line messages."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from typing import Callable

from swarm.errors import SwarmError

logger = logging.getLogger("swarm")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def setup_logging(verbose: bool = False) -> None:
    """INFO speaks to volunteers; -v adds DEBUG and hivemind's own INFO messages."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "INFO" if verbose else "WARNING")
    quiet = logging.INFO if verbose else logging.WARNING
    for name in ("hivemind", "bitsandbytes", "transformers", "asyncio"):
        logging.getLogger(name).setLevel(quiet)
    _quiet_hivemind(quiet)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")


def _quiet_hivemind(level: int) -> None:
    """hivemind installs its own handler on import; route it through ours at the chosen level."""
    try:
        from hivemind.utils import logging as hm_logging

        hm_logging.use_hivemind_log_handler("nowhere")
    except Exception:  # older or newer hivemind: its default handler stays, which is harmless
        pass
    logging.getLogger("hivemind").setLevel(level)


def install_stop_handlers() -> threading.Event:
    """SIGINT/SIGTERM set the returned event (a graceful stop); a second signal interrupts at once."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        logger.info("Received %s: shutting down (send it again to force)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


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
