"""Sampling precisions: the model with its linear layers (and LM head) in the layout and dtype a decode step
reads fastest, built once per (model, precision) and reused by every generate call.

    fp32  the exact path: the same weights (on CPU prepacked for oneDNN), logits equal to transformers'
    fp16  fp16 weights (half the bytes), fp32 activations and sums (on x86 CPUs fbgemm's packed fp16
          product, F16C), a bf16 KV ring; on CUDA fp16 products
    bf16  bf16 weights and a bf16 KV ring; the residual stream, norms and softmax stay fp32
    int8  int8 weights with one scale per output channel (weight-only, symmetric), bf16 activations into
          the products, a bf16 KV ring

`prepare_for_decode(model, precision)` returns a copy of the model that shares every tensor it does not
convert (embedding, norms, RoPE tables) and runs the model's own forward; only its nn.Linear modules are
swapped. The copy is rebuilt when any parameter of the model changed in place since (training).
Which precisions run where is the one table `OFFERED` below (chosen by measuring, bench/RESULTS.md).
"""

from __future__ import annotations

import copy
import functools
import itertools
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from midistral.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def check_device(device: str) -> None:
    """A device this torch can run on, or a one-line ConfigError naming it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: this torch has no CUDA device; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: expected cpu or cuda")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (int8 (out, in), bf16 scales (out,)) with w ~ q * scale, |w - q * scale| <= scale / 2.
    The scale is rounded up to bf16 (the dtype the int8 kernel takes) before rounding w, so the bound holds
    for the scale the kernel really uses and no value needs clamping."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    s16 = scale.to(torch.bfloat16)
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.tensor(float("inf"), dtype=s16.dtype)), s16)
    q = (w / s16.float()[:, None]).round().clamp_(-127, 127).to(torch.int8)
    return q, s16


_PREPACKED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # handle -> layer
_HANDLES = itertools.count()


@torch.library.custom_op("midistral::prepacked_linear", mutates_args=())
def prepacked_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int, out_dtype: torch.dtype) -> torch.Tensor:
    """A prepacked layer's product as one opaque op, so torch.compile traces around the weight objects it
    cannot see into (fbgemm's packed fp16 matrix, oneDNN's packed tensors) and fuses everything else."""
    return _PREPACKED[int(handle)].product(x)


@prepacked_linear.register_fake
def _(x, handle, out_features, out_dtype):
    return x.new_empty(x.shape[0], out_features, dtype=out_dtype)


class Prepacked(nn.Module):
    """A linear layer whose weight is prepacked for a library kernel: `product` in eager mode, the opaque
    `midistral::prepacked_linear` op under torch.compile (the compiled decode step, model/static.py)."""

    out_dtype = torch.float32

    def _register(self, out_features: int) -> None:
        # the handle as a tensor: a graph input, not a constant, so the compiled graph (and its disk cache
        # entry) is the same whichever layers this process built before
        self.out_features = out_features
        self.register_buffer("handle", torch.tensor(next(_HANDLES)), persistent=False)
        _PREPACKED[int(self.handle)] = self

    def forward(self, x):
        if self.packed is not None and torch.compiler.is_compiling():
            return torch.ops.midistral.prepacked_linear(x, self.handle, self.out_features, self.out_dtype)
        return self.product(x)


class OneDNNLinear(Prepacked):
    """fp32 y = x W^T with W prepacked once for oneDNN (the op torch.compile emits for CPU linears): for the
    report's model at batch 8 about 1.9x faster than MKL on the plain weight, at batch 1 about 1.1x. A
    oneDNN call costs ~10 us more than MKL's, so a weight under MIN_WEIGHTS elements (the embedded default's,
    128 wide) keeps the plain product: 2-5x faster there at 1 row, as fast at 8 (bench/RESULTS.md, "A machine
    with AVX512-BF16")."""

    MIN_WEIGHTS = 1 << 17

    def __init__(self, linear: nn.Linear, batch_size: int = 8):
        super().__init__()
        w = linear.weight.detach()
        onednn = torch.backends.mkldnn.is_available() and w.numel() >= self.MIN_WEIGHTS
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_size) if onednn else None
        self.weight = w if self.packed is None else None  # small, or a build without oneDNN: the plain product
        self._register(w.shape[0])

    def product(self, x):
        if self.packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class FP16Linear(Prepacked):
    """fp16 weight, fp32 input, output and accumulation. On CPU fbgemm's prepacked fp16 matrix (x86 with
    F16C): a step reads half the bytes of fp32 and the activations keep fp32's precision."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        fbgemm = w.device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
        self.packed = torch.ops.quantized.linear_prepack_fp16(w, None) if fbgemm else None
        self.weight = w.half() if self.packed is None else None
        self._register(w.shape[0])

    def product(self, x):
        if self.packed is None:
            return F.linear(x.half(), self.weight).to(x.dtype)
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed)  # (a bf16 ring's attention output)


class BF16Linear(Prepacked):
    """bf16 weight and product; the output stays bf16 (as Int8Linear's: the residual add promotes it to the
    fp32 stream). On CPUs with AVX512-BF16 the weight is prepacked for oneDNN, whose bf16 product there
    reads half of fp32's bytes at full speed (at batch 8 1.6x fp32's oneDNN product, bench/RESULTS.md)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().to(torch.bfloat16)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 8) if _onednn_bf16(w.device) else None
        self.weight = w if self.packed is None else None
        self._register(w.shape[0])

    out_dtype = torch.bfloat16

    def product(self, x):
        x = x.to(torch.bfloat16)
        if self.packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


