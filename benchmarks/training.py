"""Training benchmark: a real swarm (``swarm seed`` + N ``swarm join``) on emulated links, per averaging variant.

    sudo .venv/bin/python -m benchmarks.training --peers 4 --rate-mbit 20 --steps 20 --baseline \\
        --variant fp32 --variant blockwise8 --variant blockwise8-overlap --json benchmarks/results/training.json
    sudo .venv/bin/python -m benchmarks.training --toy    # 2 trainers, 2 global steps, blockwise8

The seed runs in namespace 0, trainer i in namespace i (``benchmarks.train_peer``: the real ``swarm join`` with a
stopwatch around ``optimizer.step()``). Per variant it reports: wall time until the swarm's mean training loss
first reaches ``--target-loss``; the held-out loss after ``--steps`` global steps (trainer 1's final model, on
the config's eval split); compute utilization (share of each trainer's wall time outside ``optimizer.step()``,
i.e. computing rather than waiting on averaging); rounds averaged; and each trainer's interface tx bytes.
``--baseline`` adds one process without a swarm that makes the same number of steps with the same global batch.

Variants: ``fp32`` / ``fp16`` / ``uniform8`` / ``blockwise8`` set ``averaging.compression``; a ``-overlap``
suffix adds ``averaging.delay_optimizer_step`` and ``averaging.delay_grad_averaging``. ``--set`` applies to every
variant (e.g. to try tuned timeouts).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Sequence

from benchmarks.wan import EXIT_SKIPPED, ROOT, NotRoot, Wan, raise_on_sigterm, require_root

logger = logging.getLogger(__name__)

CODEC_OF = {"fp32": "none", "fp16": "fp16", "uniform8": "uniform8", "blockwise8": "blockwise8"}
OVERLAP = ["averaging.delay_optimizer_step=true", "averaging.delay_grad_averaging=true"]


def variant_overrides(name: str) -> list[str]:
    codec, _, overlap = name.partition("-")
    if codec not in CODEC_OF or overlap not in ("", "overlap"):
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}: one of {', '.join(CODEC_OF)}, optionally with -overlap")
    return [f"averaging.compression={CODEC_OF[codec]}"] + (OVERLAP if overlap else [])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4, help="trainers (default 4)")
    parser.add_argument("--rate-mbit", type=float, default=20.0, help="link rate, Mbit/s (default 20)")
    parser.add_argument("--steps", type=int, default=20, help="global steps per run (default 20)")
    parser.add_argument("--variant", action="append", help="fp32, blockwise8, blockwise8-overlap, ... (repeatable)")
    parser.add_argument("--baseline", action="store_true", help="also train one process with the same global batch")
    parser.add_argument("--no-swarm", action="store_true", help="run no swarm variant (with --baseline: baseline only)")
    parser.add_argument("--target-loss", type=float, default=4.0, help="training loss to time (default 4.0)")
    parser.add_argument("--config", help="swarm config (default: configs/tiny.yaml under --source)")
    parser.add_argument("--batch-size", type=int, default=8, help="each trainer's micro-batch (default 8)")
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out batches of 8 sequences (default 16)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for all runs")
    parser.add_argument("--source", default=str(ROOT),
                        help="directory holding the swarm/ and peers/ to run (default: this checkout; e.g. an export "
                             "of a commit, `git archive HEAD | tar -x -C DIR`, while the checkout is being edited)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--keep-logs", help="copy the peers' logs and reports into this directory")
    parser.add_argument("--toy", action="store_true", help="smoke-test size: 2 trainers, 2 steps, blockwise8")
    parser.add_argument("--from-logs", metavar="DIR", help="recompute the rows of --json from a --keep-logs DIR "
                        "(curves, utilization, rounds; the eval loss is kept) and exit")
    args = parser.parse_args(argv)
    if args.toy:
        args.peers, args.steps, args.variant = 2, 2, args.variant or ["blockwise8"]
    args.variant = [] if args.no_swarm else args.variant or ["fp32", "blockwise8"]
    for name in args.variant:
        try:
            variant_overrides(name)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: its directory does not exist")
    if not 1 <= args.peers <= 16 or args.steps < 1 or args.rate_mbit <= 0 or args.batch_size < 1:
        parser.error("--peers must be 1..16, --steps and --batch-size >= 1, --rate-mbit positive")
    args.config = args.config or str(Path(args.source) / "configs" / "tiny.yaml")
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    if not (Path(args.source) / "peers" / "cli.py").is_file():
        parser.error(f"--source {args.source}: no peers/cli.py there")
    return args


def start_swarm(wan: Wan, args: argparse.Namespace, overrides: list[str], workdir: Path) -> None:
    sets = [x for pair in overrides for x in ("--set", pair)]
    where = dict(cwd=Path(args.source), PYTHONPATH=str(ROOT))  # swarm/ and peers/ from --source, benchmarks/ from here
    wan.popen(0, [sys.executable, "-m", "peers.cli", "seed", "--config", args.config, "--host", wan.address(0),
                  "--port", "0", "--addr-file", str(workdir / "seed.addr"), *sets], log=workdir / "seed.log", **where)
    address = wait_file(workdir / "seed.addr", wan, workdir, 120).split()[0]
    for i in range(1, args.peers + 1):
        extra = ["--save-model", str(workdir / "model")] if i == 1 else []
        wan.popen(i, [sys.executable, "-m", "benchmarks.train_peer", "--timing-json", str(workdir / f"timing-{i}.json"),
                      "join", address, "--host", wan.address(i), "--port", "0", "--max-steps", str(args.steps),
                      "--wait-for-peers", str(args.peers), "--batch-size", str(args.batch_size),
                      "--report-json", str(workdir / f"report-{i}.json"), *extra], log=workdir / f"trainer-{i}.log", **where)


def wait_file(path: Path, wan: Wan, workdir: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if wan.procs[0].poll() is not None:
            raise RuntimeError(f"the seed exited:\n{(workdir / 'seed.log').read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path.name} did not appear within {timeout:.0f} s")
        time.sleep(0.2)
    return path.read_text()


def wait_trainers(wan: Wan, args: argparse.Namespace, workdir: Path, timeout: float) -> None:
    deadline, reported = time.monotonic() + timeout, -1
    trainers = wan.procs[1:]
    while any(p.poll() is None for p in trainers):
        if time.monotonic() > deadline:
            raise RuntimeError(f"trainers still running after {timeout:.0f} s")
        done = [int(line.split("Global step ")[1].split()[0]) for line in
                (workdir / "trainer-1.log").read_text(errors="replace").splitlines() if "Global step " in line]
        if done and done[-1] != reported:
            reported = done[-1]
            logger.info("  trainer 1 at global step %d of %d", reported, args.steps)
        time.sleep(1.0)
    failed = [i for i, p in enumerate(trainers, 1) if p.returncode != 0]
    if failed:
        tail = (workdir / f"trainer-{failed[0]}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"trainer {failed[0]} exited with status {trainers[failed[0] - 1].returncode}:\n{tail}")


def utilization(records: list[list[float]]) -> float:
    """Share of the time between the first and last optimizer step spent outside ``step()`` (computing)."""
    if len(records) < 2:
        return math.nan
    window = records[-1][0] + records[-1][1] - (records[0][0] + records[0][1])
    inside = sum(r[1] for r in records[1:])
    return 1.0 - inside / window if window > 0 else math.nan


def loss_curve(workdir: Path, peers: int) -> list[tuple[float, float]]:
    """(seconds since the first optimizer step of any trainer, mean loss of the trainers) per global step; the time
    is when the first trainer finished that step (a trainer that fell behind finishes it late, or never)."""
    timings = [json.loads((workdir / f"timing-{i}.json").read_text()) for i in range(1, peers + 1)]
    reports = [json.loads((workdir / f"report-{i}.json").read_text()) for i in range(1, peers + 1)]
    start = min(t[0][0] for t in timings if t)
    ends: dict[int, list[float]] = {}
    for records in timings:
        for begin, seconds, before, after in records:
            if after != before:
                ends.setdefault(int(before), []).append(begin + seconds - start)
    curve = []
    for step in sorted(ends):
        losses = [r["losses"][str(step)] for r in reports if str(step) in r["losses"]]
        if losses:
            curve.append((round(min(ends[step]), 2), round(mean(losses), 4)))
    return curve


def evaluate_saved(model_dir: Path, args: argparse.Namespace) -> float:
    from transformers import AutoModelForCausalLM

    from swarm.config import load_config
    from swarm.data import eval_batches
    from swarm.evaluation import evaluate
    from swarm.tokenizer import build_tokenizer

    config = load_config(args.config, args.set)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    batches = eval_batches(config.data, build_tokenizer(config.tokenizer), batch_size=8, max_batches=args.eval_batches)
    return evaluate(model, batches, step=args.steps).loss


def summarize(name: str, args: argparse.Namespace, workdir: Path, tx: list[int], wall_s: float) -> dict:
    timings = [json.loads((workdir / f"timing-{i}.json").read_text()) for i in range(1, args.peers + 1)]
    reports = [json.loads((workdir / f"report-{i}.json").read_text()) for i in range(1, args.peers + 1)]
    curve = loss_curve(workdir, args.peers)
    reached = [t for t, loss in curve if loss <= args.target_loss]
    outcomes = [r["outcome"] for r in reports[0]["rounds"]]
    every = [r["outcome"] for report in reports for r in report["rounds"]]
    utils = [utilization(t) for t in timings]
    return dict(
        variant=name, peers=args.peers, rate_mbit=args.rate_mbit, steps=args.steps, overrides=args.set,
        steps_reached=min(r["final_step"] for r in reports), run_wall_s=round(wall_s, 1),
        train_s=curve[-1][0] if curve else math.nan, target_loss=args.target_loss,
        time_to_target_s=reached[0] if reached else None, final_train_loss=curve[-1][1] if curve else math.nan,
        eval_loss=round(evaluate_saved(workdir / "model", args), 4) if (workdir / "model").is_dir() else None,
        utilization_mean=round(mean(utils), 3), utilization_min=round(min(utils), 3),
        rounds_averaged=outcomes.count("averaged"), rounds_total=len(outcomes),
        round_outcomes={o: outcomes.count(o) for o in sorted(set(outcomes))},
        round_outcomes_all_trainers={o: every.count(o) for o in sorted(set(every))},
        tx_bytes_per_trainer=int(mean(tx)), grad_codec_bytes_per_value=_grad_bpv(reports), curve=curve)


def _grad_bpv(reports: list[dict]) -> float:
    sent = [(r["wire"]["grad"]["sent_bytes"], r["wire"]["grad"]["sent_values"]) for r in reports]
    values = sum(v for _, v in sent)
    return round(sum(b for b, _ in sent) / values, 4) if values else math.nan


def run_variant(args: argparse.Namespace, name: str) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="swbench-train-"))
    overrides = variant_overrides(name) + args.set
    try:
        with Wan(args.peers + 1, rate_mbit=args.rate_mbit) as wan:
            begin = time.monotonic()
            start_swarm(wan, args, overrides, workdir)
            wait_trainers(wan, args, workdir, timeout=180 + 120 * args.steps)
            wall_s = time.monotonic() - begin
            tx = [wan.counters(i)[0] for i in range(1, args.peers + 1)]
            groups = [proc.pid for proc in wan.procs]
        return dict(summarize(name, args, workdir, tx, wall_s), process_groups=groups)
    finally:
        if args.keep_logs:
            shutil.copytree(workdir, Path(args.keep_logs) / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("model"))
        shutil.rmtree(workdir, ignore_errors=True)


def run_baseline(args: argparse.Namespace) -> dict:
    """One process, no swarm: ``--steps`` AdamW steps of ``target_batch_size`` samples in micro-batches, each
    micro-batch's gradient clipped as a trainer clips it, the same learning-rate schedule."""
    import torch

    from swarm.config import load_config
    from swarm.data import eval_batches, train_batches
    from swarm.evaluation import evaluate
    from swarm.model import build_model
    from swarm.optimizer import lr_lambda, optimizer_factory
    from swarm.tokenizer import build_tokenizer

    config = load_config(args.config, args.set)
    tokenizer = build_tokenizer(config.tokenizer)
    model = build_model(config.model, vocab_size=tokenizer.vocab_size)
    optimizer = optimizer_factory(config.optimizer)(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.optimizer))
    batches = train_batches(config.data, tokenizer, batch_size=args.batch_size, seed=0)
    micro = max(1, config.averaging.target_batch_size // args.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    curve, begin = [], time.monotonic()
    for step in range(args.steps):
        accumulated, losses = [torch.zeros_like(p) for p in params], []
        for _ in range(micro):
            batch = next(batches)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            if config.optimizer.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.optimizer.max_grad_norm)
            for acc, p in zip(accumulated, params):
                acc.add_(p.grad, alpha=1 / micro)
                p.grad = None
            losses.append(float(loss.detach()))
        for acc, p in zip(accumulated, params):
            p.grad = acc
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        curve.append((round(time.monotonic() - begin, 2), round(mean(losses), 4)))
        logger.info("  baseline step %d: loss %.3f", step, curve[-1][1])
    batches_eval = eval_batches(config.data, tokenizer, batch_size=8, max_batches=args.eval_batches)
    reached = [t for t, loss in curve if loss <= args.target_loss]
    return dict(variant="single-process", peers=1, rate_mbit=None, steps=args.steps, overrides=args.set,
                steps_reached=args.steps, train_s=curve[-1][0], target_loss=args.target_loss,
                time_to_target_s=reached[0] if reached else None, final_train_loss=curve[-1][1],
                eval_loss=round(evaluate(model, batches_eval, step=args.steps).loss, 4), curve=curve)


