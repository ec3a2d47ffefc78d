"""Custom kernels. `sliding_window_attention` is the one entry point the model calls.

(Stub until the Triton kernel lands: every backend runs the model's plain PyTorch path.)
"""


def sliding_window_attention(q, k, v, window: int, backend: str = "auto"):
    """Causal sliding-window GQA attention. q (B, Hq, N, D); k, v (B, Hkv, N, D); query i sees keys
    i - window < j <= i. backend: "torch" | "triton" | "auto" (triton on CUDA tensors)."""
    from midistral.model.attention import sliding_window_attention_torch

    return sliding_window_attention_torch(q, k, v, window)