@functools.lru_cache(maxsize=4)
def _onednn_bf16(device: torch.device) -> bool:
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Int8Linear(nn.Module):
    """Weight-only int8 with per-output-channel scales. On CPU torch's `_weight_int8pack_mm` (gpt-fast's CPU
    path; it wants bf16 activations); elsewhere the weight is dequantized to bf16 in the product. The output
    stays bf16: the ops after it (residual add, RoPE) promote to the fp32 stream exactly as a conversion
    would, and a decode step skips one conversion per product."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize_per_channel(linear.weight)
        # buffers (not plain attributes): the ahead-of-time compiled step (model/static.py) reads them as inputs
        self.register_buffer("weight", weight.to(linear.weight.device), persistent=False)
        self.register_buffer("scale", scale.to(linear.weight.device), persistent=False)

    # From this many rows (a prefill) and where bf16 products run at full speed, the weight is widened to bf16
    # (exactly: |w| <= 127) for oneDNN's bf16 GEMM and the scale applied after: `_weight_int8pack_mm` is built
    # for a decode step's few rows (the report's model, a 256-token prompt at batch 8: 652 against ~330 ms).
    WIDEN_ROWS = 32

    def forward(self, x):
        x16 = x.to(torch.bfloat16)
        if x.dim() != 2:  # the model's inputs are already (rows, C)
            return self(x16.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        if x.device.type == "cpu" and (x.shape[0] < self.WIDEN_ROWS or not _onednn_bf16(x.device)):
            return torch._weight_int8pack_mm(x16, self.weight, self.scale)
        return F.linear(x16, self.weight.to(torch.bfloat16)) * self.scale


class Int8Head(Prepacked):
    """The int8 LM head with fp32 logits: int8 weights (per-channel scales) in fbgemm's packed int8 product, the
    few rows of a decode step quantized on the fly (one scale per call, 8 bits with VNNI, 7 without: fbgemm's
    16-bit sums saturate there). Logits stay fp32, which is what keeps the argmax: `_weight_int8pack_mm`'s bf16
    logits changed it on 1.3-1.8% of positions. Against the fp16 head on the shipped model: argmax agreement with
    fp32 99.4% (fp16 head 99.5-99.7%), NLL +0.01%; for the report's 5000 x 512 head 52 against 126 us at 1 row,
    124 against 425 at 8, and half the bytes (bench/RESULTS.md). Many rows (a full forward) take the weight
    unpacked and widened to fp32 instead. `int8_head` builds it where fbgemm exists, else the fp16 head."""

    DYNAMIC_ROWS = 16
    REDUCE_RANGE = not getattr(torch.cpu, "_is_vnni_supported", lambda: False)()

    def __init__(self, linear: nn.Linear, packed):
        super().__init__()
        self.packed = packed
        self._register(linear.out_features)

    def product(self, x):
        rows = x.reshape(-1, x.shape[-1]).float()
        if rows.shape[0] <= self.DYNAMIC_ROWS:
            y = torch.ops.quantized.linear_dynamic(rows, self.packed, self.REDUCE_RANGE)
        else:
            w, _ = torch.ops.quantized.linear_unpack(self.packed)
            y = F.linear(rows, w.int_repr().float()) * w.q_per_channel_scales().float()
        return y.view(*x.shape[:-1], -1)


def int8_head(linear: nn.Linear) -> nn.Module:
    """The int8 precision's LM head: Int8Head on CPUs with fbgemm, else FP16Linear."""
    packed = None
    if linear.weight.device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines:
        weight, scale = quantize_per_channel(linear.weight)
        try:
            with warnings.catch_warnings():  # torch marks quantized tensors deprecated; fbgemm's packed op is what runs
                warnings.simplefilter("ignore")
                q = torch._make_per_channel_quantized_tensor(weight, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
                packed = torch.ops.quantized.linear_prepack(q, None)
        except (RuntimeError, AttributeError):  # a build without the quantized engine
            packed = None
    return Int8Head(linear, packed) if packed is not None else FP16Linear(linear)


class Int8Embedding(nn.Module):
    """The token embedding as int8 rows with one scale per row (as Int8Linear's channels): a lookup reads B
    rows, so it costs nothing, and the table holds a quarter of fp32's bytes (the reference model: 10 MB ->
    2.6 MB). Rows come out in fp32, the residual stream's dtype."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.weight, self.scale = quantize_per_channel(embedding.weight)
        self.weight, self.scale = self.weight.to(embedding.weight.device), self.scale.to(embedding.weight.device)

    def forward(self, ids):
        return self.weight[ids].float() * self.scale[ids].float()[..., None]


# How each precision is built: (linear layers, LM head, KV ring dtype); None = the model's own nn.Linear. On CPU
# fp32 uses the oneDNN-prepacked layer where the build has oneDNN (OneDNNLinear falls back to the plain product).
# The LM head gives fp32 logits in every narrow precision: logits rounded to bf16 (a bf16 head, or int8 through
# `_weight_int8pack_mm`) changed the argmax on 1.3-1.8% of positions, an fp16 head on 0.3% (bench/RESULTS.md,
# "A machine with AVX512-BF16"); int8's head is fbgemm's int8 product with fp32 logits where fbgemm exists.
BUILD = {"fp32": (OneDNNLinear, OneDNNLinear, torch.float32), "fp16": (FP16Linear, FP16Linear, torch.bfloat16),
         "bf16": (BF16Linear, FP16Linear, torch.bfloat16), "int8": (Int8Linear, int8_head, torch.bfloat16)}
BUILD_CUDA = {"fp32": (None, None, torch.float32), "fp16": (FP16Linear, FP16Linear, torch.float16),
              "bf16": (BF16Linear, FP16Linear, torch.bfloat16), "int8": (Int8Linear, FP16Linear, torch.bfloat16)}
# The token embedding too, where a precision narrows it (after the linears: a tied LM head reads it in fp32).
EMBEDDING = {"int8": Int8Embedding}

# What runs where, default first: device kind (`device_kind` below: the CPU capability torch picked its
# kernels for, with AVX512-BF16 told apart, or "cuda") -> precisions offered. Measured with
# bench/generate.py --precision (bench/RESULTS.md): a precision is offered where it is faster than fp32 and
# passes the quality guard (teacher-forced NLL within 0.5% (bf16, fp16) / 1.5% (int8) of fp32, argmax
# agreement >= 99% / 97%).
# - AVX2: batch 1 int8 and fp16 tie within run-to-run noise, batch 8 fp16 is faster: fp16. bf16 has no fast
#   product there (oneDNN takes bf16 weights only with AVX512-BF16): not offered.
# - AVX512_BF16: int8 (the fastest at batch 1, where a laptop samples one piece; a quarter of the bytes),
#   then fp16 (the fastest at batch 8). The figures per machine are in docs/precision.md and bench/RESULTS.md.
# - AVX512 without BF16: unmeasured (no such machine here), AVX2's row. CUDA: unmeasured (no GPU here), fp32
#   first (the model's own path with the Triton kernel).
OFFERED = {"AVX2": ("fp16", "int8", "fp32"), "AVX512": ("fp16", "int8", "fp32"),
           "AVX512_BF16": ("int8", "fp16", "bf16", "fp32"), "cuda": ("fp32", "fp16", "int8"), "other": ("fp32",)}


def device_kind(device: torch.device | str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return "cuda"
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", ...: the kernels torch picked
    if capability.startswith("AVX512"):  # bf16 products at full speed need AVX512-BF16 on top
        return "AVX512_BF16" if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() else "AVX512"
    return capability if capability in OFFERED else "other"


def available_precisions(device: torch.device | str = "cpu") -> list[str]:
    """The precisions sampling can run in on this machine (`device`), fp32 first."""
    offered = OFFERED[device_kind(device)]
    if torch.device(device).type == "cpu" and "fbgemm" not in torch.backends.quantized.supported_engines:
        offered = tuple(p for p in offered if p != "fp16")  # a CPU build without fbgemm has no fp16 product
    return [p for p in PRECISIONS if p in offered]


# A model under this many decode weights (16 MB in fp32, half this machine's L3) samples in fp32 on CPU: its
# weights stay in cache, so narrow weights save no memory traffic, and what a step costs is per-op overhead.
# The embedded default (0.9M) samples as fast in fp32 as in int8 at batch 1 and faster than in fp16 or bf16
# (bench/RESULTS.md, "A machine with AVX512-BF16").
SMALL_MODEL_WEIGHTS = 4 << 20


def default_precision(device: torch.device | str = "cpu", decode_weights: int | None = None) -> str:
    """The fastest precision that passes the quality guard here, for a model of `decode_weights` weights
    (ModelConfig.decode_weights; None: a large one)."""
    if decode_weights is not None and decode_weights < SMALL_MODEL_WEIGHTS and torch.device(device).type == "cpu":
        return "fp32"
    can = available_precisions(device)
    return next(p for p in OFFERED[device_kind(device)] if p in can)


def check_precision(precision: str, device: torch.device | str = "cpu") -> str:
    can = available_precisions(device)
    if precision not in can:
        raise ConfigError(f"precision={precision!r} cannot run on this machine ({device_kind(device)}): "
                          f"choose one of {', '.join(can)}")
    return precision


_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {precision: (versions, copy)}


def prepare_for_decode(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """The model to sample with in `precision`: a copy with converted linear layers, cached per model and
    precision (rebuilt when a parameter changed in place). A model that is not ours runs as is in fp32."""
    device = next(model.parameters()).device
    check_precision(precision, device)
    converted = getattr(model, "decode_precision", None)
    if converted is not None:  # already a decode copy (the sampler keeps only that, to free the fp32 weights)
        if converted != precision:
            raise ConfigError(f"precision={precision!r}: this model was converted to {converted!r} for sampling")
        return model
    if not hasattr(model, "layers"):  # any model speaking the cache protocol: no layers to convert
        if precision != "fp32":
            raise ConfigError(f"precision={precision!r} needs a midistral Transformer, got {type(model).__name__}")
        return model
    versions = tuple(p._version for p in model.parameters())
    per_model = _PREPARED.setdefault(model, {})
    if precision not in per_model or per_model[precision][0] != versions:
        per_model[precision] = (versions, convert(model, precision))
    return per_model[precision][1]


def decode_layers(precision: str, device: torch.device | str = "cpu") -> tuple:
    """(linear layer, LM head layer, KV ring dtype) that build `precision` on `device` (BUILD's row)."""
    return (BUILD_CUDA if torch.device(device).type == "cuda" else BUILD)[precision]


def convert_part(part: nn.Module, layer) -> nn.Module:
    """`part` with every nn.Linear in it (or itself, when it is one) swapped for `layer(linear)`; None keeps
    them. The one conversion: `convert` applies it to a whole model, the checkpoint loader part by part."""
    if layer is None:
        return part
    if isinstance(part, nn.Linear):
        return layer(part)
    for parent in list(part.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, layer(child))
    return part


def finish_decode(model: nn.Module, precision: str) -> nn.Module:
    """After convert_part: the embedding where `precision` narrows it, eval mode and the decode attributes."""
    if precision in EMBEDDING:
        model.embed_tokens = EMBEDDING[precision](model.embed_tokens)
    model.eval()  # (not requires_grad_(False): a copy shares the training model's own parameters)
    # the dtype's name, not the dtype: an ahead-of-time compiled step (model/static.py) pickles the module's
    # guards, and torch's guard pickler drops a module attribute that is a shared object such as torch.bfloat16,
    # and with it that dtype everywhere else in the file
    model.kv_cache_dtype = str(decode_layers(precision, next(model.parameters()).device)[2]).removeprefix("torch.")
    model.decode_precision = precision
    return model


def convert(model: nn.Module, precision: str) -> nn.Module:
    """The copy of `model` in `precision` (not cached, not checked against OFFERED: for measuring)."""
    linear_cls, head_cls, kv_dtype = decode_layers(precision, next(model.parameters()).device)
    if linear_cls is None and kv_dtype == next(model.parameters()).dtype:
        return model
    # a copy of the module tree that shares every tensor (no parameter is copied)
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    memo.update({id(t): t for t in model.rope.cached_tensors()})
    out = copy.deepcopy(model, memo)
    convert_part(out.layers, linear_cls)
    out.lm_head = convert_part(out.lm_head, head_cls)
    return finish_decode(out, precision)
