"""Sampling precisions (midistral/model/precision.py): int8 per-channel quantization bounds, the bf16/int8 decode
step against the exact fp32 model across the ring's wrap-around, reproducibility, and the error for a
precision this machine cannot run."""

import pytest
import torch
import torch.nn.functional as F

from midistral.errors import MidistralError
from midistral.generate import generate
from midistral.model import ModelConfig, RollingKVCache, Transformer, available_precisions, default_precision, prepare_for_decode
from midistral.model.precision import (BF16Linear, FP16Linear, Int8Embedding, Int8Linear, convert, device_kind,
                                      quantize_per_channel)

# Stated tolerances of a decode step's logits against the fp32 model's, relative to the largest |logit|.
TOLERANCE = {"fp32": 1e-5, "fp16": 0.03, "bf16": 0.03, "int8": 0.06}


def small_model(seed=0, window=8):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, sliding_window=window, max_position_embeddings=256, initializer_range=0.1)
    return Transformer(cfg).eval()


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight an int8 weight and its per-output-channel scale stand for."""
    return q.float() * scale.float()[:, None]


def test_quantize_round_trip_bounds_per_channel():
    g = torch.Generator().manual_seed(0)
    # rows of very different magnitudes (one scale per output channel must follow each), one all-zero row
    w = torch.randn(48, 96, generator=g) * torch.logspace(-4, 1, 48)[:, None]
    w[7] = 0
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (48,)
    assert int(q.abs().max()) <= 127
    err = (w - dequantize(q, scale)).abs().amax(dim=1)
    row_max = w.abs().amax(dim=1)
    s = scale.float()
    assert (err <= s / 2 * (1 + 1e-6)).all()  # rounding to the nearest step, never clamped
    assert (s >= row_max / 127).all() and (s <= row_max / 127 * (1 + 2**-7) + 1e-11).all()  # the row's own range
    assert (err[7] == 0) and (q[7] == 0).all()


def test_int8_linear_equals_product_with_dequantized_weight():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 40, bias=False)
    x = torch.randn(3, 5, 64, generator=g)
    layer = Int8Linear(lin)
    want = F.linear(x.bfloat16().float(), dequantize(layer.weight, layer.scale))
    got = layer(x)
    assert got.shape == (3, 5, 40) and got.dtype == torch.bfloat16  # the fp32 stream promotes it
    torch.testing.assert_close(got.float(), want, atol=0.02 * want.abs().max().item(), rtol=0)


def test_int8_embedding_rows_are_the_dequantized_rows():
    """int8 sampling holds the token table as int8 rows with one scale each: a lookup gives fp32 rows equal to
    the dequantized table's, within half a step of the fp32 rows."""
    emb = torch.nn.Embedding(50, 32)
    layer = Int8Embedding(emb)
    ids = torch.tensor([[0, 7, 49], [7, 7, 3]])
    got = layer(ids)
    assert layer.weight.dtype == torch.int8 and got.dtype == torch.float32 and got.shape == (2, 3, 32)
    assert torch.equal(got, dequantize(layer.weight, layer.scale)[ids])
    assert ((got - emb.weight.detach()[ids]).abs() <= layer.scale.float()[ids][..., None] / 2 * (1 + 1e-6)).all()
    if "int8" in available_precisions():  # (offered on x86 CPUs and CUDA)
        assert isinstance(prepare_for_decode(small_model(), "int8").embed_tokens, Int8Embedding)


