"""Codec benchmark: compress/extract throughput and relative error of each averaging codec, beside memcpy.

    .venv/bin/python -m benchmarks.codec_bench --values 1M --values 10M --values 100M --json benchmarks/results/codecs.json
    .venv/bin/python -m benchmarks.codec_bench --toy            # 1M values, one repetition

Owns the figure behind the goal "codec time <= 5% of a round at 50 Mbit/s". Tensors go through the codecs the
way hivemind's all-reduce sends them: in parts of about ``--part-size-bytes`` once compressed (hivemind sizes parts
by the codec's estimated ratio), each compressed and extracted on its own, through ``swarm.compression.build_compression`` (the codecs the swarm uses). Throughput is
fp32 input bytes per second (MB = 1e6 bytes), the best of ``--repeats`` runs, on one thread (``torch`` may use
more: ``--threads``). Plain memory-copy bandwidth (``dst.copy_(src)`` of the same tensor) is measured in the same
run, so figures from a loaded machine can be read as ratios.

``codec_share_50mbit``: the codec's time per round over the time the link needs for the same values. Per round a
peer compresses and extracts about 2(N-1)/N values per parameter and sends as many, so the share is
(1/compress + 1/extract) / (bytes per value x 8 / 50 Mbit/s), whatever N and the model size.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from benchmarks.averaging import CODECS, parse_count

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memcpy_mb_s(tensor: "torch.Tensor", repeats: int) -> float:
    import torch

    target = torch.empty_like(tensor)
    target.copy_(tensor)  # touch the pages first
    return tensor.numel() * 4 / best_seconds(lambda: target.copy_(tensor), repeats) / 1e6


def measure_codec(name: str, tensor: "torch.Tensor", part_size_bytes: int, repeats: int) -> dict:
    import torch
    from hivemind.compression import CompressionInfo, deserialize_torch_tensor

    from swarm.compression import build_compression

    codec = build_compression(name, size_threshold=2**16)
    # as hivemind's partition.py: parts of part_size_bytes *after* compression, by the codec's own estimate
    ratio = codec.estimate_compression_ratio(CompressionInfo.from_tensor(tensor))
    parts = list(tensor.split(max(1, int(part_size_bytes / (4 * ratio)))))
    infos = [CompressionInfo.from_tensor(part) for part in parts]
    serialized: list = []
    deserialize_torch_tensor(codec.compress(parts[0], infos[0]))  # warm up: bitsandbytes loads on first use

    def compress() -> None:
        serialized[:] = [codec.compress(part, info) for part, info in zip(parts, infos)]

    compress_s = best_seconds(compress, repeats)
    restored: list[torch.Tensor] = []

    def extract() -> None:
        restored[:] = [deserialize_torch_tensor(message) for message in serialized]

    extract_s = best_seconds(extract, repeats)
    result = torch.cat(restored)
    wire_bytes = sum(len(message.buffer) for message in serialized)
    mb = tensor.numel() * 4 / 1e6
    bytes_per_value = wire_bytes / tensor.numel()
    link_s_per_value = bytes_per_value * 8 / 50e6
    codec_s_per_value = (compress_s + extract_s) / tensor.numel()
    return dict(codec=name, values=tensor.numel(), compress_mb_s=round(mb / compress_s, 1),
                extract_mb_s=round(mb / extract_s, 1), bytes_per_value=round(bytes_per_value, 4),
                relative_error=float((result - tensor).norm() / tensor.norm()),
                codec_share_50mbit=round(codec_s_per_value / link_s_per_value, 4))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codec_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=parse_count, action="append", help="tensor size, e.g. 10M (repeatable)")
    parser.add_argument("--codec", action="append", choices=CODECS, help="codec (repeatable; default: all four)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement, best kept (default 3)")
    parser.add_argument("--part-size-bytes", type=parse_count, default=2**19,
                        help="compressed bytes per part, as hivemind's part_size_bytes (default 524288)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the averager's share of 2 cores)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--toy", action="store_true", help="smoke-test size: 1M values, one repetition")
    args = parser.parse_args(argv)
    if args.toy:
        args.values, args.repeats = [1_000_000], 1
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: its directory does not exist")
    if args.repeats < 1 or args.threads < 1 or args.part_size_bytes < 4:
        parser.error("--repeats and --threads must be >= 1, --part-size-bytes >= 4")
    args.values, args.codec = args.values or [1_000_000, 10_000_000, 100_000_000], args.codec or list(CODECS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch  # after parsing: a bad argument is answered at once

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")  # inside hivemind's uniform8 codec
    rows = []
    for values in args.values:
        tensor = torch.randn(values, generator=torch.Generator().manual_seed(0))
        memcpy = memcpy_mb_s(tensor, args.repeats)
        logger.info("%d values: memcpy %.0f MB/s", values, memcpy)
        for name in args.codec:
            row = measure_codec(name, tensor, args.part_size_bytes, args.repeats)
            row.update(memcpy_mb_s=round(memcpy, 1), threads=args.threads, part_size_bytes=args.part_size_bytes)
            rows.append(row)
            logger.info("%s", row)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"{'values':>10} {'codec':>10} {'comp MB/s':>10} {'extr MB/s':>10} {'memcpy':>8} {'B/val':>7} "
          f"{'rel err':>8} {'share@50M':>9}")
    for r in rows:
        print(f"{r['values']:>10} {r['codec']:>10} {r['compress_mb_s']:>10} {r['extract_mb_s']:>10} "
              f"{r['memcpy_mb_s']:>8.0f} {r['bytes_per_value']:>7} {r['relative_error']:>8.2g} {r['codec_share_50mbit']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
