"""The compiled decode step: one token per row through the model with static shapes, as gpt-fast does it.

    step = compiled_step(runner)            # None (with a one-line note) where it cannot compile
    logits = step(runner, cache, tok, pos)  # tok (B, 1), pos a 0-d long tensor -> (B, V)

Everything a step reads is a tensor of fixed shape: the position is a 0-d tensor, the KV cache is the whole
ring of W slots (written with `index_copy_` at slot pos mod W, model/cache.py) and the attention mask comes
from the ring's position tags, so one graph serves every position. `torch.compile` (inductor: fused C++ on
CPU, Triton on CUDA) builds one graph per batch size and precision.

Ahead of time: the first process compiles the step with `aot_compile` and saves the whole compiled function
(graph, generated code, guards) to `CACHE_DIR/aot/KEY.bin`, KEY naming everything the graph depends on (torch,
this code, the model's shapes, precision, batch, device); a later process loads that file and calls it, with
no tracing at all (dynamo's tracing and guard building were most of a warm first call). The weights are
inputs of the graph, not constants in it, so one file serves any checkpoint of the same shape. Where saving
or loading fails, the step falls back to plain `torch.compile` (its FX-graph cache still on disk), then eager.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "midistral" / "inductor"
RECOMPILE_LIMIT = 64  # graphs per step function: batch sizes x precisions x models in one process

# Inductor's options for the step. Its C++ kernels read the thread count when they run, not when they were compiled:
# decode steps choose theirs per step (generate.DecodeThreads), and one graph serves every choice. A C++ wrapper
# without size asserts calls the kernels with less Python per step: about 0.1-0.2 ms of a 1.8 ms batch-1 step of
# the report's model (bench/RESULTS.md, "Decode attention fused by inductor").
STEP_OPTIONS = {"cpp.dynamic_threads": True}
CPU_WRAPPER = {"cpp_wrapper": True, "size_asserts": False}  # measured on CPU only; CUDA keeps inductor's defaults


def step_options(device) -> dict:
    return {**STEP_OPTIONS, **(CPU_WRAPPER if torch.device(device).type == "cpu" else {})}

_state: dict = {"fn": None, "reason": None, "noted": False, "aot": {}, "not_aot": set()}


def _step(model, cache, tok, pos):
    return model(tok, cache=cache, start_pos=pos)[:, -1]


def compile_pays_off(batch_size: int, decode_weights: int | None) -> bool:
    """Whether a long-lived sampler (the studio: `Sampler.load(compile=None)`) compiles its steps. Measured per
    sampling call against eager (bench/RESULTS.md, "Decode attention by products..."): the report's model, int8,
    256 + 256 tokens, 1.16-1.45x at batch 1 and 1.21-1.65x at batch 8; a small model saves ~0.3 ms a step, which
    never repays the first call. Each batch size is its own graph, whose first call costs 19-37 s on a machine
    that has not compiled it yet (3-7 s from the disk cache after): the studio's variations (1-8) would each pay
    that on a user's first pieces, so only batch 1 compiles by default; `compile=True` / `--compile` for others."""
    from midistral.model.precision import SMALL_MODEL_WEIGHTS

    return batch_size == 1 and decode_weights is not None and decode_weights >= SMALL_MODEL_WEIGHTS


def compile_unavailable(device: torch.device | str = "cpu") -> str | None:
    """Why the step cannot be compiled here (None: it can): inductor needs a C++ compiler on CPU, Triton on CUDA."""
    if sys.platform == "win32":
        return "torch.compile is not supported on Windows here"
    if torch.device(device).type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "no triton"
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 -- any failure to find a compiler means the eager path
        return f"no C++ compiler ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def compiled_step(device: torch.device | str = "cpu", log=None):
    """The compiled step function, or None (one line through `log`, default stderr, once per process)."""
    if _state["fn"] is None and _state["reason"] is None:
        # before anything imports inductor, which reads its cache folder once
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR))
        _state["reason"] = compile_unavailable(device)
        if _state["reason"] is None:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            _state["fn"] = torch.compile(_step, fullgraph=True, dynamic=False, options=step_options(device))
    if _state["fn"] is None:
        note(f"note: compiled decoding unavailable ({_state['reason']}); decoding eagerly", log)
    return _state["fn"]