def test_fp16_linear_equals_product_with_fp16_rounded_weight():
    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(64, 40, bias=False)
    x = torch.randn(3, 5, 64, generator=g)
    want = F.linear(x, lin.weight.detach().half().float())  # fp32 activations and sums, only the weight rounded
    got = FP16Linear(lin)(x)
    assert got.shape == (3, 5, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_linear_equals_product_of_bf16_rounded_operands():
    """bf16 weights and inputs, fp32 sums (oneDNN on AVX512-BF16, F.linear elsewhere); the output stays bf16."""
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(64, 40, bias=False)
    x = torch.randn(6, 64, generator=g)
    want = F.linear(x.bfloat16().float(), lin.weight.detach().bfloat16().float())
    got = BF16Linear(lin)(x)
    assert got.shape == (6, 40) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.01 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_narrow_precisions_give_fp32_logits_from_an_fp16_head(precision):
    """Logits rounded to bf16 flip near-tied argmaxes (bench/RESULTS.md, "A machine with AVX512-BF16"): the fp16
    and bf16 precisions keep the LM head in fp16 weights with fp32 logits, equal to the product with the
    fp16-rounded head."""
    model = small_model()
    runner = convert(model, precision)
    assert isinstance(runner.lm_head, FP16Linear)
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
    got = runner.lm_head(h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(h, model.lm_head.weight.detach().half().float()), atol=1e-5, rtol=1e-5)


def test_int8_head_gives_fp32_logits_of_its_int8_weights():
    """int8's LM head (fbgemm's int8 product where it exists, else the fp16 head): fp32 logits; a decode step's
    rows (activations quantized on the fly) within 8-bit rounding of the product with the int8 weights, many
    rows (the weights widened) equal to it."""
    from midistral.model.precision import Int8Head, quantize_per_channel

    model = small_model()
    head = convert(model, "int8").lm_head
    if not isinstance(head, Int8Head):
        assert isinstance(head, FP16Linear)  # no fbgemm in this build
        return
    q, scale = quantize_per_channel(model.lm_head.weight)
    w = q.float() * scale.float()[:, None]
    for rows in (3, 40):
        h = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
        got, want = head(h), F.linear(h, w)
        assert got.dtype == torch.float32
        tol = 0.05 * want.abs().max().item() if rows <= Int8Head.DYNAMIC_ROWS else 1e-4
        assert (got - want).abs().max().item() <= tol, (rows, (got - want).abs().max())


def test_device_kind_tells_avx512_bf16_apart(monkeypatch):
    """The precision table is keyed by what the CPU offers: AVX2, AVX-512, AVX-512 with BF16."""
    for capability, bf16, kind in [("AVX2", False, "AVX2"), ("AVX512", False, "AVX512"),
                                   ("AVX512", True, "AVX512_BF16"), ("DEFAULT", False, "other")]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda b=bf16: b, raising=False)
        assert device_kind("cpu") == kind


def test_a_decode_copy_is_its_own_decode_copy():
    """The sampler keeps only the converted copy (the fp32 weights are freed): preparing it again returns it,
    and asking it for another precision is a one-line error."""
    model = small_model()
    precision = available_precisions()[-1]
    runner = prepare_for_decode(model, precision)
    assert prepare_for_decode(runner, precision) is runner
    other = next(p for p in available_precisions() if p != precision)
    with pytest.raises(MidistralError, match=f"converted to '{precision}'"):
        prepare_for_decode(runner, other)


@pytest.mark.parametrize("precision", available_precisions())
def test_decode_step_close_to_fp32_across_ring_wrap(precision):
    model = small_model()
    ids = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(2))
    runner = prepare_for_decode(model, precision)
    agree = 0
    with torch.inference_mode():
        cache = RollingKVCache.for_model(runner, 2)
        runner(ids[:, :5], cache=cache, start_pos=0)
        for pos in range(5, 30):  # window 8: the ring wraps three times
            got = runner(ids[:, pos, None], cache=cache, start_pos=pos)[:, -1]
            want = model(ids[:, :pos + 1])[:, -1]
            assert (got - want).abs().max() <= TOLERANCE[precision] * want.abs().max(), (precision, pos)
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
    assert agree >= 0.9 * 2 * 25


def test_same_seed_same_precision_same_output():
    model = small_model()
    prompt = torch.randint(3, 61, (2, 6), generator=torch.Generator().manual_seed(3))
    for precision in available_precisions():
        a = generate(model, prompt, 40, seed=7, precision=precision)
        b = generate(model, prompt, 40, seed=7, precision=precision)
        assert torch.equal(a, b), precision


def test_converted_weights_are_built_once_and_follow_training():
    model = small_model()
    precision = available_precisions()[-1]
    first = prepare_for_decode(model, precision)
    assert prepare_for_decode(model, precision) is first  # cached per (model, precision)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # an optimizer step changes parameters in place
    assert prepare_for_decode(model, precision) is not first
    assert all(p.requires_grad for p in model.parameters())  # the copy shares them: training goes on


def test_precision_the_machine_cannot_run_is_one_line_error():
    model = small_model()
    with pytest.raises(MidistralError) as e:
        generate(model, torch.zeros(1, 3, dtype=torch.long), 4, precision="fp8")
    msg = str(e.value)
    assert "\n" not in msg and "'fp8'" in msg and all(p in msg for p in available_precisions())
    assert default_precision() in available_precisions() and available_precisions()[0] == "fp32"
