"""Averaging codecs, and a count of the bytes they put on the wire.

Owns three things hivemind 1.1.12 leaves to us:

- ``build_compression``: the config's codec names as hivemind codecs (8-bit for large tensors, fp16 for small).
- ``WireCounters``, ``install_wire_counters``, ``counting_averager``: bytes and values sent and received per
  channel ("grad", "state", "other") and per wire codec. hivemind averages inside child processes (every
  averager is an ``mp.Process``, forked on Linux), so the counts live in shared memory made before the fork, and
  the channel is a process-global that the averager's ``run()`` (the child's first code) sets.
- ``check_codecs``: a start-up round trip of every codec. hivemind 1.1.12's 8-bit codecs fail on numpy >= 2.4,
  and the all-reduce then carries on with part of the tensors, logging success.

Every tensor on the wire passes a *leaf* codec exactly once: partition.py calls the averager's codec object
(``SizeAdaptiveCompression`` hands the call to one of its two leaves); everything else, including
``SizeAdaptiveCompression.extract``, goes through ``hivemind.compression.serialization._BASE_COMPRESSION_TYPES``.
So we count at the leaves only: registry entries and the leaves made here are ``_Counted``; wrappers never are.
Counting needs the fork start method, which hivemind's averagers need anyway (Python <= 3.13 on Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import logging
import math
import multiprocessing as mp
import sys
from typing import Any, Iterator, TypeVar

import numpy as np
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import (
    BlockwiseQuantization,
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    SizeAdaptiveCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.compression.adaptive import AdaptiveCompressionBase
from hivemind.compression.serialization import _BASE_COMPRESSION_TYPES
from hivemind.proto import runtime_pb2

from swarm.errors import SwarmError

logger = logging.getLogger(__name__)

CODECS = ("blockwise8", "uniform8", "fp16", "none")
CHANNELS = ("grad", "state", "other")
WIRE_CODECS = tuple(runtime_pb2.CompressionType.keys())  # hivemind's names: NONE, FLOAT16, BLOCKWISE_8BIT, ...
_FIELDS = ("sent_bytes", "sent_values", "received_bytes", "received_values")
_SENT, _RECEIVED = 0, 2  # offsets into _FIELDS
# Relative L2 error allowed by check_codecs; the measured figures are in tests/test_codecs.py.
ERROR_BOUNDS = {"none": 0.0, "fp16": 1e-3, "blockwise8": 0.02, "uniform8": 0.05}

_LARGE = {"blockwise8": BlockwiseQuantization, "uniform8": Uniform8BitQuantization}
_WHOLE = {"fp16": Float16Compression, "none": NoCompression}


def build_compression(name: str, *, size_threshold: int) -> CompressionBase:
    """A codec by config name; under the 8-bit names, tensors of fewer than ``size_threshold`` values go as fp16."""
    if name == "blockwise8":
        import_bitsandbytes()
    if name in _LARGE:
        small, large = _Counted(Float16Compression()), _Counted(_LARGE[name]())
        return SizeAdaptiveCompression(threshold=size_threshold, less=small, greater_equal=large)
    if name in _WHOLE:
        return _Counted(_WHOLE[name]())
    raise ValueError(f"unknown compression {name!r}; allowed: {', '.join(CODECS)}")


def import_bitsandbytes() -> None:
    """Import bitsandbytes (hivemind's blockwise 8-bit codec uses it) without letting it call torch.compile.

    At import, bitsandbytes >= 0.45 wraps the pure-torch kernels of its "default" backend in torch.compile, which
    imports dynamo and inductor: about a second of CPU in every trainer's start, more than the rest of
    bitsandbytes. Those kernels serve devices without native ones; on CPU and CUDA bitsandbytes registers native
    kernels for the blockwise (de)quantization used here. If torch.compile raises, bitsandbytes keeps the plain
    function (its own fallback), so while it is imported torch.compile raises. Nothing else runs torch.compile
    this early in a peer's life."""
    if "bitsandbytes" in sys.modules:
        return
    compile_ = torch.compile

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torch.compile is not used while bitsandbytes is imported")

    torch.compile = unavailable
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass  # hivemind's codec says what to install when it is used
    finally:
        torch.compile = compile_


class WireCounters:
    """Bytes and values through the codecs of this process and of the averagers it forks, per channel and codec.

    Make one in the parent and install it before any averager starts: the counts are int64 in shared memory.
    """

    def __init__(self) -> None:
        self._array = mp.Array(ctypes.c_int64, len(CHANNELS) * len(WIRE_CODECS) * len(_FIELDS))

    def _add(self, channel: int, codec: int, offset: int, nbytes: int, nvalues: int) -> None:
        index = (channel * len(WIRE_CODECS) + codec) * len(_FIELDS) + offset
        with self._array.get_lock():
            raw = self._array.get_obj()
            raw[index] += nbytes
            raw[index + 1] += nvalues

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``{channel: {sent_bytes, sent_values, received_bytes, received_values, by_codec: {codec: {...}}}}``.

        ``by_codec`` lists only the wire codecs that carried something.
        """
        with self._array.get_lock():
            flat = self._array.get_obj()[:]
        result: dict[str, dict[str, Any]] = {}
        for c, channel in enumerate(CHANNELS):
            totals: dict[str, Any] = dict.fromkeys(_FIELDS, 0)
            totals["by_codec"] = {}
            for k, codec in enumerate(WIRE_CODECS):
                start = (c * len(WIRE_CODECS) + k) * len(_FIELDS)
                numbers = dict(zip(_FIELDS, flat[start : start + len(_FIELDS)]))
                if any(numbers.values()):
                    totals["by_codec"][codec] = numbers
                for field, value in numbers.items():
                    totals[field] += value
            result[channel] = totals
        return result


def bytes_per_value(snapshot: dict[str, dict[str, Any]], channel: str, direction: str = "sent") -> float:
    """Serialized bytes per value in one channel and direction (nan when nothing went through).

    Per value *serialized*, i.e. the codec's cost: in a butterfly all-reduce among N peers each peer serializes
    about 2(N-1)/N values per averaged parameter (its parts out, the averaged deltas back).
    """
    if direction not in ("sent", "received"):
        raise ValueError(f"direction must be 'sent' or 'received', not {direction!r}")
    counts = snapshot[channel]
    values = counts[f"{direction}_values"]
    return counts[f"{direction}_bytes"] / values if values else math.nan


_counters: WireCounters | None = None
_channel: str | None = "other"  # None while check_codecs runs: its round trips are not traffic


def set_wire_channel(channel: str) -> None:
    """Count this process's codec calls under ``channel`` from now on (its default is "other")."""
    global _channel
    if channel not in CHANNELS:
        raise ValueError(f"unknown wire channel {channel!r}; allowed: {', '.join(CHANNELS)}")
    _channel = channel


def install_wire_counters(counters: WireCounters) -> None:
    """Count every codec call of this process, and of processes forked after this, into ``counters``.

    Idempotent. Codecs registered into hivemind's registry later (e.g. a patched codec) must come first.
    """
    global _counters
    for key, codec in list(_BASE_COMPRESSION_TYPES.items()):
        if not isinstance(codec, _Counted):
            _BASE_COMPRESSION_TYPES[key] = _Counted(codec)
    _counters = counters


@contextlib.contextmanager
def _uncounted() -> Iterator[None]:
    global _channel
    previous, _channel = _channel, None
    try:
        yield
    finally:
        _channel = previous


def _record(codec: int, offset: int, nbytes: int, nvalues: int) -> None:
    if _counters is not None and _channel is not None:
        _counters._add(CHANNELS.index(_channel), codec, offset, nbytes, nvalues)


class _Counted(CompressionBase):
    """A leaf codec that records what it encodes and decodes; in every other respect, the codec it wraps."""

    def __init__(self, inner: CompressionBase):
        assert not isinstance(inner, (AdaptiveCompressionBase, _Counted)), "count leaves only, or calls count twice"
        self.inner, self.compression_type = inner, inner.compression_type
        self._codec = WIRE_CODECS.index(runtime_pb2.CompressionType.Name(inner.compression_type))

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        serialized = self.inner.compress(tensor, info, allow_inplace)
        _record(self._codec, _SENT, len(serialized.buffer), tensor.numel())
        return serialized

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        tensor = self.inner.extract(serialized_tensor)
        _record(self._codec, _RECEIVED, len(serialized_tensor.buffer), tensor.numel())
        return tensor

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.inner.estimate_compression_ratio(info)

    def __getattr__(self, name: str) -> Any:  # n_bits, FP16_MAX, quantize...: whatever the wrapped codec has
        if name == "inner":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return repr(self.inner)


Averager = TypeVar("Averager", bound=DecentralizedAverager)


def counting_averager(cls: type[Averager], channel: str) -> type[Averager]:
    """A subclass of the hivemind averager ``cls`` whose child process counts its traffic under ``channel``.

    The subclass keeps ``cls.__name__``: hivemind names its RPC handlers after the class, so a new name would
    stop this peer from averaging with peers that use the plain class.
    """
    if channel not in CHANNELS:
        raise ValueError(f"unknown wire channel {channel!r}; allowed: {', '.join(CHANNELS)}")
    if not issubclass(cls, DecentralizedAverager):
        raise TypeError(f"{cls.__name__} is not a hivemind DecentralizedAverager")

    def run(self: DecentralizedAverager) -> None:  # mp.Process.run: the first code of the forked child
        set_wire_channel(channel)
        if _counters is None:
            logger.warning(f"{cls.__name__} started before install_wire_counters(): its traffic is not counted")
        super(subclass, self).run()

    subclass = type(cls.__name__, (cls,), {"run": run, "__module__": __name__})
    subclass.__qualname__ = f"counting_averager.<{channel}>.{cls.__name__}"
    return subclass


class CodecError(SwarmError, RuntimeError):
    """A codec fails its round trip on this install."""


def check_codecs() -> None:
    """Round-trip random tensors through every codec along hivemind's own paths; raise CodecError if one fails.

    Checks both the averager's codec object (what partition.py calls) and the registry (what deserializes).
    """
    generator = torch.Generator().manual_seed(0)
    tensors = torch.randn(2**16, generator=generator), torch.randn(1000, generator=generator)
    with _uncounted():
        for name in CODECS:
            codec = build_compression(name, size_threshold=4096)
            for tensor in tensors:
                _check_round_trip(name, codec, tensor)


def _check_round_trip(name: str, codec: CompressionBase, tensor: torch.Tensor) -> None:
    info = CompressionInfo.from_tensor(tensor)
    wire = "?"
    try:
        serialized = codec.compress(tensor, info)
        wire = runtime_pb2.CompressionType.Name(serialized.compression)
        restored = [deserialize_torch_tensor(serialized)]
        restored.append(deserialize_torch_tensor(serialize_torch_tensor(tensor, serialized.compression, info)))
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        message = f"codec {name} ({wire}) fails a round trip: {type(error).__name__}: {first_line}; {_cause()}"
        raise CodecError(message) from error
    for result in restored:
        relative = float((result - tensor).norm() / tensor.norm()) if result.shape == tensor.shape else math.inf
        if not relative <= ERROR_BOUNDS[name]:  # also catches nan
            raise CodecError(
                f"codec {name} ({wire}) restores {tensor.numel()} values with relative error {relative:.3g} "
                f"(allowed {ERROR_BOUNDS[name]}); {_cause()}"
            )


def _cause() -> str:
    try:
        bnb = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        bnb = "not installed"
    return f"likely cause: hivemind 1.1.12's 8-bit codecs need numpy<2.4 (found {np.__version__}), bitsandbytes ({bnb})"