def note(msg: str, log=None) -> None:
    if not _state["noted"]:
        _state["noted"] = True
        (log or (lambda m: print(m, file=sys.stderr)))(msg)


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    """The model package's source (this file, the model, the cache, the precisions), read once per process."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / f).read_bytes() for f in sorted(os.listdir(here)) if f.endswith(".py"))).hexdigest()


def aot_key(runner, cache, tok: torch.Tensor) -> str:
    """What the ahead-of-time graph depends on: torch, this code, the model's shapes and precision, the ring, the
    batch, the device and the CPU's kernels. Not the weights (graph inputs)."""
    from midistral.model.cache import model_config

    cfg = model_config(runner)
    parts = {"torch": torch.__version__, "code": _code_hash(), "config": {k: v for k, v in sorted(vars(cfg).items())
             if isinstance(v, (int, float, str, bool, type(None)))}, "precision": getattr(runner, "decode_precision", None),
             "ring": [list(cache.k.shape), str(cache.k.dtype)], "tok": list(tok.shape), "device": str(tok.device),
             "cpu": torch.backends.cpu.get_cpu_capability(), "python": sys.version_info[:2]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def ahead_of_time(runner, cache, tok: torch.Tensor, pos: torch.Tensor, log=None):
    """The step for this model, ring and batch: loaded from CACHE_DIR/aot (no tracing), else compiled with
    `aot_compile` and saved there; the plain compiled step when either fails (a file that does not load is
    compiled again and replaced). Loaded functions are kept for the process."""
    key = aot_key(runner, cache, tok)
    if key in _state["aot"]:
        return _state["aot"][key]
    if key in _state["not_aot"]:  # tried once in this process: not again at every call (a full compile each)
        return _state["fn"]
    path = CACHE_DIR / "aot" / f"{key}.bin"
    fn = None
    if path.is_file():
        try:
            with open(path, "rb") as f:
                fn = torch.compiler.load_compiled_function(f)
            if not fn.guard_check(runner, cache, tok, pos):  # the inputs' shapes, strides and dtypes
                fn = None
        except Exception:  # noqa: BLE001 -- a stale or damaged file: compile again below
            fn = None
    if fn is None:
        try:
            # tensor guards only: the key already pins the model's structure, and module guards do not serialise
            compiled = torch.compile(_step, fullgraph=True, dynamic=False,
                                     options={**step_options(tok.device), "guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe})
            fn = compiled.aot_compile(((runner, cache, tok, pos), {}))
            path.parent.mkdir(parents=True, exist_ok=True)
            fn.save_compiled_function(str(path))  # written to a temporary file and renamed (atomic)
        except Exception as e:  # noqa: BLE001 -- not serialisable here: the plain compiled step
            note(f"note: the compiled decode step is not saved ahead of time ({type(e).__name__}); "
                 "compiling it in this process", log)
            _state["not_aot"].add(key)
            return _state["fn"]
    fn.disable_guard_check()  # checked once above (or built for these inputs); a step costs no Python guard
    _state["aot"][key] = fn
    return fn


def disable(reason: str, log=None) -> None:
    """Give up compiling for this process (a compile failed): later calls decode eagerly."""
    _state["fn"], _state["reason"] = None, reason
    note(f"note: compiled decoding failed ({reason}); decoding eagerly", log)


class StaticDecoder:
    """Runs decode steps of `runner` on `cache` through the compiled step; falls back to the eager step when
    compiling fails. `first_call_s`: the first step's time (compile or disk-cache load included)."""

    def __init__(self, runner, cache, device, log=None):
        self.runner, self.cache, self.fn, self.log = runner, cache, compiled_step(device, log), log
        self.first_call_s: float | None = None

    def __call__(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        if self.fn is not None:
            p = torch.tensor(pos, dtype=torch.long, device=tok.device)
            if self.first_call_s is None:
                t0 = time.perf_counter()
                try:
                    self.fn = ahead_of_time(self.runner, self.cache, tok, p, self.log)
                    out = self.fn(self.runner, self.cache, tok, p)
                except Exception as e:  # noqa: BLE001 -- a backend failure must not stop sampling
                    disable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", self.log)
                    self.fn = None
                    return self(tok, pos)
                self.first_call_s = time.perf_counter() - t0
            else:
                out = self.fn(self.runner, self.cache, tok, p)
            self.cache.advance(pos + 1)
            return out
        return self.runner(tok, cache=self.cache, start_pos=pos)[:, -1]
