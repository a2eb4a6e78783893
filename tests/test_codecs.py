"""The averaging codecs work on this install, and the wire counters count each tensor once, across forks."""

import asyncio
import multiprocessing as mp

import numpy as np
import pytest
import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import BlockwiseQuantization, CompressionInfo, deserialize_torch_tensor
from hivemind.compression import serialization, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from swarm import compression
from swarm.compression import (
    CODECS,
    CodecError,
    WireCounters,
    build_compression,
    bytes_per_value,
    check_codecs,
    install_wire_counters,
    set_wire_channel,
)

THRESHOLD = 2**16
# Relative L2 error of one round trip of 2**20 N(0, 1) values (seeds 0-2, numpy 2.3.5, bitsandbytes 0.50.2):
# none 0, fp16 2.08e-4, blockwise8 1.29e-2 to 1.31e-2, uniform8 1.55e-2 to 1.65e-2.
BOUNDS = {"none": 0.0, "fp16": 1e-3, "blockwise8": 0.02, "uniform8": 0.05}


@pytest.fixture
def counters():
    """Fresh counters installed in this process; the channel is put back to "other" afterwards."""
    counters = WireCounters()
    install_wire_counters(counters)
    yield counters
    set_wire_channel("other")


def _round_trip(name, tensor):
    codec = build_compression(name, size_threshold=THRESHOLD)
    serialized = codec.compress(tensor, CompressionInfo.from_tensor(tensor))
    return serialized, codec.extract(serialized)


def _relative_error(restored, tensor):
    return float((restored - tensor).norm() / tensor.norm())


@pytest.mark.parametrize("name", CODECS)
def test_round_trip_error_is_bounded(name):
    tensor = torch.randn(2**20, generator=torch.Generator().manual_seed(0))
    _, restored = _round_trip(name, tensor)
    assert restored.shape == tensor.shape and restored.dtype == tensor.dtype
    assert _relative_error(restored, tensor) <= BOUNDS[name]
    assert BOUNDS[name] == compression.ERROR_BOUNDS[name]


@pytest.mark.parametrize("name", ["blockwise8", "uniform8"])
def test_small_tensors_go_as_fp16(name):
    small, large = torch.randn(THRESHOLD - 1), torch.randn(THRESHOLD)
    assert _round_trip(name, small)[0].compression == runtime_pb2.FLOAT16
    expected = runtime_pb2.BLOCKWISE_8BIT if name == "blockwise8" else runtime_pb2.UNIFORM_8BIT
    assert _round_trip(name, large)[0].compression == expected


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="blockwise8, uniform8, fp16, none"):
        build_compression("int4", size_threshold=THRESHOLD)


@pytest.mark.parametrize("name, low, high", [("blockwise8", 1.0, 1.05), ("fp16", 2.0, 2.0), ("none", 4.0, 4.0)])
def test_bytes_per_value_on_the_wire(counters, name, low, high):
    """Split into parts and compressed exactly as an all-reduce does (parts of 512 KB)."""
    set_wire_channel("grad")
    tensor = torch.randn(2**20)
    codec = build_compression(name, size_threshold=THRESHOLD)
    container = TensorPartContainer([tensor], peer_fractions=[1.0], compression=codec)

    async def send_all():
        return [part async for part in container.iterate_input_parts_for(0)]

    parts = asyncio.run(send_all())
    snapshot = counters.snapshot()
    assert snapshot["grad"]["sent_values"] == tensor.numel()
    assert snapshot["grad"]["sent_bytes"] == sum(len(part.buffer) for part in parts)
    assert low <= bytes_per_value(snapshot, "grad") <= high
    assert snapshot["other"]["sent_bytes"] == snapshot["state"]["sent_bytes"] == 0


def test_check_codecs_passes_on_this_install(counters):
    before = counters.snapshot()
    check_codecs()
    assert counters.snapshot() == before, "check_codecs' round trips are not traffic"


def test_real_8bit_codecs_work_on_this_install():
    """hivemind 1.1.12's Quantization.extract does int(np.frombuffer(..., count=1)): broken on numpy >= 2.4."""
    numpy_is_pinned = np.lib.NumpyVersion(np.__version__) < "2.4.0"
    tensor = torch.randn(THRESHOLD)
    codec = BlockwiseQuantization()
    try:
        restored = codec.extract(codec.compress(tensor, CompressionInfo.from_tensor(tensor)))
        blockwise_works = _relative_error(restored, tensor) <= BOUNDS["blockwise8"]
    except TypeError:
        blockwise_works = False
    assert numpy_is_pinned or blockwise_works, f"numpy {np.__version__} breaks BlockwiseQuantization.extract"


class _BrokenExtract(BlockwiseQuantization):
    def extract(self, serialized_tensor):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")  # numpy 2.4's message


class _WrongValues(BlockwiseQuantization):
    def extract(self, serialized_tensor):
        return torch.zeros(tuple(serialized_tensor.size))


