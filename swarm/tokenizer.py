"""Tokenizers the swarm trains with: a file-free byte tokenizer (the default) or a local ``tokenizer.json``.

Both share one small interface (``vocab_size``, ``eos_id``, ``encode``, ``decode``, ``save``) so the data
pipeline and the model never care which one is in use. Nothing here touches the network: a tokenizer is
either built in or read from a path the user gave.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterable, Protocol

from tokenizers import Tokenizer as HFTokenizer

from swarm.config import TokenizerConfig
from swarm.errors import SwarmError

logger = logging.getLogger(__name__)

BYTE_TOKENIZER_FILE = "swarm_tokenizer.json"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; id 256 is end-of-sequence (also used as BOS and padding)."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        """Record the tokenizer beside a checkpoint (there is nothing else to save)."""
        record = {"kind": "bytes", "vocab_size": self.vocab_size, "eos_id": self.eos_id}
        path = Path(directory) / BYTE_TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


class FileTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from a local ``tokenizer.json``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tokenizer = HFTokenizer.from_file(str(self.path))
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id: int = _find_eos(self._tokenizer, self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        """Copy ``tokenizer.json`` beside a checkpoint."""
        target = Path(directory) / "tokenizer.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)


def _find_eos(tokenizer: HFTokenizer, vocab_size: int) -> int:
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    logger.warning("tokenizer has none of %s; using the last id %d as end-of-sequence", EOS_CANDIDATES, vocab_size - 1)
    return vocab_size - 1


def build_tokenizer(cfg: TokenizerConfig) -> ByteTokenizer | FileTokenizer:
    """The tokenizer ``cfg`` names; a file that is missing or invalid raises SwarmError naming the path."""
    if cfg.kind == "bytes":
        return ByteTokenizer()
    path = Path(cfg.path or "")
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise SwarmError(f"tokenizer file {path} does not exist; set tokenizer.path to a local tokenizer.json")
    try:
        tokenizer = FileTokenizer(path)
    except Exception as error:  # tokenizers raises a bare Exception for every parse failure
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SwarmError(
            f"cannot read tokenizer file {path} ({reason}); point tokenizer.path at a valid Hugging Face tokenizer.json"
        ) from None
    if tokenizer.vocab_size < 1:
        raise SwarmError(f"tokenizer file {path} has an empty vocabulary; point tokenizer.path at a trained tokenizer")
    logger.debug("tokenizer %s: vocab %d, eos %d", path, tokenizer.vocab_size, tokenizer.eos_id)
    return tokenizer
