"""Triton sliding-window GQA attention, run by Triton's CPU interpreter (TRITON_INTERPRET=1, set in conftest)
against a naive dense torch reference written here (fp64): output, log-sum-exp, dQ, dK, dV."""

import subprocess
import sys

import pytest
import torch

from midistral.model.attention import sliding_window_attention
from midistral.kernels import attention as A


def naive(q, k, v, window):
    """Dense masked softmax attention with repeated K/V: the obvious, slow definition."""
    B, Hq, N, D = q.shape
    g = Hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) / D**0.5
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    s = s.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def inputs(B, Hq, Hkv, N, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    do = torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64)
    return q, k, v, do


def reference(q, k, v, do, window):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o, lse = naive(q, k, v, window)
    o.backward(do.to(o.dtype))
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def kernel(q, k, v, do, window, cfg=None):
    """Forward + backward launchers with an optional block configuration (BLOCK_M, BLOCK_N)."""
    fwd = bwd = None
    if cfg is not None:
        fwd = bwd = dict(BLOCK_M=cfg[0], BLOCK_N=cfg[1], num_warps=1, num_stages=1)
    o, lse = A._forward(q, k, v, window, fwd)
    dq, dk, dv = A._backward(q, k, v, o, lse, do, window, bwd, bwd)
    return o, lse, dq, dk, dv


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-6)).item()


# (B, Hq, Hkv, N, D, W, blocks): N in {1, 17, 64, 200, 513}, W in {1, 16, 64, N, > N}, groups {1, 2, 4},
# D in {32, 64}; None = the interpreter's default 16x16 blocks, else (BLOCK_M, BLOCK_N), unequal on purpose.
CASES = [
    (2, 2, 1, 1, 32, 1, None),
    (2, 4, 1, 1, 64, 16, None),
    (2, 4, 1, 17, 32, 16, None),
    (2, 2, 2, 17, 64, 1, None),
    (2, 4, 2, 17, 32, 17, None),
    (1, 2, 1, 17, 32, 100, (32, 16)),
    (2, 2, 1, 64, 32, 64, None),
    (1, 4, 4, 64, 64, 16, (16, 32)),
    (2, 4, 2, 64, 32, 1, None),
    (1, 2, 1, 200, 32, 16, (32, 16)),
    (1, 4, 2, 200, 64, 64, (16, 32)),
    (2, 2, 2, 200, 32, 1000, (64, 64)),
    (1, 2, 1, 513, 32, 64, (64, 32)),
    (2, 2, 2, 513, 32, 16, (32, 64)),
    (1, 1, 1, 513, 64, 513, (64, 64)),
    (1, 4, 1, 513, 32, 1, (32, 32)),
]


@pytest.mark.slow
@pytest.mark.parametrize("B,Hq,Hkv,N,D,W,blocks", CASES)
def test_fp32_matches_fp64_reference(B, Hq, Hkv, N, D, W, blocks):
    q, k, v, do = inputs(B, Hq, Hkv, N, D)
    want = reference(q, k, v, do, W)
    got = kernel(*(x.float() for x in (q, k, v, do)), W, blocks)
    for name, x, ref in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(x).all(), name
        if ref.abs().max() == 0:  # W = 1 or N = 1: one key per query, so dQ = dK = 0 exactly (up to rounding)
            assert x.abs().max() < 1e-5, name
        else:
            assert rel_err(x, ref) < 1e-4, (name, rel_err(x, ref))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,N,D,W", [(2, 4, 2, 64, 32, 16), (1, 2, 1, 100, 64, 100)])
def test_half_precision_within_2x_of_torch(dtype, B, Hq, Hkv, N, D, W):
    """flash-attention's rule: the kernel's error against fp64 is at most 2x that of the same computation
    done by torch in the same dtype (plus a hair for the case where torch happens to be exact)."""
    q, k, v, do = inputs(B, Hq, Hkv, N, D, seed=1)
    want = reference(q, k, v, do, W)
    low = [x.to(dtype) for x in (q, k, v, do)]
    torch_low = reference(*low, W)
    got = A._forward(*low[:3], W)
    got = got + A._backward(*low[:3], *got, low[3], W)
    for name, x, t, ref in zip(("out", "lse", "dq", "dk", "dv"), got, torch_low, want):
        assert x.dtype == (torch.float32 if name == "lse" else dtype)
        assert torch.isfinite(x).all(), name
        assert rel_err(x, ref) <= 2 * rel_err(t, ref) + 1e-4, (name, rel_err(x, ref), rel_err(t, ref))


def test_autograd_function_and_entry_point():
    q, k, v, do = inputs(2, 4, 2, 40, 32, seed=2)
    want = reference(q, k, v, do, 8)
    qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
    o = sliding_window_attention(qf, kf, vf, 8, backend="triton")
    o.backward(do.float())
    for x, ref in zip((o, qf.grad, kf.grad, vf.grad), (want[0], *want[2:])):
        assert rel_err(x.detach(), ref) < 1e-4
    # the torch backend is the model's path: same numbers
    o_torch = sliding_window_attention(q.float(), k.float(), v.float(), 8, backend="torch")
    assert rel_err(o_torch, want[0]) < 1e-4
    # auto on CPU tensors = torch; a bad backend name is refused
    assert torch.equal(sliding_window_attention(q.float(), k.float(), v.float(), 8), o_torch)
    with pytest.raises(ValueError):
        sliding_window_attention(q, k, v, 8, backend="cuda")


