"""Training data: which documents a corpus holds, the train/eval split, and the token batches peers read.

A corpus is a sorted list of lazily read documents: the Python standard library's own sources (the default,
so a swarm trains with nothing to download), a local ``.txt`` / ``.jsonl`` file, or a directory of them.
The eval split is decided per document by a hash of its name, so every peer holds out the same documents;
each peer then reads the training documents in its own order (seeded from its peer id), tokenizing one
document at a time so that startup stays fast and memory stays small.

Documents: a ``.py`` file is one document, each non-empty ``.jsonl`` line is one (identity ``file:line``),
and ``.txt`` / ``.md`` files are cut at line boundaries into documents of about 16 KiB (identity
``file:first_line``), so that even a single text file has something to hold out.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from swarm.config import DataConfig
from swarm.errors import SwarmError
from swarm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
DIRECTORY_SUFFIXES = (".txt", ".jsonl", ".py", ".md")
STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
TEXT_CHUNK_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Document:
    """A byte range of a file (``end=None``: to the end), read only when its tokens are needed."""

    identity: str
    path: Path
    start: int = 0
    end: int | None = None
    text_field: str | None = None  # set for a .jsonl line: the record's field holding the text

    def read(self) -> str:
        with self.path.open("rb") as file:
            file.seek(self.start)
            raw = file.read() if self.end is None else file.read(self.end - self.start)
        if self.text_field is not None:
            return json.loads(raw)[self.text_field]
        return raw.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Corpus:
    train: list[Document]
    eval: list[Document]


def seed_from_peer_id(peer_id: str | bytes) -> int:
    """A stable 63-bit data-order seed from a peer id (the same on every machine and Python run)."""
    raw = peer_id.encode() if isinstance(peer_id, str) else bytes(peer_id)
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") >> 1


def load_corpus(cfg: DataConfig) -> Corpus:
    """List the documents of ``cfg.source`` and split them; raises SwarmError when there is nothing to read."""
    documents = _find_documents(cfg.source, cfg.text_field)
    if not documents:
        raise SwarmError(f"data.source {cfg.source}: no text found; give a non-empty .txt/.jsonl file or directory")
    corpus = _split(documents, cfg.eval_fraction)
    logger.debug("corpus %s: %d train / %d eval documents", cfg.source, len(corpus.train), len(corpus.eval))
    return corpus


def train_batches(cfg: DataConfig, tokenizer: Tokenizer, *, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, seq_len]`` LongTensors of training tokens, in an order fixed by ``seed``.

    Each pass over the training documents is shuffled with ``seed + pass``; documents are joined with EOS and
    cut into windows of ``seq_len`` tokens. The first ``seed % seq_len`` tokens are skipped so that peers
    differ even on a corpus of a few documents.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    corpus = load_corpus(cfg)
    logger.info("training data from %s: %d documents (+%d held out)", cfg.source, len(corpus.train), len(corpus.eval))
    return _stream(corpus.train, tokenizer, cfg.seq_len, batch_size, seed)


def _stream(
    documents: list[Document], tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int
) -> Iterator[torch.Tensor]:
    need = seq_len * batch_size
    buffer: list[int] = []
    skip = seed % seq_len
    for pass_index in itertools.count():
        order = list(documents)
        random.Random(seed + pass_index).shuffle(order)
        tokens_in_pass = 0
        for document in order:
            tokens = tokenizer.encode(document.read())
            tokens_in_pass += len(tokens)
            buffer.extend(tokens)
            buffer.append(tokenizer.eos_id)
            if skip:
                drop = min(skip, len(buffer))
                del buffer[:drop]
                skip -= drop
            while len(buffer) >= need:
                yield torch.tensor(buffer[:need], dtype=torch.long).view(batch_size, seq_len)
                del buffer[:need]
        if tokens_in_pass == 0:
            raise SwarmError("the training documents are all empty; point data.source at some text")


def eval_batches(cfg: DataConfig, tokenizer: Tokenizer, *, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """Up to ``max_batches`` batches from the held-out documents, identical on every peer.

    The last batch may have fewer than ``batch_size`` rows; an empty list means nothing was held out.
    """
    seq_len, corpus = cfg.seq_len, load_corpus(cfg)
    need = seq_len * batch_size * max_batches
    tokens: list[int] = []
    for document in corpus.eval:
        if len(tokens) >= need:
            break
        tokens.extend(tokenizer.encode(document.read()))
        tokens.append(tokenizer.eos_id)
    windows = min(len(tokens), need) // seq_len
    if windows == 0:
        logger.warning("no eval data: the held-out part of %s is shorter than %d tokens", cfg.source, seq_len)
        return []
    data = torch.tensor(tokens[: windows * seq_len], dtype=torch.long).view(windows, seq_len)
    return [chunk.clone() for chunk in data.split(batch_size)]


def _split(documents: list[Document], eval_fraction: float) -> Corpus:
    """Hold a document out when its identity hashes below ``eval_fraction``; keep both sides non-empty."""
    scores = [int(hashlib.sha256(d.identity.encode()).hexdigest()[:8], 16) / 2**32 for d in documents]
    held = [score < eval_fraction for score in scores]
    if len(documents) >= 2 and not any(held):
        held[scores.index(min(scores))] = True
    if all(held):
        held[scores.index(max(scores))] = False
    train = [d for d, out in zip(documents, held) if not out]
    return Corpus(train=train, eval=[d for d, out in zip(documents, held) if out])


def _find_documents(source: str, text_field: str) -> list[Document]:
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return [Document(name, root / name) for name in _walk(root, (".py",), STDLIB_SKIPPED_DIRS)]
    path = Path(source).expanduser()
    if path.is_dir():
        names = _walk(path, DIRECTORY_SUFFIXES, frozenset({"__pycache__"}))
        return [doc for name in names for doc in _file_documents(path / name, name, text_field)]
    if path.is_file():
        if path.suffix not in DIRECTORY_SUFFIXES:
            raise SwarmError(f"data.source {path}: unsupported file type; use a .txt, .jsonl, .md or .py file")
        return _file_documents(path, path.name, text_field)
    raise SwarmError(f"data.source {path} does not exist; use 'stdlib' or a local .txt/.jsonl file or directory")


def _walk(root: Path, suffixes: tuple[str, ...], skipped: frozenset[str]) -> list[str]:
    """Relative POSIX paths of the files under ``root`` with one of ``suffixes``, sorted."""
    names = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skipped and not d.startswith(".")]
        relative = Path(directory).relative_to(root)
        names.extend((relative / f).as_posix() for f in files if f.endswith(suffixes) and not f.startswith("."))
    return sorted(names)


def _file_documents(path: Path, name: str, text_field: str) -> list[Document]:
    try:
        if path.suffix == ".jsonl":
            return _jsonl_documents(path, name, text_field)
        if path.suffix in TEXT_SUFFIXES:
            return _text_documents(path, name)
        return [Document(name, path)] if path.stat().st_size else []
    except OSError as error:
        raise SwarmError(f"cannot read {path}: {error.strerror or error}; check data.source") from None


def _jsonl_documents(path: Path, name: str, text_field: str) -> list[Document]:
    documents, offset = [], 0
    with path.open("rb") as file:
        for line_number, line in enumerate(file, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise SwarmError(f"{path}:{line_number}: not valid JSON; each line must be one JSON object") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise SwarmError(
                    f"{path}:{line_number}: no string field {text_field!r}; set data.text_field to the text's field"
                )
            documents.append(Document(f"{name}:{line_number}", path, start, offset, text_field))
    return documents


def _text_documents(path: Path, name: str) -> list[Document]:
    """Cut a text file at line boundaries into documents of at least TEXT_CHUNK_BYTES (the last may be shorter)."""
    documents, start, first_line, offset = [], 0, 1, 0
    with path.open("rb") as file:
        for line_number, line in enumerate(file, 1):
            offset += len(line)
            if offset - start >= TEXT_CHUNK_BYTES:
                documents.append(Document(f"{name}:{first_line}", path, start, offset))
                start, first_line = offset, line_number + 1
    if offset > start:
        documents.append(Document(f"{name}:{first_line}", path, start, offset))
    return documents
