"""Checkpoint files on their own: optimizer state by name, the last K kept, an unwritable or full disk, a second
writer, kill -9 in the middle of saves, and pickles never read. The swarm-level checks (the monitor saving a live
swarm's state, from_pretrained, resuming a swarm) are in test_swarm.py."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import swarm_cli
from swarm.checkpoint import (
    CheckpointError,
    CheckpointStore,
    load_optimizer,
    load_weights,
    optimizer_tensors,
    read_state,
    resolve,
    write_checkpoint,
)
from swarm.config import ModelConfig, OptimizerConfig
from swarm.errors import SwarmError
from swarm.evaluation import evaluate
from swarm.model import build_model
from swarm.optimizer import optimizer_factory
from swarm.tokenizer import ByteTokenizer

SMALL = ModelConfig(n_layer=1, n_head=2, d_model=32, max_seq_len=32)


def trained(cfg: ModelConfig = SMALL, steps: int = 2):
    model = build_model(cfg, vocab_size=257)
    optimizer = optimizer_factory(OptimizerConfig())(model.parameters())
    batch = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def save(store: CheckpointStore, step: int, model, optimizer) -> Path:
    return store.save(step, lambda tmp: write_checkpoint(
        tmp, model=model, optimizer=optimizer, tokenizer=ByteTokenizer(), config_yaml="run_id: test\n",
        state=dict(step=step, run_id="test"), evaluation=dict(step=step, loss=1.0, perplexity=2.7)))


def names(model) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def test_optimizer_state_round_trips_by_parameter_name(tmp_path):
    model, optimizer = trained()
    store = CheckpointStore(tmp_path, keep=1).open()
    path = save(store, 7, model, optimizer)
    fresh = build_model(SMALL, vocab_size=257)
    fresh_optimizer = optimizer_factory(OptimizerConfig())(fresh.parameters())
    load_weights(fresh, path)
    load_optimizer(fresh_optimizer, names(fresh), path)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    saved, loaded = optimizer_tensors(optimizer, names(model)), optimizer_tensors(fresh_optimizer, names(fresh))
    assert saved.keys() == loaded.keys() and any(key.endswith("/exp_avg_sq") for key in saved)
    for key in saved:
        torch.testing.assert_close(saved[key], loaded[key], msg=key)
    assert read_state(path)["step"] == 7
    assert AutoModelForCausalLM.from_pretrained(path) is not None


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    model, optimizer = trained()
    path = save(CheckpointStore(tmp_path, keep=1).open(), 1, model, optimizer)
    other = build_model(ModelConfig(n_layer=1, n_head=2, d_model=64, max_seq_len=32), vocab_size=257)
    with pytest.raises(CheckpointError, match="shape"):
        load_weights(other, path)
    deeper = build_model(ModelConfig(n_layer=2, n_head=2, d_model=32, max_seq_len=32), vocab_size=257)
    with pytest.raises(CheckpointError, match="does not fit the config's model"):
        load_weights(deeper, path)
    deeper_optimizer = optimizer_factory(OptimizerConfig())(deeper.parameters())
    with pytest.raises(CheckpointError, match="no optimizer state for parameter"):
        load_optimizer(deeper_optimizer, names(deeper), path)


def test_keeps_the_last_k_and_points_latest_at_the_newest(tmp_path):
    model, optimizer = trained()
    store = CheckpointStore(tmp_path, keep=2).open()
    for step in (3, 6, 9, 12):
        save(store, step, model, optimizer)
    assert [step for step, _ in store.checkpoints()] == [9, 12]
    assert os.readlink(tmp_path / "latest") == "step-00000012"
    assert resolve(tmp_path) == (tmp_path / "step-00000012").resolve()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_one_writer_per_directory(tmp_path):
    first = CheckpointStore(tmp_path, keep=1).open()
    with pytest.raises(CheckpointError, match="another process is writing checkpoints"):
        CheckpointStore(tmp_path, keep=1).open()
    first.close()
    CheckpointStore(tmp_path, keep=1).open().close()


def test_an_unwritable_directory_is_reported_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write checkpoints to"):
        CheckpointStore(blocker / "checkpoints", keep=1).open()
    # from the command line: before connecting to anything, one line, exit 2
    result = swarm_cli("monitor", "/ip4/127.0.0.1/tcp/9/p2p/QmaCpDMGvV2BGHeYERUEnRQAwe3N8SzbUtfsmvsqQLuvuJ",
                       "--checkpoint-dir", str(blocker / "checkpoints"), timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot write checkpoints to") and result.stderr.count("\n") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs to fill needs root")
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    store = CheckpointStore(disk, keep=3)
    try:
        model, optimizer = trained()
        store.open()
        first = save(store, 1, model, optimizer)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # leave 64 KiB: less than one checkpoint
        with pytest.raises(CheckpointError, match=r"step 2 .*the disk is full; kept the previous checkpoint .*step-00000001"):
            save(store, 2, model, optimizer)
        assert resolve(disk) == first.resolve() and read_state(first)["step"] == 1
        assert not [p for p in disk.iterdir() if p.name.startswith(".tmp-step")]
        load_weights(build_model(SMALL, vocab_size=257), resolve(disk))
        (disk / "filler").unlink()
        assert read_state(save(store, 3, model, optimizer))["step"] == 3  # space again: saving resumes
    finally:
        store.close()
        subprocess.run(["umount", str(disk)], check=True)


WRITER = """
import sys, torch
sys.path[:0] = [{root!r}, {root!r} + "/tests"]
from test_checkpoints import trained, save
from swarm.checkpoint import CheckpointStore
model, optimizer = trained()
step = int(sys.stdin.readline())  # (started ahead of its turn: it opens the store when told the step to go on from)
store = CheckpointStore({directory!r}, keep=2).open()
print("ready", flush=True)
while True:
    step += 1
    save(store, step, model, optimizer)
