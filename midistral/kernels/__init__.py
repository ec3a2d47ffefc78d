"""Custom kernels. `sliding_window_attention` is the one entry point the model calls.

triton is imported lazily (only when the Triton backend runs), so importing the model on a CPU-only
machine never imports triton.
"""

BACKENDS = ("auto", "torch", "triton")


def sliding_window_attention(q, k, v, window: int, backend: str = "auto"):
    """Causal sliding-window GQA attention. q (B, Hq, N, D); k, v (B, Hkv, N, D); query i sees keys
    i - window < j <= i; scale 1/sqrt(D). backend: "torch" (the model's plain PyTorch path),
    "triton" (the flash-attention kernel in kernels/attention.py), "auto" (triton on CUDA tensors)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        from midistral.kernels.attention import sliding_window_attention_triton

        return sliding_window_attention_triton(q, k, v, window)
    from midistral.model.attention import sliding_window_attention_torch

    return sliding_window_attention_torch(q, k, v, window)
