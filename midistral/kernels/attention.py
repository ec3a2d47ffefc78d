"""Triton flash attention for causal sliding-window attention with grouped-query attention.

Semantics: q (B, Hq, N, D); k, v (B, Hkv, N, D), Hq a multiple of Hkv; query i sees keys i - W < j <= i
(transformers' sliding window); softmax scale 1/sqrt(D).

Three kernels, one idea: a program owns one block of rows and walks only the blocks of the other side
that intersect its band, so the cost is O(N * W) instead of O(N^2).
  fwd_kernel    one query block x the key blocks of its window; online softmax (base 2); writes O and
                the log-sum-exp (natural log) that the backward uses to rebuild P without a second pass.
  dq_kernel     same walk as the forward; dQ = sum_j dS_ij K_j.
  dkdv_kernel   one key block of one KV head x the query blocks that see it, for every query head of its
                GQA group in turn; dK/dV for the group are summed in registers, so repeated K/V never
                exist in global memory and no atomics are needed.
The bounds each program walks are `key_block_range` / `query_block_range` below; the kernels compute the
same two formulas (in `_key_range` / `_query_range`), and the tests check them against brute force.
"""

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------------
# Which blocks are visited (pure Python; the kernels use the same formulas)

def key_block_range(start_m: int, n: int, window: int, block_m: int, block_n: int) -> range:
    """Key blocks visited by the query block starting at row start_m (forward and dQ).
    Rows start_m..start_m+block_m-1 together see keys max(0, start_m-W+1) .. min(N-1, start_m+block_m-1)."""
    lo = max(start_m - window + 1, 0) // block_n * block_n
    hi = min(start_m + block_m, n)
    return range(lo // block_n, -(-hi // block_n))


def query_block_range(start_n: int, n: int, window: int, block_m: int, block_n: int) -> range:
    """Query blocks that see the key block starting at key start_n (dK/dV).
    Keys start_n..start_n+block_n-1 are seen by queries start_n .. min(N-1, start_n+block_n-1+W-1)."""
    lo = start_n // block_m * block_m
    hi = min(start_n + block_n - 1 + window, n)
    return range(lo // block_m, -(-hi // block_m))


def visited_blocks(n: int, window: int, block_m: int, block_n: int) -> list[list[int]]:
    """For each query block, the list of key block indices the forward / dQ kernels visit."""
    return [list(key_block_range(m * block_m, n, window, block_m, block_n)) for m in range(-(-n // block_m))]


# ---------------------------------------------------------------------------------------------------------
# Kernels

@triton.jit
def _key_range(start_m, N, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    lo = tl.maximum(start_m - W + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M, N)
    return lo, hi


@triton.jit
def _query_range(start_n, N, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    lo = start_n // BLOCK_M * BLOCK_M
    hi = tl.minimum(start_n + BLOCK_N - 1 + W, N)
    return lo, hi


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    # DOT_FP32 only under the CPU interpreter: triton 3.9's interpreter multiplies bf16 tiles wrongly, and
    # bf16 -> fp32 is exact, so an fp32 product of the same bf16 values is what the tensor cores compute.
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def fwd_kernel(Q, K, V, O, LSE, scale_log2, N, W, Hq,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    hq = (pid_bh % Hq).to(tl.int64)
    q_off = b * stride_qb + hq * stride_qh
    kv_off = b * stride_kb + (hq // GROUP) * stride_kh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    q = tl.load(Q + q_off + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, hi = _key_range(start_m, N, W, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        kT = tl.load(K + kv_off + offs_n[None, :] * stride_kn + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        s = _dot(q, kT, PRECISION, DOT_FP32) * scale_log2
        valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - W) & col_ok[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no -inf - -inf
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off + offs_n[:, None] * stride_kn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, DOT_FP32)
        m_i = m_new
    empty = l_i == 0.0  # only padding rows (a real row always sees itself)
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + q_off + offs_m[:, None] * stride_qn + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + (b * Hq + hq) * N + offs_m, lse, mask=row_ok)


@triton.jit
def dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, scale_log2, sm_scale, N, W, Hq,
               stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    hq = (pid_bh % Hq).to(tl.int64)
    q_off = b * stride_qb + hq * stride_qh
    kv_off = b * stride_kb + (hq // GROUP) * stride_kh
    row_off = (b * Hq + hq) * N
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    q = tl.load(Q + q_off + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_off + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + row_off + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_off + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, hi = _key_range(start_m, N, W, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        kT = tl.load(K + kv_off + offs_n[None, :] * stride_kn + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        vT = tl.load(V + kv_off + offs_n[None, :] * stride_kn + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        s = _dot(q, kT, PRECISION, DOT_FP32) * scale_log2
        valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - W) & col_ok[None, :]
        p = tl.where(valid, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, vT, PRECISION, DOT_FP32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), PRECISION, DOT_FP32)
    dq *= sm_scale
    tl.store(DQ + q_off + offs_m[:, None] * stride_qn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, scale_log2, sm_scale, N, W, Hkv,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    kv_off = b * stride_kb + hk * stride_kh
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < N
    k = tl.load(K + kv_off + offs_n[:, None] * stride_kn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_off + offs_n[:, None] * stride_kn + offs_d[None, :], mask=col_ok[:, None], other=0.0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo, hi = _query_range(start_n, N, W, BLOCK_M, BLOCK_N)
    for g in range(GROUP):  # the query heads that share this KV head: their dK/dV add up here
        hq = hk * GROUP + g
        q_off = b * stride_qb + hq * stride_qh
        row_off = (b * Hkv * GROUP + hq) * N
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            qT = tl.load(Q + q_off + offs_m[None, :] * stride_qn + offs_d[:, None], mask=row_ok[None, :], other=0.0)
            lse2 = tl.load(LSE + row_off + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
            sT = _dot(k, qT, PRECISION, DOT_FP32) * scale_log2
            valid = (offs_n[:, None] <= offs_m[None, :]) & (offs_n[:, None] > offs_m[None, :] - W) & row_ok[None, :]
            pT = tl.where(valid, tl.math.exp2(sT - lse2[None, :]), 0.0)
            do = tl.load(DO + q_off + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            dv += _dot(pT.to(do.dtype), do, PRECISION, DOT_FP32)
            delta = tl.load(DELTA + row_off + offs_m, mask=row_ok, other=0.0)
            dpT = _dot(v, tl.trans(do), PRECISION, DOT_FP32)
            dsT = pT * (dpT - delta[None, :])
            dk += _dot(dsT.to(qT.dtype), tl.trans(qT), PRECISION, DOT_FP32)
    dk *= sm_scale
    tl.store(DK + kv_off + offs_n[:, None] * stride_kn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_off + offs_n[:, None] * stride_kn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# ---------------------------------------------------------------------------------------------------------
# Launcher: block sizes per kernel, head dim and element size

def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_config(kernel: str, head_dim: int, elem_bytes: int, interpret: bool | None = None, arch: int = 80) -> dict:
    """Block sizes and warps the launcher uses. Under the interpreter small blocks keep the CPU numpy work
    small (and exercise several blocks per row even at small N). GPU values follow the fused-attention
    tutorial's choices for A100/H100, shrunk for fp32 (twice the registers and shared memory per element)."""
    if interpret is None:
        interpret = interpreting()
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    key = (kernel, head_dim, elem_bytes)
    table = GPU_CONFIGS_SM90 if arch >= 90 and key in GPU_CONFIGS_SM90 else GPU_CONFIGS
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), table[key]))


def _arch(x: torch.Tensor) -> int:
    if x.is_cuda:
        major, minor = torch.cuda.get_device_capability(x.device)
        return 10 * major + minor
    return 80


# (kernel, head dim, element bytes) -> (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen from the ptxas -v
# report of `python -m midistral.kernels.compile` for 0 spill bytes on sm_80 and sm_90 (see the README's kernel section).
# Every kernel masks every tile of the band (not only the diagonal one), which costs registers, so the
# tiles are a little smaller or the warps more numerous than in the fused-attention tutorial.
GPU_CONFIGS = {
    ("fwd", 16, 2): (128, 64, 4, 3), ("fwd", 32, 2): (128, 64, 8, 3), ("fwd", 64, 2): (128, 64, 8, 3),
    ("fwd", 128, 2): (64, 64, 4, 3),
    ("dq", 16, 2): (64, 64, 4, 2), ("dq", 32, 2): (64, 64, 4, 2), ("dq", 64, 2): (64, 64, 4, 2),
    ("dq", 128, 2): (64, 64, 8, 2),
    ("dkdv", 16, 2): (32, 64, 4, 2), ("dkdv", 32, 2): (32, 64, 4, 2), ("dkdv", 64, 2): (32, 64, 4, 2),
    ("dkdv", 128, 2): (64, 64, 8, 2),
    # fp32: twice the bytes and registers per element; FMA products (ieee) want 8 warps
    ("fwd", 16, 4): (64, 64, 8, 2), ("fwd", 32, 4): (64, 64, 8, 2), ("fwd", 64, 4): (64, 32, 8, 2),
    ("fwd", 128, 4): (16, 32, 8, 2),
    ("dq", 16, 4): (64, 32, 8, 2), ("dq", 32, 4): (64, 32, 8, 2), ("dq", 64, 4): (32, 32, 8, 2),
    ("dq", 128, 4): (32, 32, 8, 2),
    ("dkdv", 16, 4): (16, 32, 8, 2), ("dkdv", 32, 4): (16, 32, 8, 2), ("dkdv", 64, 4): (32, 32, 8, 2),
    ("dkdv", 128, 4): (16, 32, 8, 2),
}
# Hopper (sm_90) exceptions: ptxas allocates differently there (12 spill bytes at 16x32, none at 32x32).
GPU_CONFIGS_SM90 = {("dkdv", 128, 4): (32, 32, 8, 2)}


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products (not tf32); 16-bit inputs use the tensor cores' native path
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_fp32(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _check(q, k, v, window):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (B,Hq,N,D), k/v (B,Hkv,N,D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, N, D = q.shape
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D or Hq % k.shape[1] != 0:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree (Hq must be a multiple of Hkv)")
    if D not in (16, 32, 64, 128):
        raise ValueError(f"head dim {D} unsupported by the Triton kernel (16, 32, 64, 128)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q/k/v dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one of fp32, fp16, bf16")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def _forward(q, k, v, window, cfg=None):
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    cfg = cfg or kernel_config("fwd", D, q.element_size(), arch=_arch(q))
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, N), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * Hq)
    fwd_kernel[grid](q, k, v, o, lse, LOG2E / math.sqrt(D), N, min(window, N + 1), Hq,
                      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      PRECISION=_precision(q.dtype), DOT_FP32=_dot_fp32(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o, lse


def _backward(q, k, v, o, lse, do, window, cfg_dq=None, cfg_dkdv=None):
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    W = min(window, N + 1)  # clamp so W fits int32 and the bounds arithmetic cannot overflow
    delta = (o.float() * do.float()).sum(-1)  # D_i = rowsum(dO * O), the softmax backward's correction
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(GROUP=Hq // Hkv, HEAD_DIM=D, PRECISION=_precision(q.dtype), DOT_FP32=_dot_fp32(q.dtype))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    c = cfg_dq or kernel_config("dq", D, q.element_size(), arch=_arch(q))
    dq_kernel[(triton.cdiv(N, c["BLOCK_M"]), B * Hq)](
        q, k, v, do, lse, delta, dq, LOG2E / math.sqrt(D), 1 / math.sqrt(D), N, W, Hq, *strides,
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], num_warps=c["num_warps"], num_stages=c["num_stages"], **common)
    c = cfg_dkdv or kernel_config("dkdv", D, q.element_size(), arch=_arch(q))
    dkdv_kernel[(triton.cdiv(N, c["BLOCK_N"]), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, LOG2E / math.sqrt(D), 1 / math.sqrt(D), N, W, Hkv, *strides,
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], num_warps=c["num_warps"], num_stages=c["num_stages"], **common)
    return dq, dk, dv


class SlidingWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _forward(q, k, v, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window = window
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do.contiguous(), ctx.window)
        return dq, dk, dv, None


def sliding_window_attention_triton(q, k, v, window: int):
    """The Triton kernel (differentiable). On CPU tensors it needs TRITON_INTERPRET=1 set before triton's import."""
    _check(q, k, v, window)
    if q.device.type == "cpu" and not interpreting():
        raise RuntimeError("Triton attention on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return SlidingWindowAttention.apply(q, k, v, int(window))