"""


def test_kill_9_during_saves_always_leaves_a_loadable_latest(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    script = WRITER.format(root=root, directory=str(tmp_path / "ckpt"))
    rng = random.Random(1234)
    step, kills, mid_save = 0, 0, 0
    # all four start at once (their imports overlap); each opens the store only when its turn comes
    writers = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, cwd=root) for _ in range(4)]
    try:
        for writer in writers:
            writer.stdin.write(f"{step * 1000}\n")
            writer.stdin.flush()
            assert writer.stdout.readline().strip() == "ready", "the writer did not start"
            time.sleep(rng.uniform(0.05, 1.0))  # somewhere inside a save: they take ~50 ms each
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            kills += 1
            step += 1
            scratch = [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith((".tmp-step", ".old-"))]
            mid_save += bool(scratch)
            if not (tmp_path / "ckpt" / "latest").exists():
                continue  # killed before the first save finished
            latest = resolve(tmp_path / "ckpt")
            model = build_model(SMALL, vocab_size=257)
            load_weights(model, latest)
            load_optimizer(optimizer_factory(OptimizerConfig())(model.parameters()), names(model), latest)
            assert read_state(latest)["step"] >= 1
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
            writer.wait()
            writer.stdin.close()
            writer.stdout.close()
    assert kills == 4 and mid_save >= 1, "no kill landed inside a save"  # saves fill nearly all the writer's time
    assert (tmp_path / "ckpt" / "latest").exists(), "no save finished in 4 runs"
    CheckpointStore(tmp_path / "ckpt", keep=2).open().close()  # scratch from the kills is cleared on open
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_pickles_are_never_read(tmp_path):
    model, _ = trained()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="pickles are never loaded"):
        resolve(tmp_path)
    result = swarm_cli("seed", "--resume", str(tmp_path), timeout=60)
    assert result.returncode == 2 and "pickles are never loaded" in result.stderr and result.stderr.count("\n") == 1
    with pytest.raises(SwarmError, match="cannot load model.checkpoint"):
        build_model(ModelConfig(checkpoint=str(tmp_path)), vocab_size=257)


def test_resume_from_a_missing_checkpoint_is_one_line(tmp_path):
    result = swarm_cli("seed", "--resume", str(tmp_path / "nowhere"), timeout=60)
    assert result.returncode == 2 and result.stderr == f"error: checkpoint {tmp_path / 'nowhere'} does not exist\n"
    result = swarm_cli("seed", timeout=60)
    assert result.returncode == 2 and "pass --config FILE" in result.stderr


def test_evaluation_is_token_weighted_and_restores_training_mode():
    model, _ = trained()
    model.train()
    batches = [torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = evaluate(model, batches, step=5)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = sum(float(model(input_ids=b, labels=b).loss) for b in batches) / 3
    assert result.loss == pytest.approx(expected, rel=1e-5) and result.tokens == 3 * 4 * 15
    assert result.perplexity == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert evaluate(model, [], step=5) is None


def test_a_monitor_that_saves_nothing_backs_off(tmp_path, monkeypatch):
    """Each checkpoint attempt downloads the whole state: after attempts that saved nothing (no newer state, or one
    refused) the monitor waits twice as long each time, up to a bound, and at once resumes its pace after a save."""
    import types

    from monitor import checkpoints

    clock, attempts, saves = [0.0], [], iter([False] * 7 + [True, False])

    class Stop:  # one poll per wait, on a clock of our own; stops after 1,000 polls
        polls = 0

        def wait(self, poll):
            clock[0] += poll
            self.polls += 1
            return self.polls > 1000

    def checkpoint_once():
        attempts.append(clock[0])
        if next(saves, False):
            checkpointer.status = checkpoints.CheckpointStatus(step=1)
            return True
        return False

    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: clock[0])
    checkpointer = checkpoints.Checkpointer(None, types.SimpleNamespace(latest=lambda: None), every=1,
                                            step_source=lambda: 5, stop=Stop(), poll=1.0, retry_after=5.0,
                                            max_retry_after=60.0)
    checkpointer.checkpoint_once = checkpoint_once
    checkpointer.run()
    gaps = [round(b - a) for a, b in zip(attempts, attempts[1:])]
    assert gaps[:9] == [5, 10, 20, 40, 60, 60, 60, 1, 5], gaps  # (the save at the 8th: the next one a poll later)