def test_non_contiguous_inputs():
    """Inputs as the model makes them, (B, N, H, D) transposed to (B, H, N, D)."""
    q, k, v, do = inputs(2, 4, 2, 33, 32, seed=3)
    want = reference(q, k, v, do, 16)
    qt, kt, vt = (x.float().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    o = A.sliding_window_attention_triton(qt, kt, vt, 16)
    assert rel_err(o, want[0]) < 1e-4


def test_bad_shapes_refused():
    q = torch.zeros(1, 3, 8, 32)
    k = torch.zeros(1, 2, 8, 32)
    with pytest.raises(ValueError):
        A.sliding_window_attention_triton(q, k, k, 4)  # 3 query heads, 2 KV heads
    with pytest.raises(ValueError):
        A.sliding_window_attention_triton(q[:, :2], k, k, 0)  # empty window
    with pytest.raises(ValueError):
        A.sliding_window_attention_triton(torch.zeros(1, 2, 8, 48), torch.zeros(1, 2, 8, 48), torch.zeros(1, 2, 8, 48), 4)


def brute_force_blocks(n, window, bm, bn):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    mask = (j <= i) & (j > i - window)
    nm, nn = -(-n // bm), -(-n // bn)
    pad = torch.zeros(nm * bm, nn * bn, dtype=torch.bool)
    pad[:n, :n] = mask
    return pad.view(nm, bm, nn, bn).any(3).any(1)  # (query block, key block) intersects the band


@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 16), (16, 64), (128, 64), (64, 32)])
def test_block_visits_match_brute_force(bm, bn):
    for n in (1, 2, 15, 16, 17, 64, 100, 200, 513):
        for window in (1, 2, 15, 16, 17, 63, 64, 65, 200, n, n + 5):
            want = brute_force_blocks(n, window, bm, bn)
            got = torch.zeros_like(want)
            for m, blocks in enumerate(A.visited_blocks(n, window, bm, bn)):
                got[m, blocks] = True
            assert torch.equal(got, want), (n, window, bm, bn)
            # dK/dV: the query blocks each key block visits are the same pairs seen from the other side
            got_t = torch.zeros_like(want)
            for kb in range(want.shape[1]):
                got_t[list(A.query_block_range(kb * bn, n, window, bm, bn)), kb] = True
            assert torch.equal(got_t, want), ("dkdv", n, window, bm, bn)


def flops_report(n: int, window: int, block_m: int = 128, block_n: int = 64, head_dim: int = 128) -> str:
    """FLOPs of the forward (QK^T and PV, 4*D per query-key pair computed) that the block walk does, versus
    a full causal kernel that visits every block up to the diagonal, versus the useful band itself."""
    visited = sum(len(r) for r in A.visited_blocks(n, window, block_m, block_n))
    causal = sum(len(A.key_block_range(m * block_m, n, n, block_m, block_n)) for m in range(-(-n // block_m)))
    band = sum(min(i + 1, window) for i in range(n))  # query-key pairs the model actually needs
    f = 4 * head_dim * block_m * block_n
    return (f"N={n} W={window} blocks {block_m}x{block_n} D={head_dim}: forward visits {visited} blocks "
            f"({visited * f / 1e9:.3f} GFLOP per head), full causal {causal} blocks ({causal * f / 1e9:.3f} GFLOP), "
            f"ratio {visited / causal:.3f}; useful band pairs {band} = {band * 4 * head_dim / 1e9:.3f} GFLOP "
            f"(block efficiency {band / (visited * block_m * block_n):.2f})")


def test_flops_report_skips_blocks():
    text = flops_report(8192, 512)
    assert "ratio 0.1" in text or "ratio 0.0" in text  # ~ (W + block) / (N / 2) of full causal


def test_importing_the_model_does_not_import_triton():
    code = "import sys, midistral.model, midistral.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_model_logits_triton_equal_torch():
    model_mod = pytest.importorskip("midistral.model")
    cfg = model_mod.ModelConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    torch.manual_seed(0)
    model = model_mod.Transformer(cfg, attn_backend="torch").float()
    ids = torch.randint(0, 50, (2, 21))
    targets = torch.randint(0, 50, (2, 21))
    logits_t, loss_t = model(ids, targets)
    loss_t.backward()
    grads_t = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.attn_backend = "triton"
    logits_k, loss_k = model(ids, targets)
    loss_k.backward()
    assert rel_err(logits_k.detach(), logits_t.detach()) < 1e-4
    for gk, gt in zip((p.grad for p in model.parameters()), grads_t):
        assert rel_err(gk, gt) < 1e-3


@pytest.mark.slow
def test_ahead_of_time_compile_for_hopper():
    """One configuration of the compile report (the full one: `python -m midistral.kernels.compile`)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "midistral.kernels.compile", "--arch", "sm_90", "--head-dims", "64",
                        "--dtypes", "bf16", "--jobs", "1"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "sm_90" in line]
    assert len(rows) == 3 and all("| yes |" in line and "| 0/0 |" in line for line in rows), r.stdout
