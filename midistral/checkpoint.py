"""Checkpoints: one folder = model.safetensors + config.json + tokenizer.json (+ training state).

A run folder written by train.py holds `best/` (lowest validation loss) and `last/` (latest), each a
checkpoint folder. `resolve_checkpoint` turns whatever the user passed (a checkpoint folder or a run
folder) into one checkpoint folder. Folders are written whole: into a staging folder beside the
target, then swapped in by renames, so a crash mid-save never leaves a half-written checkpoint.

Also reads a transformers `save_pretrained` folder (config.json with "model_type") plus a tokenizer
file, ours or MidiTok's, for users who trained with the report's pipeline.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from midistral.config import check_tokenizer_params
from midistral.errors import CheckpointError, MidistralError
from midistral.io import atomic_path, atomic_write_text, fix_mode, read_tokenizer_json
from midistral.model import Transformer, from_hf
from midistral.model.config import ModelConfig
from midistral.model.hf import read_hf_folder
from midistral.model.model import check_tensors
from midistral.model.precision import BUILD, BUILD_CUDA, EMBEDDING, check_precision
from midistral.tokenize import REMI

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


def _has_weights(d: Path) -> bool:
    return (d / MODEL_FILE).is_file() or (d / "model.safetensors.index.json").is_file()


def is_checkpoint_dir(d: str | os.PathLike) -> bool:
    d = Path(d)
    return d.is_dir() and (d / CONFIG_FILE).is_file() and _has_weights(d)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder's best/ (else last/) checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    if not p.is_dir():
        raise CheckpointError(f"{p}: is a file; --ckpt takes a checkpoint folder or a run folder")
    if is_checkpoint_dir(p):
        return p
    # .<name>.old only exists if a save was interrupted between its two renames
    for sub in ("best", "last", ".best.old", ".last.old"):
        if is_checkpoint_dir(p / sub):
            return p / sub
    if (p / CONFIG_FILE).is_file() or _has_weights(p):
        missing = [f for f in (CONFIG_FILE, MODEL_FILE) if not (p / f).is_file()]
        raise CheckpointError(f"{p}: incomplete checkpoint, missing {', '.join(missing)}")
    raise CheckpointError(
        f"{p}: not a checkpoint (needs {CONFIG_FILE} and {MODEL_FILE}) nor a run folder with best/ or last/"
    )


def find_tokenizer_file(ckpt: Path) -> Path:
    """tokenizer.json in the checkpoint folder, else in its run folder, else any MidiTok tokenizer JSON beside it."""
    for cand in (ckpt / TOKENIZER_FILE, ckpt.parent / TOKENIZER_FILE):
        if cand.is_file():
            return cand
    for cand in sorted(ckpt.glob("*.json")):
        if cand.name in (CONFIG_FILE, "generation_config.json", "model.safetensors.index.json"):
            continue
        try:
            if "tokenization" in json.loads(cand.read_text()):
                return cand
        except (OSError, ValueError):
            continue
    raise CheckpointError(f"{ckpt}: no {TOKENIZER_FILE} in the checkpoint or its run folder")


def load_tokenizer(path: str | os.PathLike):
    """Our tokenizer JSON, or one saved by MidiTok 3.1 (`tokenizer.save`): REMI.load reads both. A file
    whose values do not build a tokenizer (tampered, another version) is a CheckpointError naming it."""
    d = read_tokenizer_json(Path(path))
    if d.get("tokenizer") == "midistral.REMI":  # bound the vocabulary before building it
        check_tokenizer_params(d.get("config") or {}, f"{path}: ")
    try:
        return REMI.load(path)
    except MidistralError as e:
        if str(path) in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a file's values the tokenizer cannot build from, whatever breaks
        reason = str(e).splitlines()[0][:100] if str(e) else ""
        raise CheckpointError(f"{path}: not a tokenizer this version reads ({e.__class__.__name__}: {reason})") from None


def load_model(ckpt: str | os.PathLike, device: str = "cpu"):
    """Our checkpoint, or a transformers MistralForCausalLM `save_pretrained` folder."""
    ckpt = resolve_checkpoint(ckpt)
    try:
        cfg = json.loads((ckpt / CONFIG_FILE).read_text())
    except ValueError as e:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: not valid JSON ({e})") from None
    model = from_hf(ckpt) if "model_type" in cfg else Transformer.load(ckpt)
    return model.to(device)


def load_model_and_tokenizer(path: str | os.PathLike, device: str = "cpu", precision: str | None = None):
    """The model (with `precision`: only its decode copy, `load_decode_model`) and the tokenizer."""
    ckpt = resolve_checkpoint(path)
    tok = load_tokenizer(find_tokenizer_file(ckpt))
    model = load_model(ckpt, device) if precision is None else load_decode_model(ckpt, precision, device)
    if len(tok) > model.config.vocab_size:
        raise CheckpointError(
            f"{ckpt}: tokenizer has {len(tok)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    return model, tok


# ----------------------------------------------------------------------------------------------------
# Streaming load: the decode model of a precision, read tensor by tensor (peak memory)

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_header(path: Path) -> dict[str, tuple]:
    """name -> (dtype, shape, first byte, end byte) of a safetensors file's tensors (offsets in the file),
    reading only its header: 8 bytes little-endian n, n bytes of JSON, then the raw data. A header that does
    not parse, or a tensor past the end of the file, is a CheckpointError naming the file."""
    def bad(why: str):
        raise CheckpointError(f"{path}: cannot be read ({why})")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                bad(f"truncated: a {size}-byte file cannot hold its {n}-byte header" if size >= 8
                    else "truncated: shorter than the 8-byte header length")
            header = json.loads(f.read(n))
    except OSError as e:
        bad(e.strerror or e.__class__.__name__)
    except (ValueError, RecursionError):
        bad("the header is not JSON")
    if not isinstance(header, dict):
        bad("the header is not a JSON object")
    entries = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES.get(e["dtype"]), e["shape"], e["data_offsets"]
            ok = all(type(d) is int and d >= 0 for d in (*shape, begin, end)) and begin <= end
        except (KeyError, TypeError, ValueError):
            bad(f"bad header entry for {name!r}")
        if dtype is None:
            bad(f"tensor {name!r} has dtype {e['dtype']!r}, not one this version reads")
        if not ok or (end - begin) != math.prod(shape) * dtype.itemsize:
            bad(f"bad header entry for {name!r}")
        if 8 + n + end > size:
            bad(f"truncated: tensor {name!r} ends past the end of the file")
        entries[name] = (dtype, tuple(shape), 8 + n + begin, 8 + n + end)
    return entries


def iter_safetensors(path: Path, entries: dict[str, tuple]):
    """(name, tensor) for `entries` (from read_safetensors_header), each read into a buffer of its own with
    plain reads: no mmap, whose touched pages would stay resident until the whole file is unmapped."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e.__class__.__name__})") from None
    with f:
        for name, (dtype, shape, begin, end) in entries.items():
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(begin)
            if f.readinto(memoryview(buf.numpy())) != end - begin:
                raise CheckpointError(f"{path}: cannot be read (truncated while reading {name!r})")
            yield name, buf.view(dtype).reshape(shape)