@pytest.mark.parametrize(
    "broken, message",
    [(_BrokenExtract, "fails a round trip: TypeError"), (_WrongValues, "restores 65536 values with relative error 1 ")],
)
def test_check_codecs_names_a_broken_codec(monkeypatch, broken, message):
    monkeypatch.setitem(serialization._BASE_COMPRESSION_TYPES, "BLOCKWISE_8BIT", broken())
    with pytest.raises(RuntimeError, match=rf"^codec blockwise8 \(BLOCKWISE_8BIT\) {message}.*numpy") as caught:
        check_codecs()
    assert isinstance(caught.value, CodecError) and "\n" not in str(caught.value)


def test_each_tensor_counts_once(counters):
    """SizeAdaptiveCompression hands compress to a counted leaf and extract to the counted registry: once each."""
    install_wire_counters(counters)  # a second time: still one count per call
    registry = serialization._BASE_COMPRESSION_TYPES
    assert all(isinstance(codec, compression._Counted) for codec in registry.values())
    assert not any(isinstance(codec.inner, compression._Counted) for codec in registry.values())
    for key, codec in registry.items():  # hivemind's own import-time check still holds
        assert runtime_pb2.CompressionType.Name(codec.compression_type) == key

    tensor, small = torch.randn(THRESHOLD), torch.randn(100)
    for part in (tensor, small):
        _round_trip("blockwise8", part)
    deserialize_torch_tensor(serialize_torch_tensor(tensor, runtime_pb2.FLOAT16))
    other = counters.snapshot()["other"]
    assert other["sent_values"] == other["received_values"] == 2 * tensor.numel() + small.numel()
    assert other["by_codec"]["BLOCKWISE_8BIT"]["sent_values"] == tensor.numel()
    assert other["by_codec"]["FLOAT16"]["received_bytes"] == 2 * (tensor.numel() + small.numel())


def _compress_in_child(channel, numel):
    set_wire_channel(channel)
    tensor = torch.randn(numel)
    _round_trip("fp16", tensor)


def test_counts_cross_a_fork_and_stay_apart_by_channel(counters):
    context = mp.get_context("fork")
    jobs = [("grad", 1000), ("state", 300)]
    children = [context.Process(target=_compress_in_child, args=job) for job in jobs]
    for child in children:
        child.start()
    set_wire_channel("grad")  # the parent's own channel: a child's choice does not leak into it, nor back
    _round_trip("none", torch.randn(10))
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    snapshot = counters.snapshot()
    assert snapshot["grad"]["sent_values"] == snapshot["grad"]["received_values"] == 1010
    assert snapshot["grad"]["by_codec"]["FLOAT16"]["sent_bytes"] == 2000
    assert snapshot["grad"]["by_codec"]["NONE"]["sent_bytes"] == 40
    assert snapshot["state"]["sent_bytes"] == snapshot["state"]["received_bytes"] == 600
    assert snapshot["other"]["sent_bytes"] == 0 and snapshot["other"]["by_codec"] == {}


def test_averagers_count_their_own_channel(counters):
    """Two real averagers on 127.0.0.1: the all-reduce and a state download are counted in the parent."""
    numel = 2**18
    dht_first = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dht_second = DHT(start=True, initial_peers=dht_first.get_visible_maddrs())
    options = dict(prefix="codecs", target_group_size=2, min_matchmaking_time=2.0, request_timeout=1.0, start=True)
    grad_averager = compression.counting_averager(DecentralizedAverager, "grad")
    state_averager = compression.counting_averager(DecentralizedAverager, "state")
    assert grad_averager.__name__ == "DecentralizedAverager"  # hivemind names RPC handlers after the class
    averagers = []
    try:
        for dht in (dht_first, dht_second):
            codec = build_compression("blockwise8", size_threshold=THRESHOLD)
            averagers.append(grad_averager([torch.randn(numel)], dht, compression=codec, **options))
        futures = [averager.step(wait=False, timeout=30) for averager in averagers]
        assert all(future.result(timeout=60) is not None for future in futures)
        fp16 = dict(state_compression=build_compression("fp16", size_threshold=THRESHOLD))
        averagers.append(state_averager([torch.randn(1000)], dht_first, **fp16, **{**options, "prefix": "state"}))
        averagers.append(state_averager([torch.zeros(1000)], dht_second, **fp16, **{**options, "prefix": "state"}))
        assert averagers[-1].load_state_from_peers(timeout=30) is not None
    finally:
        for averager in averagers:
            averager.shutdown()
        dht_second.shutdown()
        dht_first.shutdown()
    snapshot = counters.snapshot()
    # both peers together send each value once as a part and once as an averaged delta, and receive as much
    assert snapshot["grad"]["sent_values"] == snapshot["grad"]["received_values"] == 2 * numel
    assert 1.0 <= bytes_per_value(snapshot, "grad") <= 1.05
    assert snapshot["state"]["sent_bytes"] == snapshot["state"]["received_bytes"] == 2000
    assert snapshot["other"]["sent_bytes"] == snapshot["other"]["received_bytes"] == 0
