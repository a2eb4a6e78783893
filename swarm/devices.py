"""Hardware choices a volunteer should not have to make: device, precision and a batch size that fits.

Each choice is logged with the flag that overrides it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from swarm.errors import SwarmError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 on CUDA when supported, else full precision

    @property
    def label(self) -> str:
        precision = "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"
        return f"{self.device.type}-{precision}"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def choose_device(preference: str) -> DevicePlan:
    """``auto`` takes CUDA (bf16 autocast when the GPU supports it) when present, else the CPU."""
    has_cuda = torch.cuda.is_available()
    if preference == "cuda" and not has_cuda:
        raise SwarmError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if preference == "cpu" or (preference == "auto" and not has_cuda):
        logger.info("Using the CPU in fp32 (override with --device cuda when a GPU is present)")
        return DevicePlan(torch.device("cpu"), None)
    name = torch.cuda.get_device_name(0)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    precision = "bf16 autocast" if dtype else "fp32 (no bf16 support)"
    logger.info("Using CUDA GPU %s with %s (override with --device cpu)", name, precision)
    return DevicePlan(torch.device("cuda"), dtype)


def choose_batch_size(requested: int | None, *, plan: DevicePlan, num_params: int, seq_len: int, d_model: int,
                      n_layer: int, target_batch_size: int) -> int:
    """A micro-batch that fits: the request when given, else a memory-based estimate capped sensibly."""
    if requested is not None:
        logger.info("Using local batch size %d (from --batch-size / peer.batch_size)", requested)
        return requested
    if plan.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        budget = free * 0.6 - num_params * 4 * 4  # params, grads and optimizer state in fp32
        bytes_per_sample = _activation_bytes(seq_len, d_model, n_layer, 2 if plan.autocast_dtype else 4)
        size = int(max(budget, 0) // bytes_per_sample)
        cap = 64
    else:
        size, cap = 8, 8  # CPU: larger batches only make each step slower, not the swarm faster
    size = max(1, min(size, cap, target_batch_size))
    logger.info("Using local batch size %d, estimated to fit %s memory (override with --batch-size N)",
                size, plan.device.type.upper())
    return size


def _activation_bytes(seq_len: int, d_model: int, n_layer: int, element_size: int) -> int:
    # ~34 activations of width d_model per token per layer (attention + MLP), plus logits; a safe overestimate
    return seq_len * (34 * d_model * n_layer + 2 * 50_000) * element_size