def resummarize(args: argparse.Namespace) -> int:
    if not args.json or not Path(args.json).is_file():
        print("error: --from-logs needs --json PATH of an earlier run", file=sys.stderr)
        return 2
    rows = json.loads(Path(args.json).read_text())
    for k, row in enumerate(rows):
        logs = Path(args.from_logs) / row["variant"]
        if "error" in row or not logs.is_dir():
            continue
        args.peers, args.steps, args.rate_mbit, args.set = row["peers"], row["steps"], row["rate_mbit"], row["overrides"]
        args.target_loss = row["target_loss"]
        fresh = summarize(row["variant"], args, logs, [row["tx_bytes_per_trainer"]], row["run_wall_s"])
        rows[k] = {**row, **fresh, "eval_loss": row["eval_loss"]}
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print_table([r for r in rows if "error" not in r])
    return 0


def print_table(rows: list[dict]) -> None:
    head = ("variant", "steps", "train s", "t(loss<=)", "train loss", "eval loss", "util", "util min", "averaged", "tx MB")
    print(" ".join(f"{h:>12}" for h in head))
    for r in rows:
        cells = (r["variant"], r["steps_reached"], r["train_s"], r["time_to_target_s"], r["final_train_loss"],
                 r["eval_loss"], r.get("utilization_mean", "-"), r.get("utilization_min", "-"),
                 f"{r.get('rounds_averaged', '-')}/{r.get('rounds_total', '-')}",
                 round(r["tx_bytes_per_trainer"] / 1e6, 1) if "tx_bytes_per_trainer" in r else "-")
        print(" ".join(f"{str(c):>12}" for c in cells))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_logs:
        return resummarize(args)
    try:
        if args.variant:
            require_root()
    except NotRoot as error:
        print(f"skipped: {error}", file=sys.stderr)
        return EXIT_SKIPPED
    raise_on_sigterm()
    sys.path.insert(0, str(Path(args.source).resolve()))  # the baseline and evaluation use --source's swarm/ too
    rows: list[dict] = []
    try:
        for k, name in enumerate(args.variant, 1):
            logger.info("[%d/%d] %s: %d trainers, %s Mbit/s, %d global steps", k, len(args.variant), name,
                        args.peers, args.rate_mbit, args.steps)
            try:
                rows.append(run_variant(args, name))
            except Exception as error:  # one failed variant must not lose the others' rows
                logger.error("%s failed: %s", name, error)
                rows.append(dict(variant=name, error=str(error)[:1000]))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
        if args.baseline:
            logger.info("single process, %d steps", args.steps)
            rows.append(run_baseline(args))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    except KeyboardInterrupt:
        logger.error("interrupted; namespaces and peers were removed")
        return 130
    print_table([r for r in rows if "error" not in r])
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
