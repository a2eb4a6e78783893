"""A real swarm on 127.0.0.1: a seed, three trainers, a monitor and a malicious peer (tests/adversary.py); then
the seed leaves and a late joiner comes in through a trainer's address. One swarm serves several assertions,
because each one costs a minute of CPU on 2 cores.

The malicious peer lies about its progress (step 10**12, absurd samples and throughput), tries to forge others'
records, the config and the state-donor registry, signs a rival config for the same run, and serves a state of
another model to joiners. The honest trainers must advance one step per round with their learning-rate schedule
untouched; the forgeries must be refused; the late joiner must adopt the swarm's config, refuse the foreign
state and download a good one; the monitor must show finite figures and checkpoint the honest state.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import socket
import urllib.parse
import urllib.request
import re
import signal
from pathlib import Path

import hivemind
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import ROOT, TINY, PeerProcesses, report, scrape, swarm_cli_finish, swarm_cli_start, wait_for_step
from monitor.dashboard import dashboard_queries
from swarm import records
from swarm.config import load_config
from swarm.progress import read_trainer_records

pytestmark = pytest.mark.timeout(900)  # one module-wide swarm; slow on a loaded 2-core machine
STEPS = 8  # trainer-0 and trainer-1; enough for 30 s of Prometheus scrapes and two checkpoints
LATE_STEPS = 6  # room for a catch-up download, two missed rounds and two averaged ones
CHECKPOINT_EVERY = 4
_OPTIMIZER = load_config(TINY).optimizer
LR, WARMUP, TOTAL = _OPTIMIZER.lr, _OPTIMIZER.warmup_steps, _OPTIMIZER.total_steps  # the schedule, recomputed below


@pytest.fixture(scope="module")
def swarm_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("swarm")
    procs = PeerProcesses(work)
    try:
        procs.start("seed", "seed", "--config", TINY, "--addr-file", str(work / "seed.addr"))
        seed_addrs = procs.wait_file(work / "seed.addr", "seed")
        procs.start_script("adversary", ROOT / "tests" / "adversary.py", *seed_addrs, "--out",
                           str(work / "adversary.json"), "--lie-progress", "--forge", "--serve-foreign-state")
        for i in range(3):  # trainer-2 trains on until the late joiner is done (a joiner can take a minute to
            limit = ["--max-steps", str(STEPS)] if i < 2 else []  # start on a loaded machine)
            procs.start(f"trainer-{i}", "join", *seed_addrs, *limit, "--wait-for-peers", "3",
                        "--report-json", str(work / f"trainer-{i}.json"), "--save-model", str(work / f"model-{i}"),
                        "--addr-file", str(work / f"trainer-{i}.addr"))
        procs.start("monitor", "monitor", *seed_addrs, "--metrics-port", "0", "--poll-period", "1",
                    "--addr-file", str(work / "monitor.url"), "--checkpoint-dir", str(work / "checkpoints"),
                    "--checkpoint-every", str(CHECKPOINT_EVERY), "--keep", "2", "--eval-batches", "2")
        trainer_addrs = procs.wait_file(work / "trainer-0.addr", "trainer-0")
        monitor_url = procs.wait_file(work / "monitor.url", "monitor")[0]
        prometheus = start_prometheus(procs, work, monitor_url) if shutil.which("prometheus") else None
        wait_for_step(procs, "trainer-0", 1)
        procs.stop("seed")  # the swarm must not need its seed any more
        assert procs.wait("seed", 30) == 0
        procs.start("late", "join", *trainer_addrs, "--max-steps", str(LATE_STEPS),
                    "--report-json", str(work / "late.json"), "--save-model", str(work / "late-model"))
        # `swarm status` runs beside what follows: run before the scrape, it once took long enough for trainer-0
        # and trainer-1 to finish step 8 and leave, and the monitor then saw two trainers
        status_run = procs.procs["status"] = swarm_cli_start("status", *trainer_addrs)
        metrics = read_records(trainer_addrs)  # while the trainers run: records expire after they leave
        wait_for_step(procs, "trainer-0", 4)
        exposition = scrape(monitor_url)
        if prometheus:
            wait_for_step(procs, "trainer-0", STEPS - 1)  # 30 s of scrapes or more: enough for the [1m] rates
        dashboard = query_dashboard(prometheus) if prometheus else None
        status = swarm_cli_finish(status_run, timeout=120)
        codes = {name: procs.wait(name, 300) for name in ["trainer-0", "trainer-1", "late"]}
        left = read_records(procs.wait_file(work / "trainer-2.addr", "trainer-2"))  # (the late joiner just left)
        late_exposition = scrape(monitor_url)  # (while trainer-2 trains: a swarm with no trainer has no step)
        procs.stop("trainer-2", signal.SIGINT)
        codes["trainer-2"] = procs.wait("trainer-2", 60)
        final_exposition = scrape(monitor_url)  # (no checkpoint after this one: no trainer is left)
        procs.stop("monitor")
        assert procs.wait("monitor", 90) == 0, procs.log("monitor")[-3000:]
        procs.wait_file(work / "adversary.json", "adversary", timeout=60)
        yield argparse.Namespace(work=work, procs=procs, codes=codes, records=metrics, status=status,
                                 exposition=exposition, late_exposition=late_exposition,
                                 final_exposition=final_exposition, dashboard=dashboard, records_after_leaving=left)
    finally:
        procs.close()


def read_records(addresses: list[str]) -> dict:
    """Read the trainers' progress records as a monitor would (they live for timeouts.record_ttl)."""
    key = hivemind.utils.crypto.RSAPrivateKey()
    dht = hivemind.DHT(initial_peers=addresses, client_mode=True, start=True,
                       record_validators=records.base_validators(key) + records.run_validators("tiny"))
    try:
        return read_trainer_records(dht, "tiny")
    finally:
        dht.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_prometheus(procs: PeerProcesses, work: Path, monitor_url: str) -> str:
    """A real Prometheus on 127.0.0.1 scraping the monitor every second; returns its base URL."""
    target = urllib.parse.urlsplit(monitor_url).netloc
    config = work / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: swarm\n"
                      f"    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    procs.start_program("prometheus", ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{port}"])
    return f"http://127.0.0.1:{port}"


