"""Checkpoints researchers can use: Hugging Face format with safetensors, written atomically, the last K kept.

A checkpoint root (``swarm monitor --checkpoint-dir ROOT``) looks like::

    ROOT/step-00000012/  config.json, generation_config.json, model.safetensors   (save_pretrained)
                         swarm_tokenizer.json or tokenizer.json                  (the swarm's tokenizer)
                         swarm_config.yaml                                       (the shared swarm config)
                         optimizer.safetensors                                   (optimizer state by parameter name)
                         swarm_state.json                                        (global step, run id, fingerprint)
                         eval.json                                               (held-out loss and perplexity)
    ROOT/latest -> step-00000012

Each checkpoint is written under ``ROOT/.tmp-*``, fsynced and renamed into place; ``latest`` is swapped
atomically afterwards and older checkpoints are renamed away before they are deleted. A kill at any moment
leaves the previous checkpoint whole. Only safetensors files are ever read: nothing is unpickled.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from swarm.errors import SwarmError
from swarm.files import fsync_dir, fsync_tree

logger = logging.getLogger(__name__)

LATEST = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "swarm_state.json"
CONFIG_FILE = "swarm_config.yaml"
EVAL_FILE = "eval.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_SCRATCH_PREFIXES = (".tmp-", ".old-")


class CheckpointError(SwarmError):
    """A checkpoint could not be written or read; the message says which and what to do."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointStore:
    """The checkpoints under one root directory, written by one process at a time (an flock on ROOT/.lock)."""

    def __init__(self, root: str | Path, *, keep: int):
        if keep < 1:
            raise CheckpointError(f"--keep must be at least 1, got {keep}")
        self.root, self.keep = Path(root).expanduser(), keep
        self._lock_fd: int | None = None

    def open(self) -> "CheckpointStore":
        """Create the root, take its lock and prove it writable now, not at the first save."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            probe = self.root / f".tmp-probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as error:
            self.close()
            raise CheckpointError(f"cannot write checkpoints to {self.root}: {error.strerror or error}; "
                                  "pick a writable --checkpoint-dir") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise CheckpointError(f"another process is writing checkpoints to {self.root}; "
                                  "give each monitor its own --checkpoint-dir") from None
        self._remove_scratch()
        return self

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Run ``write(tmp_dir)``, then publish the result as the checkpoint for ``step``.

        On failure (a full disk, say) the partial write is removed, the previous checkpoint stays, and the
        CheckpointError says so.
        """
        assert self._lock_fd is not None, "open() the store first"
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            write(tmp)
            fsync_tree(tmp)
            if final.exists():  # the same step again (a restarted monitor): replace it whole
                self._discard(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
            self._point_latest(final.name)
        except Exception as error:  # OSError, or a writer's own wrapping of one (safetensors: SafetensorError)
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest()
            kept = f"kept the previous checkpoint {previous[1]}" if previous else "there is no earlier checkpoint"
            raise CheckpointError(f"could not save the checkpoint for step {step} in {self.root}: "
                                  f"{_reason(error)}; {kept}") from None
        self._prune()
        return final

    def _point_latest(self, name: str) -> None:
        link = self.root / f".tmp-{LATEST}-{os.getpid()}"
        link.unlink(missing_ok=True)
        os.symlink(name, link)
        os.replace(link, self.root / LATEST)
        fsync_dir(self.root)

    def _prune(self) -> None:
        for _, path in self.checkpoints()[: -self.keep]:
            self._discard(path)

    def _discard(self, path: Path) -> None:
        """Rename first (atomic), then delete: a kill mid-delete never leaves a half checkpoint under a step name."""
        trash = self.root / f".old-{path.name}-{os.getpid()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_scratch(self) -> None:
        for path in self.root.iterdir():
            if path.name.startswith(_SCRATCH_PREFIXES):
                logger.info("Removing %s, left by an interrupted save", path.name)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _reason(error: Exception) -> str:
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
        return "the disk is full"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def write_checkpoint(directory: Path, *, model, optimizer: torch.optim.Optimizer, tokenizer, config_yaml: str,
                     state: dict, evaluation: dict | None = None) -> None:
    """Write every file of one checkpoint into ``directory`` (which the store then renames into place)."""
    model.save_pretrained(directory)
    tokenizer.save(directory)
    (directory / CONFIG_FILE).write_text(config_yaml)
    names = [name for name, _ in model.named_parameters()]
    save_file(optimizer_tensors(optimizer, names), str(directory / OPTIMIZER_FILE))
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    if evaluation is not None:
        (directory / EVAL_FILE).write_text(json.dumps(evaluation, indent=1) + "\n")


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as ``{"<parameter name>/<key>": tensor}`` (e.g. ``.../exp_avg``).

    Hyperparameters are not saved: they come from the swarm config, and the learning rate from the step.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(params) != len(names):
        raise ValueError(f"{len(names)} parameter names for {len(params)} optimizer parameters")
    tensors = {}
    for name, param in zip(names, params):
        for key, value in optimizer.state.get(param, {}).items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{name}/{key}"] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: Sequence[str],
                           tensors: dict[str, torch.Tensor], *, origin: str) -> None:
    """Put state saved by ``optimizer_tensors`` back, checking it covers exactly these parameters and shapes."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, (name, param) in enumerate(zip(names, params)):
        entry = {key.split("/")[-1]: value for key, value in tensors.items() if key.rsplit("/", 1)[0] == name}
        if not entry:
            raise CheckpointError(f"{origin} has no optimizer state for parameter {name}: was it saved from "
                                  "another model?")
        for key, value in entry.items():
            if value.dim() > 0 and value.shape != param.shape:
                raise CheckpointError(f"{origin}: optimizer state {name}/{key} has shape {tuple(value.shape)}, "
                                      f"the model's parameter has {tuple(param.shape)}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise CheckpointError(f"{origin}: optimizer state {name}/{key} is not finite")
        state[index] = entry
    known = {f"{name}/{key}" for name, entry in zip(names, state.values()) for key in entry}
    if set(tensors) - known:
        extra = sorted(set(tensors) - known)[:3]
        raise CheckpointError(f"{origin} has optimizer state for parameters this model lacks ({', '.join(extra)})")
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, given either itself or a checkpoint root (then its ``latest``)."""
    path = Path(path).expanduser()
    if (path / MODEL_FILE).is_file():
        return path
    if (path / LATEST / MODEL_FILE).is_file():
        return (path / LATEST).resolve()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path} holds pickle files only: checkpoints are read from safetensors "
                              f"({MODEL_FILE}), pickles are never loaded")
    raise CheckpointError(f"{path} is not a checkpoint: no {MODEL_FILE} in it, and no '{LATEST}' checkpoint below it")


