"""``swarm join`` with a stopwatch around ``optimizer.step()``: the trainer of the training benchmark.

    python -m benchmarks.train_peer --timing-json timing.json join /ip4/10.77.0.2/tcp/.../p2p/... --max-steps 20

Everything after ``--timing-json PATH`` is passed to the real ``swarm`` CLI unchanged. The only addition: each call
of ``SwarmOptimizer.step`` is timed, and on exit PATH receives ``[[start, seconds, epoch_before, epoch_after], ...]``
(wall-clock seconds). The time outside ``step()`` is the peer's forward/backward (computing); the time inside is
accumulation, waiting for and running averaging, and the optimizer update.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "--timing-json":
        print("usage: python -m benchmarks.train_peer --timing-json PATH join ADDR [swarm join options]", file=sys.stderr)
        return 2
    path, swarm_args = Path(argv[1]), argv[2:]

    from peers import cli
    from swarm.optimizer import SwarmOptimizer

    records: list[list[float]] = []
    original = SwarmOptimizer.step

    def timed_step(self, *args, **kwargs):
        epoch, start = self.local_epoch, time.time()
        try:
            return original(self, *args, **kwargs)
        finally:
            records.append([start, time.time() - start, epoch, self.local_epoch])

    SwarmOptimizer.step = timed_step
    try:
        return cli.main(swarm_args)
    finally:
        path.write_text(json.dumps(records))


if __name__ == "__main__":
    sys.exit(main())