def query_dashboard(prometheus: str, patience: float = 90) -> dict[str, list]:
    """Every dashboard query, answered by Prometheus' HTTP API: {expr: result vector}. Queries still empty, and
    rates still zero, are asked again while the swarm runs (the first checkpoint's eval loss may still be on its
    way; a young series may not have risen yet)."""
    import time

    def pending(expr: str) -> bool:
        return not answers.get(expr) or expr.startswith("rate(") and all(
            float(r["value"][1]) == 0 for r in answers[expr])

    answers, deadline = {}, time.monotonic() + patience
    while True:
        for _, expr in dashboard_queries():
            if not pending(expr):
                continue
            url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
            assert body["status"] == "success", body
            answers[expr] = body["data"]["result"]
        if not any(pending(expr) for expr in answers) or time.monotonic() > deadline:
            return answers
        time.sleep(2)


def sample(exposition: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", exposition, re.MULTILINE)
    assert match, f"{name} not in:\n{exposition}"
    return float(match.group(1))


def test_trainers_and_late_joiner_exit_cleanly(swarm_run):
    codes = swarm_run.codes
    assert codes == {"trainer-0": 0, "trainer-1": 0, "trainer-2": 0, "late": 0}, {
        name: swarm_run.procs.log(name)[-2000:] for name, code in codes.items() if code
    }


def test_every_step_averaged_by_at_least_two_peers(swarm_run):
    work = swarm_run.work
    by_step: dict[int, list[dict]] = {}
    for name in ["trainer-0", "trainer-1", "trainer-2"]:
        result = report(work, name)
        assert result["final_step"] - result["start_step"] >= STEPS
        rounds = [r for r in result["rounds"] if r["step"] < STEPS]  # (trainer-2 went on with the late joiner)
        for round_ in rounds:
            by_step.setdefault(round_["step"], []).append(round_)
        outcomes = [r["outcome"] for r in rounds]
        # a trainer may miss a round and catch up, two at most (one that starts a moment late, or one starved of CPU
        # while the seed leaves and the late joiner starts: it can fail a round, then find the others done with the
        # next step and call its round off, or skip it while it downloads); it averages the rest
        assert outcomes.count("averaged") >= STEPS - 2, f"{name}: {result['rounds']}"
        # (on a loaded machine hivemind may return one round partly averaged: "received 9x% results")
        assert outcomes.count("partial") <= 1, f"{name}: {result['rounds']}"
    for step in range(STEPS):
        averaged = [r for r in by_step.get(step, []) if r["outcome"] == "averaged" and r["group_size"] >= 2]
        assert len(averaged) >= 2, f"global step {step} was not averaged by >= 2 peers: {by_step.get(step)}"


def test_gradients_travel_as_8_bit(swarm_run):
    work = swarm_run.work
    grad = report(work, "trainer-0")["wire"]["grad"]
    assert grad["sent_values"] > 0
    assert 1.0 <= grad["sent_bytes"] / grad["sent_values"] < 1.1  # blockwise 8-bit; fp32 would be 4
    assert "BLOCKWISE_8BIT" in grad["by_codec"]


def test_parameters_agree_after_state_averaging(swarm_run):
    work = swarm_run.work
    models = [load_file(work / f"model-{i}" / "model.safetensors") for i in range(2)]  # (trainer-2 went on)
    reference = models[0]
    for other in models[1:]:
        assert other.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.isfinite(tensor).all()
            torch.testing.assert_close(other[name], tensor, atol=2e-3, rtol=1e-2, msg=f"{name} differs")
    initial_gap = max((t.float().std() for t in reference.values() if t.numel() > 1000))
    assert initial_gap > 0  # the models are not trivially zero


def test_training_loss_falls(swarm_run):
    work = swarm_run.work
    losses: dict[int, list[float]] = {}
    for i in range(3):
        for step, loss in report(work, f"trainer-{i}")["losses"].items():
            if int(step) < STEPS:
                losses.setdefault(int(step), []).append(loss)
    means = [sum(losses[step]) / len(losses[step]) for step in sorted(losses)]
    # (the median of the last three steps: one step's loss can spike, as Adam's can, for the whole swarm)
    assert sorted(means[-3:])[1] < means[0] - 0.5, losses


def test_late_joiner_downloads_state_through_a_trainer(swarm_run):
    work, procs = swarm_run.work, swarm_run.procs
    late = report(work, "late")
    assert late["start_step"] >= 2, "the late joiner should start from the swarm's step, not from 0"
    assert late["final_step"] - late["start_step"] >= LATE_STEPS
    # in sync within one global step, and its next round averaged with the swarm (issue 4, item 3). The step it
    # joins at may end while its download lands (it is behind: skipped, and it downloads again). The round of the
    # step its last download brings is averaged (partial: a reducer's stream that broke off, which hivemind reports
    # as such, see README), also when the download lands within a matchmaking time of the step's end (tiny.yaml's
    # 4 s steps are shorter than a 3 s download plus a 3 s matchmaking): it joined that round before downloading.
    # Having stepped a second or two after the others, it may then miss up to two rounds on this loaded machine
    # (README, "Not yet"); the last two are averaged.
    rounds = late["rounds"]
    caught_up = max((k for k, r in enumerate(rounds) if r["outcome"] == "skipped"), default=-1) + 1
    assert caught_up <= 2 and len(rounds) >= caught_up + 3, rounds
    averaged = [r["outcome"] in ("averaged", "partial") and r["group_size"] >= 2 for r in rounds[caught_up:]]
    assert averaged[0] and averaged[-2:] == [True, True] and averaged.count(False) <= 2, rounds
    assert "Joined swarm 'tiny'" in procs.log("late")
    for name, tensor in load_file(work / "late-model" / "model.safetensors").items():
        assert torch.isfinite(tensor).all(), name


def test_a_trainer_that_leaves_withdraws_its_record(swarm_run):
    # read through trainer-2 once trainer-0, trainer-1 and the late joiner had exited, within their records'
    # lifetime (timeouts.record_ttl): only trainer-2's own record is left
    assert len(swarm_run.records_after_leaving) == 1, swarm_run.records_after_leaving


def test_a_joiner_refuses_a_foreign_state_and_takes_a_good_one(swarm_run):
    work, procs = swarm_run.work, swarm_run.procs
    adversary = json.loads((work / "adversary.json").read_text())["peer_id"]
    log = procs.log("late")
    assert re.search(rf"Refusing the state served by peer {adversary}: its parameters differ", log), log[-3000:]
    # once refused, it is tried after every other donor: again only when all of those failed to serve
    refusals = len(re.findall(rf"Refusing the state served by peer {adversary}", log))
    assert refusals <= 1 + log.count("Could not download the state from"), log[-3000:]


def test_a_newcomer_follows_the_swarms_config_not_a_rival(swarm_run):
    work, procs = swarm_run.work, swarm_run.procs
    seed_fingerprint = re.search(r"is up \(config (\w+)\)", procs.log("seed")).group(1)
    joined = re.search(r"Joined swarm 'tiny' \(config (\w+)\)", procs.log("late")).group(1)
    assert joined == seed_fingerprint
    rival = json.loads((work / "adversary.json").read_text())
    assert rival["attempts"]["rival_config"]  # (anyone may sign a config: it is the choice that matters)
    assert "keys sign a config for run 'tiny'" in procs.log("late")


def scheduled_lr(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / (WARMUP + 1)
    progress = min(1.0, (step - WARMUP) / (TOTAL - WARMUP))
    return LR * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("name", ["trainer-0", "trainer-1", "trainer-2"])
def test_lying_progress_moves_no_one_ahead(swarm_run, name):
    result = report(swarm_run.work, name)
    final = result["final_step"]
    assert result["start_step"] == 0 and final >= STEPS and (final == STEPS or name == "trainer-2"), result
    # (a trainer slowed down by the shared CPU may fall behind its honest peers and download their state: that is
    # catching up, never a jump toward the liar's step)
    steps = [r["step"] for r in result["rounds"]] + [int(step) for step in result["losses"]]
    assert max(steps) < final <= 100, result["rounds"]
    assert result["lr"] == pytest.approx(scheduled_lr(final), rel=1e-6)  # the schedule follows the real step
    assert re.search(r"Ignoring peer \w+'s progress for 600 s: implausible claims .*'epoch': 1000000000000",
                     swarm_run.procs.log(name))


def test_forgeries_are_refused(swarm_run):
    result = json.loads((swarm_run.work / "adversary.json").read_text())
    attempts = result["attempts"]
    refused = {name: ok for name, ok in attempts.items() if name != "rival_config"}
    assert not any(refused.values()), attempts
    assert result["victim_step_after"] != 10**6


def test_progress_records_in_the_dht(swarm_run):
    metrics = swarm_run.records
    assert metrics, "no trainer progress records found in the DHT"
    for record in metrics.values():
        assert record.step >= 1
        assert record.bytes_sent > 0 and record.rounds_averaged >= 1
        assert record.device == "cpu-fp32"


def test_status_shows_the_running_swarm(swarm_run):
    status = swarm_run.status
    assert status.returncode == 0, status.stderr[-2000:]
    assert "swarm 'tiny'" in status.stdout and "global step" in status.stdout
    assert re.search(r"trainers [34]\b", status.stdout), status.stdout  # the late joiner may be in already
    assert status.stdout.count("cpu-fp32") >= 3


def test_monitor_exports_the_swarm(swarm_run):
    exposition = swarm_run.exposition
    assert sample(exposition, "swarm_up") == 1
    assert sample(exposition, "swarm_peers") >= 3
    assert sample(exposition, "swarm_step") >= 3
    assert sample(exposition, 'swarm_averaging_rounds_total{outcome="averaged"}') >= 3
    assert sample(exposition, "swarm_averaging_sent_bytes_total") > 0
    assert sample(exposition, "swarm_samples_per_second") > 0
    assert 0 < sample(exposition, 'swarm_loss{stat="median"}') < 6
    info = next(line for line in exposition.splitlines() if line.startswith("swarm_run_info{"))
    assert 'run_id="tiny"' in info and 'model="gpt2-4x256"' in info and info.endswith(" 1.0")
    assert "NaN" not in exposition and "Inf" not in exposition


def test_the_monitor_shows_finite_figures_despite_the_liar(swarm_run):
    for exposition in (swarm_run.exposition, swarm_run.late_exposition, swarm_run.final_exposition):
        values = [line.rsplit(" ", 1)[1] for line in exposition.splitlines() if line and not line.startswith("#")]
        assert values and all(math.isfinite(float(v)) for v in values), exposition
    for exposition in (swarm_run.exposition, swarm_run.late_exposition):  # (the final one: no trainer, no step)
        assert sample(exposition, "swarm_step") < 10**6


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (.ci/run installs Debian's prometheus)")
def test_monitor_output_passes_promtool(swarm_run):
    for text in (swarm_run.exposition, swarm_run.late_exposition, swarm_run.final_exposition):
        result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (.ci/run installs it)")
def test_every_dashboard_query_returns_data_from_a_real_prometheus(swarm_run):
    dashboard = swarm_run.dashboard
    assert dashboard, "no dashboard queries"
    empty = [expr for expr, result in dashboard.items() if not result]
    assert not empty, f"dashboard queries without data: {empty}"
    values = {expr: [float(r["value"][1]) for r in result] for expr, result in dashboard.items()}
    assert all(v == 1 for v in values["swarm_up"])
    assert 0 < min(values["swarm_eval_loss"]) < 6
    assert min(values["swarm_peers"]) >= 3
    assert max(values["rate(swarm_averaging_sent_bytes_total[1m])"]) > 0
    assert all(math.isfinite(v) for vs in values.values() for v in vs)


def test_monitor_checkpoints_load_with_from_pretrained(swarm_run):
    work = swarm_run.work
    root = work / "checkpoints"
    kept = sorted(path.name for path in root.glob("step-*"))
    assert 1 <= len(kept) <= 2, kept  # --keep 2
    latest = (root / "latest").resolve()
    assert latest.name == kept[-1] and not list(root.glob(".tmp-*"))
    state = json.loads((latest / "swarm_state.json").read_text())
    assert state["step"] >= CHECKPOINT_EVERY and latest.name == f"step-{state['step']:08d}"
    assert state["run_id"] == "tiny" and state["num_params"] == 3_258_112
    model = AutoModelForCausalLM.from_pretrained(root / "latest")
    assert sum(p.numel() for p in model.parameters()) == 3_258_112
    assert all(torch.isfinite(p).all() for p in model.parameters())
    optimizer = load_file(latest / "optimizer.safetensors")
    assert optimizer["transformer.wte.weight/exp_avg_sq"].shape == (257, 256)
    assert all(torch.isfinite(t).all() for t in optimizer.values())
    assert optimizer["transformer.wte.weight/exp_avg_sq"].abs().sum() > 0  # trained moments, not fresh zeros
    assert yaml.safe_load((latest / "swarm_config.yaml").read_text())["run_id"] == "tiny"
    assert json.loads((latest / "swarm_tokenizer.json").read_text())["vocab_size"] == 257


def test_checkpoints_are_evaluated_and_exported(swarm_run):
    work, procs, final_exposition = swarm_run.work, swarm_run.procs, swarm_run.final_exposition
    latest = (work / "checkpoints" / "latest").resolve()
    evaluation = json.loads((latest / "eval.json").read_text())
    assert 0 < evaluation["loss"] < 5.0, evaluation  # below a fresh model's ~5.5
    assert evaluation["perplexity"] == pytest.approx(math.exp(evaluation["loss"]))
    assert evaluation["step"] == json.loads((latest / "swarm_state.json").read_text())["step"]
    assert sample(final_exposition, "swarm_eval_loss") == pytest.approx(evaluation["loss"])
    assert sample(final_exposition, "swarm_checkpoint_step") == evaluation["step"]
    assert sample(final_exposition, "swarm_checkpoint_failures_total") == 0, procs.log("monitor")[-3000:]


def test_seed_resumes_a_swarm_from_a_checkpoint(swarm_run, tmp_path):
    work = swarm_run.work
    step = json.loads((work / "checkpoints" / "latest" / "swarm_state.json").read_text())["step"]
    procs = PeerProcesses(tmp_path)
    try:
        procs.start("seed", "seed", "--resume", str(work / "checkpoints"), "--addr-file", str(tmp_path / "seed.addr"))
        addrs = procs.wait_file(tmp_path / "seed.addr", "seed")
        # before any trainer publishes a digest, a donor offering another model at the checkpoint's step, ranked
        # above the seed: only the seed's signed digest of its checkpoint can tell the joiners which state is right
        procs.start_script("adversary", ROOT / "tests" / "adversary.py", *addrs, "--out",
                           str(tmp_path / "adversary.json"), "--serve-foreign-state", "--claim-step", str(step))
        adversary = json.loads(procs.wait_file(tmp_path / "adversary.json", "adversary", timeout=120)[0])["peer_id"]
        for i in range(2):
            procs.start(f"trainer-{i}", "join", *addrs, "--max-steps", "1", "--wait-for-peers", "2",
                        "--report-json", str(tmp_path / f"trainer-{i}.json"))
        codes = {name: procs.wait(name, 240) for name in ["trainer-0", "trainer-1"]}
        assert codes == {"trainer-0": 0, "trainer-1": 0}, {name: procs.log(name)[-2000:] for name in codes}
        assert f"Resuming from {work / 'checkpoints'}" in procs.log("seed")
        refusals = [re.findall(rf"Refusing the state served by peer {adversary}: its parameters differ from (the "
                               "digest of the checkpoint the seed serves|what 1 trainers publish)", procs.log(name))
                    for name in ["trainer-0", "trainer-1"]]
    finally:
        procs.close()
    assert not procs.leftovers(), [p.cmdline() for p in procs.leftovers()]
    # each refused it (the first to download by the seed's digest; the other maybe by the first one's)
    assert all(refusals) and "the digest of the checkpoint the seed serves" in sum(refusals, []), refusals
    resumed = [report(tmp_path, f"trainer-{i}") for i in range(2)]
    for trainer in resumed:
        assert trainer["start_step"] == step and trainer["final_step"] == step + 1, trainer
        assert trainer["rounds"][0]["group_size"] == 2, trainer["rounds"]  # the two averaged together
    # and at least one of them received every part: on a loaded machine the other's stream from a reducer can end
    # partway (seen once in a clean clone: "received 92.0% results"; hivemind then keeps its own values there)
    outcomes = sorted(trainer["rounds"][0]["outcome"] for trainer in resumed)
    assert outcomes in (["averaged", "averaged"], ["averaged", "partial"]), [t["rounds"] for t in resumed]
    first_loss = sum(trainer["losses"][str(step)] for trainer in resumed) / 2
    assert first_loss < 4.5, [trainer["losses"] for trainer in resumed]  # a fresh model starts near 5.5


def test_no_helper_process_outlives_the_swarm(swarm_run):
    procs = swarm_run.procs
    procs.close()
    assert not procs.leftovers(), [p.cmdline() for p in procs.leftovers()]
