"""What the forkserver of ``tests/forked.py`` imports once, before it forks any peer: every role and its stack."""

import peers.join  # noqa: F401  (torch, hivemind)
import peers.monitor  # noqa: F401
import peers.seed  # noqa: F401
import peers.status  # noqa: F401
import swarm.model  # noqa: F401  (transformers: the roles import it when they build a model, ~3 s of CPU)
from swarm.compression import import_bitsandbytes

import_bitsandbytes()  # as a trainer's first blockwise8 codec does, without torch.compile