def read_model_config(ckpt: Path) -> ModelConfig:
    """The model config of a checkpoint folder (ours or transformers'), without reading its weights."""
    return _weight_files(ckpt)[0]


def _weight_files(ckpt: Path):
    """(model config, weight files, the prefix of their tensor names, the source errors name): our checkpoint
    folder or a transformers save_pretrained one, with load_model's checks and messages."""
    try:
        cfg = json.loads((ckpt / CONFIG_FILE).read_text())
    except ValueError as e:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: not valid JSON ({e})") from None
    if isinstance(cfg, dict) and "model_type" in cfg:
        config, shards = read_hf_folder(ckpt)
        return config, shards, "model.", ckpt
    if not (ckpt / MODEL_FILE).is_file():
        raise CheckpointError(f"{ckpt}: checkpoint is missing {MODEL_FILE}")
    return ModelConfig.from_dict(cfg), [ckpt / MODEL_FILE], "", ckpt / MODEL_FILE


def load_decode_model(ckpt: str | os.PathLike, precision: str, device: str = "cpu"):
    """The model `prepare_for_decode(load_model(ckpt, device), precision)` gives, the same to the bit, built
    without ever holding the fp32 state dict or the fp32 linear weights: the model's skeleton on the meta
    device, then part by part (the LM head, each block, the embedding, the final norm) its tensors read,
    loaded by the part's own load_state_dict (which joins q/k/v and gate/up), its linear layers converted
    with the precision's layer (precision.BUILD), and the fp32 tensors dropped before the next part."""
    ckpt = resolve_checkpoint(ckpt)
    check_precision(precision, device)
    map_big_buffers()  # a process that samples: freed activations do not stay resident (process-wide)
    cfg, files, prefix, source = _weight_files(ckpt)
    with torch.device("meta"), _NoInit():
        model = Transformer(cfg)
    own = model.checkpoint_shapes()
    where = {k.removeprefix(prefix): (f, e) for f in files for k, e in read_safetensors_header(f).items()}
    if cfg.tie_word_embeddings:
        where.pop("lm_head.weight", None)
    check_tensors(own, {k: e[1] for k, (_, e) in where.items()}, source)
    linear_cls, head_cls, kv_dtype = (BUILD_CUDA if torch.device(device).type == "cuda" else BUILD)[precision]
    # the parts that shrink when converted first, the kept ones (embedding, norm) last: the least held at once
    parts = [(model, "lm_head"), *((model.layers, str(i)) for i in range(len(model.layers))),
             *((model, n) for n, _ in model.named_children() if n not in ("lm_head", "layers", "rope"))]
    for parent, attr in parts:
        start = f"layers.{attr}." if parent is model.layers else f"{attr}."
        names = [k for k in own if k.startswith(start)]
        if names:  # (a tied LM head has none: it is the embedding)
            layer = head_cls if attr == "lm_head" else linear_cls
            _load_part(start, parent, attr, _read_tensors({k: where[k] for k in names}), device, layer)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        _convert(model, "lm_head", head_cls)
    if precision in EMBEDDING:
        model.embed_tokens = EMBEDDING[precision](model.embed_tokens)
        release_freed_memory()
    for m in model.modules():  # built buffers (RoPE's inv_freq, the norms' eps) are on the CPU even on meta
        m._buffers.update({n: b.to(device) for n, b in m._buffers.items() if b is not None})
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    assert not left, f"not loaded: {left}"
    if linear_cls is None and kv_dtype == torch.float32:  # as precision.convert: the model as it is
        return model
    model.eval()
    model.kv_cache_dtype, model.decode_precision = kv_dtype, precision
    return model