def read_state(path: Path) -> dict:
    """The checkpoint's swarm_state.json (step, run id, ...)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        step = state["step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} has no readable {STATE_FILE} ({error}); it was not written by swarm") from None
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path / STATE_FILE}: step must be a non-negative integer, got {step!r}")
    return state


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy the checkpoint's weights into ``model`` (built from the same config), refusing any mismatch."""
    tensors = _load_safetensors(path / MODEL_FILE)
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(model.state_dict()))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{path} does not fit the config's model ({detail}): resume with the config it was "
                              "trained with (its swarm_config.yaml)")
    for name, param in expected.items():
        value = tensors[name]
        if value.shape != param.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(value.shape)}, the config's model has "
                                  f"{tuple(param.shape)}; resume with the config it was trained with")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: {name} is not finite; this checkpoint is damaged")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


def load_optimizer(optimizer: torch.optim.Optimizer, names: Sequence[str], path: Path) -> None:
    load_optimizer_tensors(optimizer, names, _load_safetensors(path / OPTIMIZER_FILE), origin=str(path))


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete") from None
    except (OSError, SafetensorError, ValueError) as error:
        raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from None


def now_state(*, step: int, run_id: str, fingerprint: str, num_params: int) -> dict:
    return dict(format=1, step=step, run_id=run_id, config_fingerprint=fingerprint, num_params=num_params,
                saved_at=time.time())

