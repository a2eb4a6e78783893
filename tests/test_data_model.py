"""Tokenizers, corpora and the model, single process: real files, real models, no mocks."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch

from swarm.config import DataConfig, ModelConfig, TokenizerConfig, load_config
from swarm.data import eval_batches, load_corpus, seed_from_peer_id, train_batches
from swarm.errors import SwarmError
from swarm.model import build_model, count_parameters
from swarm.tokenizer import ByteTokenizer, FileTokenizer, build_tokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BYTES = ByteTokenizer()


def tiny_model_config(**changes) -> ModelConfig:
    return load_config(CONFIGS / "tiny.yaml").model.model_copy(update=changes)


def first_batches(cfg: DataConfig, seed: int, count: int = 3, batch_size: int = 4) -> list[torch.Tensor]:
    return list(itertools.islice(train_batches(cfg, BYTES, batch_size=batch_size, seed=seed), count))


def test_byte_tokenizer_round_trip(tmp_path: Path) -> None:
    text = "def f(x):\n    return x  # naïve → ünïcödé 🐍\n"
    ids = BYTES.encode(text)
    assert all(0 <= i < 256 for i in ids) and BYTES.decode(ids) == text
    assert BYTES.decode([BYTES.eos_id, *ids, BYTES.eos_id]) == text
    assert BYTES.encode("\ud800") == [ord("?")]  # a lone surrogate is replaced, not an error
    BYTES.save(tmp_path)
    assert json.loads((tmp_path / "swarm_tokenizer.json").read_text())["vocab_size"] == 257


def test_stdlib_batches_have_the_right_shape() -> None:
    batch = first_batches(DataConfig(seq_len=64), seed=0, count=1, batch_size=8)[0]
    assert batch.shape == (8, 64) and batch.dtype == torch.long
    assert 0 <= int(batch.min()) and int(batch.max()) < BYTES.vocab_size


def test_data_order_follows_the_seed() -> None:
    cfg = DataConfig(seq_len=32)
    one, again, other = first_batches(cfg, 1), first_batches(cfg, 1), first_batches(cfg, 2)
    assert all(torch.equal(a, b) for a, b in zip(one, again))
    assert not torch.equal(one[0], other[0])
    assert seed_from_peer_id("QmPeer") == seed_from_peer_id(b"QmPeer") < 2**63
    assert seed_from_peer_id("QmPeer") != seed_from_peer_id("QmOther")


def test_eval_split_is_disjoint_and_stable() -> None:
    cfg = DataConfig(seq_len=64)
    first, second = load_corpus(cfg), load_corpus(cfg)
    assert first == second and first.eval
    assert not {d.identity for d in first.train} & {d.identity for d in first.eval}
    batches = eval_batches(cfg, BYTES, batch_size=4, max_batches=3)
    again = eval_batches(cfg, BYTES, batch_size=4, max_batches=3)
    assert len(batches) == 3 and all(torch.equal(a, b) for a, b in zip(batches, again))
    assert batches[0].shape == (4, 64)


def test_text_file_source(tmp_path: Path) -> None:
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(1500)]
    path = tmp_path / "book.txt"
    path.write_text("".join(lines))
    cfg = DataConfig(source=str(path), seq_len=16)
    corpus = load_corpus(cfg)
    assert len(corpus.train) + len(corpus.eval) >= 4 and corpus.eval  # cut into ~16 KiB documents
    text = "".join(d.read() for d in sorted(corpus.train + corpus.eval, key=lambda d: d.start))
    assert text == path.read_text()
    batch = first_batches(cfg, seed=0, count=1)[0]
    assert BYTES.decode(batch.flatten().tolist()) in path.read_text()  # 64 bytes from inside one document


def test_jsonl_source_holds_out_at_least_one_record(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"body": "alpha " * 20}) + "\n\n" + json.dumps({"body": "omega " * 20}) + "\n")
    cfg = DataConfig(source=str(path), text_field="body", seq_len=8)
    corpus = load_corpus(cfg)
    assert len(corpus.train) == 1 and len(corpus.eval) == 1
    assert {d.identity for d in corpus.train + corpus.eval} == {"records.jsonl:1", "records.jsonl:3"}
    held_out = BYTES.decode(eval_batches(cfg, BYTES, batch_size=2, max_batches=1)[0].flatten().tolist())
    trained = BYTES.decode(first_batches(cfg, seed=5, count=1, batch_size=2)[0].flatten().tolist())
    assert {held_out.split()[0], trained.split()[0]} == {"alpha", "omega"}


def test_directory_source(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("plain text " * 10)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json text " * 10}) + "\n")
    (tmp_path / "c.py").write_text("print('python')\n" * 5)
    (tmp_path / "d.md").write_text("# markdown\n" * 5)
    (tmp_path / "e.bin").write_bytes(b"\x00\x01")
    corpus = load_corpus(DataConfig(source=str(tmp_path), seq_len=8))
    names = sorted(d.identity for d in corpus.train + corpus.eval)
    assert names == ["b.jsonl:1", "c.py", "d.md:1", "sub/a.txt:1"]
    batch = first_batches(DataConfig(source=str(tmp_path), seq_len=8), seed=3, count=1)[0]
    assert batch.shape == (4, 8)


def test_bad_sources_name_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(SwarmError, match=re.escape(f"{bad}:2")):
        load_corpus(DataConfig(source=str(bad)))
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine"}\n')
    with pytest.raises(SwarmError, match=re.escape(f"{good}:1: no string field 'content'")):
        load_corpus(DataConfig(source=str(good), text_field="content"))
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(SwarmError, match=re.escape(str(missing))):
        train_batches(DataConfig(source=str(missing)), BYTES, batch_size=2, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SwarmError, match="no text"):
        load_corpus(DataConfig(source=str(tmp_path / "empty")))


def test_model_init_is_seeded_and_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    first = build_model(tiny_model_config(), vocab_size=257)
    assert torch.equal(torch.get_rng_state(), before)
    second = build_model(tiny_model_config(), vocab_size=257)
    other = build_model(tiny_model_config(init_seed=1), vocab_size=257)
    pairs = list(zip(first.state_dict().values(), second.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(first.transformer.wte.weight, other.transformer.wte.weight)
    assert 2_500_000 < count_parameters(first) < 4_000_000


def test_llama_builds_and_runs() -> None:
    model = build_model(tiny_model_config(architecture="llama", n_layer=1), vocab_size=257)
    batch = torch.randint(0, 257, (2, 16))
    assert torch.isfinite(model(input_ids=batch, labels=batch).loss)


def held_out_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        loss = sum(model(input_ids=batch, labels=batch).loss.item() for batch in batches) / len(batches)
    model.train()
    return loss


def test_tiny_model_learns_the_stdlib() -> None:
    """Held-out loss, not train-batch means: at lr 3e-3 and 512 tokens a step, single batches spike early."""
    data = DataConfig(seq_len=64)
    model = build_model(tiny_model_config(), vocab_size=257)
    held_out = eval_batches(data, BYTES, batch_size=8, max_batches=2)
    initial = held_out_loss(model, held_out)
    assert abs(initial - math.log(257)) < 0.3
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    for batch in itertools.islice(train_batches(data, BYTES, batch_size=8, seed=0), 30):
        loss = model(input_ids=batch, labels=batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad()
    assert held_out_loss(model, held_out) < initial - 0.75


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = build_model(tiny_model_config(n_layer=1), vocab_size=257)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = build_model(ModelConfig(checkpoint=str(tmp_path / "ckpt")), vocab_size=257)
    assert type(loaded) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(SwarmError, match="300"):
        build_model(ModelConfig(checkpoint=str(tmp_path / "ckpt")), vocab_size=300)
    with pytest.raises(SwarmError, match=re.escape(str(tmp_path / "missing"))):
        build_model(ModelConfig(checkpoint=str(tmp_path / "missing")), vocab_size=257)


def test_file_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"])
    hf.train_from_iterator(["def main():\n    return 0\n", "import os, sys\n"] * 20, trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))

    tokenizer = build_tokenizer(TokenizerConfig(kind="file", path=str(tmp_path / "tokenizer.json")))
    assert isinstance(tokenizer, FileTokenizer) and tokenizer.eos_id == 1
    text = "def main():\n    return os\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    tokenizer.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == (tmp_path / "tokenizer.json").read_text()
    source = tmp_path / "code.txt"
    source.write_text(text * 50)
    batch = next(train_batches(DataConfig(source=str(source), seq_len=8), tokenizer, batch_size=2, seed=0))
    assert batch.shape == (2, 8) and int(batch.max()) < tokenizer.vocab_size

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path in (broken, tmp_path / "absent.json"):
        with pytest.raises(SwarmError, match=re.escape(str(path))):
            build_tokenizer(TokenizerConfig(kind="file", path=str(path)))
