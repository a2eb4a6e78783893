"""Honest accounting of averaging rounds: a global step only counts as averaged when it was.

hivemind quietly falls back to local gradients ("Proceeding with local gradients") and only warns, from
inside its averager processes, when a round used part of the inputs ("Reducer: received 50.0% of input
tensors"). ``RoundLog`` records each global step's outcome in the trainer; ``PartialRoundWatch`` is a logging
handler installed before the averagers fork, so their warnings reach shared counters that the trainer reads.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import re
import threading
import time
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)

_PARTIAL_RE = re.compile(r"received (\d+(?:\.\d+)?)% of input tensors|received (\d+(?:\.\d+)?)% results")
_WATCHED_LOGGERS = ("hivemind.averaging.partition", "hivemind.averaging.allreduce")

OUTCOMES = ("averaged", "partial", "skipped", "failed")


class PartialRoundWatch(logging.Handler):
    """Counts partial all-reduce rounds reported by any process forked after ``install()``."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self._count = mp.Value("l", 0)

    def emit(self, record: logging.LogRecord) -> None:
        if _PARTIAL_RE.search(record.getMessage()):
            with self._count.get_lock():
                self._count.value += 1

    @property
    def count(self) -> int:
        return int(self._count.value)

    def install(self) -> "PartialRoundWatch":
        for name in _WATCHED_LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def uninstall(self) -> None:
        for name in _WATCHED_LOGGERS:
            logging.getLogger(name).removeHandler(self)


@dataclass
class Round:
    step: int  # the global step (hivemind epoch) this round produced gradients for
    outcome: str  # one of OUTCOMES
    group_size: int  # peers in the all-reduce group, this one included (1 when it trained alone)
    reason: str = ""
    ended: float = field(default_factory=time.time)  # when it was recorded (Unix time; a group's rounds end together)


@dataclass
class RoundLog:
    """Outcomes of this trainer's gradient averaging rounds, one per global step it took part in."""

    rounds: list[Round] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, round_: Round) -> None:
        with self._lock:
            self.rounds.append(round_)
        if round_.outcome == "averaged":
            logger.info("Step %d: averaged gradients with %d peers", round_.step, round_.group_size)
        else:
            logger.warning("Step %d: averaging %s (%s); this step used %s gradients", round_.step, round_.outcome,
                           round_.reason, "partly averaged" if round_.outcome == "partial" else "local")

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {outcome: sum(r.outcome == outcome for r in self.rounds) for outcome in OUTCOMES}

    def as_dicts(self) -> list[dict]:
        with self._lock:
            return [asdict(r) for r in self.rounds]
