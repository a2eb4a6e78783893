"""Device, precision and batch-size choices; the CUDA path runs only where a GPU is present."""

import pytest
import torch

from swarm.config import load_config
from swarm.devices import choose_batch_size, choose_device
from swarm.errors import SwarmError
from swarm.model import build_model, count_parameters

from conftest import TINY

has_cuda = torch.cuda.is_available()


def test_cpu_is_fp32_and_explicit_batch_size_wins():
    plan = choose_device("cpu")
    assert plan.device.type == "cpu" and plan.autocast_dtype is None and plan.label == "cpu-fp32"
    size = choose_batch_size(5, plan=plan, num_params=1000, seq_len=64, d_model=64, n_layer=2, target_batch_size=96)
    assert size == 5
    assert choose_batch_size(None, plan=plan, num_params=1000, seq_len=64, d_model=64, n_layer=2,
                             target_batch_size=4) == 4  # never more than the whole swarm's batch


@pytest.mark.skipif(has_cuda, reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(SwarmError, match="--device cpu"):
        choose_device("cuda")
    assert choose_device("auto").device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU (none here; CI never has one)")
def test_cuda_bf16_training_step():
    config = load_config(TINY)
    plan = choose_device("auto")
    assert plan.device.type == "cuda"
    model = build_model(config.model, vocab_size=257).to(plan.device)
    size = choose_batch_size(None, plan=plan, num_params=count_parameters(model), seq_len=config.data.seq_len,
                             d_model=config.model.d_model, n_layer=config.model.n_layer, target_batch_size=96)
    assert 1 <= size <= 64
    batch = torch.randint(0, 257, (size, config.data.seq_len), device=plan.device)
    with plan.autocast():
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
