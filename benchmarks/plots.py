"""PNG plots from the benchmarks' JSON rows (needs the optional extra: ``pip install -e '.[bench]'``).

    .venv/bin/python -m benchmarks.plots --averaging benchmarks/results/averaging-25M.json \\
        --averaging benchmarks/results/averaging-125M.json --training benchmarks/results/training.json \\
        --out benchmarks/results

Writes ``round_time_vs_rate.png`` (seconds per averaging round against link rate, one line per codec and size,
with the physical limit dashed) and ``loss_vs_wall_time.png`` (mean training loss of the swarm against seconds
since its first step, one line per variant, the single process included).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)


def load_rows(paths: Sequence[str]) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        rows += [row for row in json.loads(Path(path).read_text()) if "error" not in row]
    return rows


def last_rounds(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    """Per (values, codec): the last round measured at each rate (a later file wins a tie), ordered by rate."""
    best: dict[tuple[int, str, float], dict] = {}
    for row in rows:
        key = (row["values"], row["codec"], row["rate_mbit"])
        if key not in best or row["round"] >= best[key]["round"]:  # later files supersede earlier ones
            best[key] = row
    series: dict[tuple[int, str], list[dict]] = {}
    for (values, codec, _), row in sorted(best.items()):
        series.setdefault((values, codec), []).append(row)
    return series


def plot_rounds(rows: list[dict], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (values, codec), points in last_rounds(rows).items():
        rates = [p["rate_mbit"] for p in points]
        line, = ax.plot(rates, [p["round_s"] for p in points], marker="o", label=f"{codec}, {values / 1e6:.0f}M")
        ax.plot(rates, [p["limit_s"] for p in points], linestyle="--", color=line.get_color(), alpha=0.5)
    ax.set(xscale="log", yscale="log", xlabel="link rate (Mbit/s per peer, egress)", ylabel="seconds per round",
           title="Averaging round, 4 peers (dashed: 2(N-1)/N x S / B)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    path = out / "round_time_vs_rate.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training(rows: list[dict], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row.get("curve"):
            times, losses = zip(*row["curve"])
            tuned = " + " + ", ".join(o.split(".")[-1] for o in row["overrides"]) if row.get("overrides") else ""
            ax.plot(times, losses, marker=".", label=row["variant"] + tuned)
    ax.set(xlabel="wall time since the first step (s)", ylabel="training loss (mean of trainers)",
           title="configs/tiny.yaml, 4 trainers, 20 Mbit/s links")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    path = out / "loss_vs_wall_time.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--averaging", action="append", default=[], help="JSON of benchmarks.averaging (repeatable)")
    parser.add_argument("--training", action="append", default=[], help="JSON of benchmarks.training (repeatable)")
    parser.add_argument("--out", default=".", help="directory for the PNGs (default .)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print("error: matplotlib is missing: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: --out {out}: no such directory", file=sys.stderr)
        return 2
    try:
        if args.averaging:
            logger.info("wrote %s", plot_rounds(load_rows(args.averaging), out))
        if args.training:
            logger.info("wrote %s", plot_training(load_rows(args.training), out))
    except (OSError, ValueError, KeyError) as error:
        print(f"error: cannot plot: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
