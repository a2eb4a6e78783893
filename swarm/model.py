"""The causal language model every peer trains: built from ``ModelConfig`` sizes or loaded from a local checkpoint.

A fresh model is initialised from ``init_seed`` inside a forked RNG, on CPU in fp32, so every machine starts
from identical weights and the caller's random state is left as it was. A checkpoint is only ever read from
a local directory: nothing here reaches the network.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from swarm.config import ModelConfig
from swarm.errors import SwarmError

logger = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, *, vocab_size: int, eos_id: int | None = None) -> PreTrainedModel:
    """A causal LM in fp32 on CPU: ``cfg.checkpoint`` when set, else a fresh one seeded by ``cfg.init_seed``.

    ``eos_id`` (default: the last id) is recorded in the model config for generation.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    if cfg.checkpoint:
        model = _load_checkpoint(Path(cfg.checkpoint).expanduser(), vocab_size)
    else:
        eos = vocab_size - 1 if eos_id is None else eos_id
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(cfg.init_seed)  # CPU only: CUDA RNG stays untouched
            model = _fresh_model(cfg, vocab_size, eos)
        model.eval()  # like from_pretrained; the trainer calls .train()
        logger.debug("built %s: %d parameters, init_seed %d", cfg.architecture, count_parameters(model), cfg.init_seed)
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"  # the loss HF falls back to anyway, minus its "unrecognized" warning for GPT-2
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def _fresh_model(cfg: ModelConfig, vocab_size: int, eos: int) -> PreTrainedModel:
    special = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    if cfg.architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **special,
        )
        return GPT2LMHeadModel(config).float()
    if (cfg.d_model // cfg.n_head) % 2:
        raise SwarmError(
            f"model.d_model / model.n_head = {cfg.d_model // cfg.n_head} must be even for llama (rotary embeddings)"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=_round_up(4 * cfg.d_model, 8),
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.max_seq_len,
        attention_dropout=cfg.dropout,
        **special,
    )
    return LlamaForCausalLM(config).float()


def _load_checkpoint(path: Path, vocab_size: int) -> PreTrainedModel:
    if not path.exists():
        raise SwarmError(f"model.checkpoint {path} does not exist; point it at a local save_pretrained directory")
    if not (path / "config.json").is_file():
        raise SwarmError(f"model.checkpoint {path} has no config.json; point it at a local save_pretrained directory")
    logger.info("loading model from %s (model.architecture and sizes are ignored)", path)
    try:
        # safetensors only: a checkpoint from elsewhere is never unpickled
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                     use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SwarmError(f"cannot load model.checkpoint {path}: {reason}") from None
    rows = model.get_input_embeddings().num_embeddings
    if rows < vocab_size:
        raise SwarmError(
            f"model.checkpoint {path} has {rows} token embeddings but the tokenizer has {vocab_size} ids; "
            "use the tokenizer the checkpoint was trained with"
        )
    return model


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
