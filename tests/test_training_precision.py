"""Training precision (midistral/model/training.py): bf16 autocast with fp32 master weights follows fp32's loss
curve, and a machine without bf16 products refuses it in one line."""

import pytest
import torch

from midistral.errors import ConfigError
from midistral.model import ModelConfig, Transformer, training


def loss_curve(precision: str, steps: int = 200) -> list[float]:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, sliding_window=16, max_position_embeddings=128)
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    pool = torch.randint(3, 64, (64, 17), generator=g)  # random pieces: learned slowly, the loss stays well above 0
    pool[:, 1::2] = (pool[:, 0::2][:, :8] * 7) % 61 + 3  # every other token follows from the one before it
    losses = []
    for _ in range(steps):
        ids = pool[torch.randint(0, 64, (4,), generator=g)]
        with training.autocast(precision, torch.device("cpu")):
            loss = model(ids[:, :-1], ids[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    return losses


def test_bf16_autocast_follows_the_fp32_loss_curve():
    """200 steps on a tiny model (autocast runs on any CPU, emulated without bf16 hardware): the loss averaged
    over each 20 steps within 1% of fp32's."""
    fp32, bf16 = loss_curve("fp32"), loss_curve("bf16")
    for i in range(0, 200, 20):
        a, b = sum(fp32[i:i + 20]) / 20, sum(bf16[i:i + 20]) / 20
        assert abs(b - a) <= 0.01 * a, (i, a, b)
    assert sum(fp32[-20:]) < 0.8 * sum(fp32[:20])  # it learned something


def test_bf16_refused_without_bf16_products(monkeypatch):
    monkeypatch.setattr(training, "bf16_products", lambda device: False)
    with pytest.raises(ConfigError, match=r"^train.precision='bf16' needs CUDA or a CPU with AVX512-BF16 or AMX"):
        training.train_precision("bf16", torch.device("cpu"))
    assert training.train_precision("auto", torch.device("cpu")) == "fp32"
    assert training.train_precision("fp32", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(training, "bf16_products", lambda device: True)  # AVX512-BF16, AMX or CUDA
    assert training.train_precision("auto", torch.device("cpu")) == "bf16"