def _read_tensors(where: dict) -> dict:
    """name -> tensor for `where` (name -> (file, header entry)), read file by file."""
    out = {}
    for f in dict.fromkeys(f for f, _ in where.values()):
        out.update(iter_safetensors(f, {k: e for k, (g, e) in where.items() if g == f}))
    return {k: out[k] for k in where}


class _NoInit(torch.overrides.TorchFunctionMode):
    """Skips torch.nn.init's functions (the skeleton's weights are all replaced): on the meta device their
    Python decompositions would import torch._refs and sympy, 150 MB and 3 s (measured)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def _load_part(prefix: str, parent, attr: str, tensors: dict, device, linear_cls) -> None:
    """Load the module parent.attr from its checkpoint tensors (fp32 on `device`, as load_state_dict copies
    them into the model's fp32 parameters), then convert its linear layers."""
    state = {k.removeprefix(prefix): v.to(device=device, dtype=torch.float32) for k, v in tensors.items()}
    tensors.clear()
    getattr(parent, attr).load_state_dict(state, assign=True)
    del state
    _convert(parent, attr, linear_cls)
    release_freed_memory()


def release_freed_memory() -> None:
    """Hand the pages of freed buffers back to the OS (glibc's malloc_trim; elsewhere nothing): glibc keeps
    freed heap memory resident, so a load that frees each part's fp32 tensors would otherwise peak above
    what it holds."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def map_big_buffers() -> None:
    """Keep every buffer of 256 KiB or more in its own mapping, returned to the OS when freed (glibc's
    mallopt M_MMAP_THRESHOLD; elsewhere nothing). glibc raises that threshold each time a big buffer is freed,
    after which buffers of that size come from the heap and stay resident: a batch-8 prefill's activations
    then added 15-25 MB to sampling's peak that nothing used again (measured, bench/RESULTS.md)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 256 * 1024)  # -3: M_MMAP_THRESHOLD; a fixed value also stops the raising


def _libc():
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _convert(parent, attr: str, linear_cls) -> None:
    """Swap parent.attr if it is an nn.Linear (else every nn.Linear within it) for `linear_cls(linear)`,
    as precision.convert does; linear_cls None keeps them."""
    module = getattr(parent, attr)
    if linear_cls is not None and isinstance(module, torch.nn.Linear):
        setattr(parent, attr, linear_cls(module))
    elif linear_cls is not None:
        for name, _ in list(module.named_children()):
            _convert(module, name, linear_cls)


def save_checkpoint(
    dir: str | os.PathLike,
    model,
    tokenizer=None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a whole checkpoint folder atomically: stage it beside `dir`, then swap it in.

    `extra(staging_dir)` may write more files (training state) into the same folder before the swap.
    """
    dir = Path(dir)
    dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dir.name}.", suffix=".tmp", dir=dir.parent))
    fix_mode(staging, 0o777)  # mkdtemp makes it 0700: give the folder the umask's permissions
    try:
        model.save(staging)
        if tokenizer is not None:
            tokenizer.save(staging / TOKENIZER_FILE)
        if extra is not None:
            extra(staging)
        old = None
        if dir.exists():
            old = dir.parent / f".{dir.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(dir, old)
        os.replace(staging, dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dir


# ----------------------------------------------------------------------------------------------------
# Run folders: what train.py writes (best/, last/, metrics.jsonl) and --resume reads


def save_best(run: Path, model, tokenizer, step: int, val_loss: float) -> Path:
    """RUN/best: the weights of the best evaluation so far, whenever it happens (mid-epoch too); best.json
    names its step and loss."""
    best = json.dumps({"step": step, "val_loss": val_loss}) + "\n"
    return save_checkpoint(run / "best", model, tokenizer, extra=lambda d: (d / "best.json").write_text(best))


def save_last(run: Path, model, tokenizer, state: dict, optimizer, data_fingerprint: str, cfg: dict) -> Path:
    """RUN/last: weights, tokenizer and everything --resume needs: state.pt (`state`, train.py's TrainState as
    a dict, with the optimiser state, the torch RNG and the data fingerprint) and train_config.json."""
    def write_state(d: Path):
        torch.save({**state, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                    "data_fingerprint": data_fingerprint}, d / "state.pt")
        (d / "train_config.json").write_text(json.dumps(cfg, indent=2))

    return save_checkpoint(run / "last", model, tokenizer, extra=write_state)


def resume_dir(run: Path) -> Path:
    """The checkpoint to resume from: RUN/last, or RUN/.last.old when a kill fell between the two renames
    of a checkpoint swap (the new folder was not yet in place, the previous one is whole)."""
    for d in (run / "last", run / ".last.old"):
        if (d / "state.pt").is_file():
            return d
    raise CheckpointError(f"{run}: nothing to resume (no last/state.pt)")


def read_train_state(path: Path) -> dict:
    """state.pt as saved by train.py: tensors and plain values only (a pickled object is refused, never run)."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on foreign files: the error says it
            warnings.simplefilter("ignore")
            saved = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such training state file") from None
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and plain containers
        why = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unpickler error" in line]
        reason = (why[0] if why else "unpickling error")[:120]
        raise CheckpointError(f"{path}: refused, holds more than tensors and plain values ({reason}); "
                              "nothing in it was run") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError, TypeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt training state ({e.__class__.__name__})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: not a training state (expected a dict, got {type(saved).__name__})")
    checks = {"step": lambda v: isinstance(v, int) and v >= 0, "best_val": lambda v: isinstance(v, float),
              "optimizer": lambda v: isinstance(v, dict),
              "torch_rng": lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8}
    for key, ok in checks.items():
        if key not in saved:
            raise CheckpointError(f"{path}: not a training state of this version (no {key!r})")
        if not ok(saved[key]):
            raise CheckpointError(f"{path}: bad value for {key!r} ({type(saved[key]).__name__})")
    return saved


def read_weights(path: Path) -> dict:
    """A safetensors file's tensors, or a CheckpointError naming it."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: truncated or corrupt weights ({str(e).splitlines()[0][:120]})") from None


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line cut short by a kill is skipped, any other bad line is an error."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e.__class__.__name__})") from None
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # the last line, cut by a kill mid-write
                continue
            raise CheckpointError(f"{path}: line {i + 1} is not JSON (a corrupt metrics log)") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise CheckpointError(f"{path}: line {i + 1} is not a metrics row (no integer 'step')")
        rows.append(row)
    return rows


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:  # append-only: a crash loses at most the line being written
        f.write(json.dumps(row) + "\n")


def check_same_data(last: Path, saved: dict, fingerprint: str, data_dir: Path) -> None:
    """Refuse to resume `last` on data prepared with another [data] or [tokenizer] config (a restart cycle,
    train.restart=true, may train on new data and skips this)."""
    if saved.get("data_fingerprint", fingerprint) != fingerprint:
        raise CheckpointError(f"{last}: trained on data prepared with another [data] config than {data_dir} "
                              "would be: resume with the run's settings (or train.restart=true)")


def check_same_tokenizer(last: Path, tok, data_dir: Path) -> None:
    """Refuse to continue `last` with another tokenizer: its ids would mean other things."""
    if load_tokenizer(last / TOKENIZER_FILE).to_dict() != tok.to_dict():
        raise CheckpointError(f"{last}: the checkpoint's tokenizer differs from the one in the prepared data "
                              f"({data_dir}): resume with the run's [data] and [tokenizer] settings")


def load_last(last: Path, saved: dict, model, optimizer, tokenizer, data_dir: Path, weights_only: bool) -> None:
    """Load RUN/last (`saved`: its read_train_state) into `model` and, unless `weights_only` (a restart
    cycle), into `optimizer` and the torch RNG. Refused when its tokenizer is not the prepared data's."""
    check_same_tokenizer(last, tokenizer, data_dir)
    model.load_weights(read_weights(last / MODEL_FILE), last)
    if weights_only:
        return
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{last / 'state.pt'}: optimizer state does not fit this model ({e})") from None
    torch.set_rng_state(saved["torch_rng"])


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the rows a killed run logged after its last checkpoint, so the resumed run's rows replace
    them instead of repeating their steps. Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    n_lines = len([line for line in path.read_text().splitlines() if line.strip()])
    keep = [row for row in read_metrics(path) if row["step"] <= step]
    if len(keep) != n_lines:
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))
    return n_lines - len(keep)


def plot_metrics(run: Path) -> None:
    """RUN/loss.png: training and validation loss, and the learning rate, per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run / "metrics.jsonl")
    tr = [r for r in rows if "loss" in r]
    va = [r for r in rows if "val_loss" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train", lw=0.8)
    a.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label="validation")
    a.set_xlabel("step"), a.set_ylabel("cross-entropy"), a.legend(), a.set_title(run.name)
    b.plot([r["step"] for r in tr], [r["lr"] for r in tr])
    b.set_xlabel("step"), b.set_ylabel("learning rate")
    fig.tight_layout()
    with atomic_path(run / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
