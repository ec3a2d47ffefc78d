"""Run folders: what train.py writes into out_dir, and what --resume reads back.

    RUN/best/           the checkpoint of the lowest validation loss so far (best.json: its step and loss)
    RUN/last/           the latest checkpoint plus state.pt and train_config.json: everything --resume needs
    RUN/metrics.jsonl   one row per step and per evaluation
    RUN/loss.png        the curves
    RUN/samples/        pieces sampled after training

A folder that holds a run (best/ or last/) is never trained into again unless the user says how: `--resume`
continues it, `--overwrite` replaces it (naming what it removes). Under torchrun rank 0 decides and every
rank follows. While training, `Guard` writes last/ every train.checkpoint_minutes and at the step a SIGINT or
SIGTERM arrived, so a kill -9 loses at most those minutes and Ctrl-C loses nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from midistral.checkpoint import TOKENIZER_FILE, find_tokenizer_file, is_checkpoint_dir, load_weights, save_checkpoint
from midistral.errors import CheckpointError
from midistral.io import atomic_write_bytes, atomic_write_text
from midistral.plots import loss_curves_png
from midistral.tokenizer_file import load_tokenizer
from midistral.config_files import command_line

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.pt"


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
                    "data_fingerprint": data_fingerprint}, d / STATE_FILE)
        (d / "train_config.json").write_text(json.dumps(cfg, indent=2))

    return save_checkpoint(run / "last", model, tokenizer, extra=write_state)


def resume_dir(run: Path) -> Path:
    """The checkpoint to resume from: RUN/last, or RUN/.last.old when a kill fell between the two renames
    of a checkpoint swap (the new folder was not yet in place, the previous one is whole)."""
    for d in (run / "last", run / ".last.old"):
        if (d / STATE_FILE).is_file():
            return d
    raise CheckpointError(f"{run}: nothing to resume (no last/{STATE_FILE})")


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


def check_same_data(last: Path, saved: dict, fingerprint: str, data_dir: Path) -> None:
    """Refuse to resume `last` on data prepared with another [data] or [tokenizer] config (a restart cycle,
    train.restart=true, may train on new data and skips this)."""
    if saved.get("data_fingerprint", fingerprint) != fingerprint:
        raise CheckpointError(f"{last}: trained on data prepared with another [data] config than {data_dir} "
                              "would be: resume with the run's settings (or train.restart=true)")


def _vocabulary(tokenizer) -> dict:
    """What the ids mean: the tokenizer's dict without the fill-in-the-middle layout (a run may fine-tune
    a model trained in one layout into the other)."""
    d = tokenizer.to_dict()
    if d.get("extra"):
        d["extra"] = {k: v for k, v in d["extra"].items() if k != "fim_layout"}
    return d


def load_start_weights(ckpt: Path, model, tokenizer, data_dir: Path) -> None:
    """A checkpoint's weights into `model`; refused when its tokenizer is not the prepared data's (the ids
    would mean other tokens)."""
    if _vocabulary(load_tokenizer(find_tokenizer_file(ckpt))) != _vocabulary(tokenizer):
        raise CheckpointError(f"{ckpt}: the checkpoint's tokenizer differs from the one in the prepared data "
                              f"({data_dir}): use the checkpoint's [data] and [tokenizer] settings")
    load_weights(model, ckpt)


def load_last(last: Path, saved: dict, model, optimizer, tokenizer, data_dir: Path, weights_only: bool) -> None:
    """Load RUN/last (`saved`: its read_train_state) into `model` and, unless `weights_only` (a restart
    cycle), into `optimizer` and the torch RNG. Refused when its tokenizer is not the prepared data's."""
    load_start_weights(last, model, tokenizer, data_dir)
    if weights_only:
        return
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{last / STATE_FILE}: optimizer state does not fit this model ({e})") from None
    torch.set_rng_state(saved["torch_rng"])


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl and its plot


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
    atomic_write_bytes(run / "loss.png", loss_curves_png(read_metrics(run / METRICS_FILE), run.name))


# ----------------------------------------------------------------------------------------------------
# Whether train.py may write into a folder: refuse, resume or overwrite


def describe_run(run: Path) -> str | None:
    """What the run folder holds that a new training would replace ("best/ (step 48, val loss 4.8400),
    last/ (step 60)"), or None when it holds no checkpoint."""
    held = []
    for name in ("best", "last"):
        d = next((d for d in (run / name, run / f".{name}.old") if is_checkpoint_dir(d)), None)
        if d is None:
            continue
        try:
            info = json.loads((d / "best.json").read_text()) if name == "best" else {
                "step": torch.load(d / STATE_FILE, weights_only=True, map_location="cpu")["step"]}
            what = f"step {info['step']}" + (f", val loss {info['val_loss']:.4f}" if "val_loss" in info else "")
        except Exception:  # noqa: BLE001 - a damaged file still holds weights worth keeping
            what = "unreadable state"
        held.append(f"{name}/ ({what})")
    return ", ".join(held) or None


def claim_run(run: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (resume), else None after making sure nothing is lost: a folder that
    holds a run is refused unless `overwrite`, which removes the old run's checkpoints, metrics, plot and
    samples (the prepared data stays, reused when its config matches) and says so."""
    if resume:
        return resume_dir(run)
    held = describe_run(run)
    if held is None:
        return None
    if not overwrite:
        raise CheckpointError(f"{run}: holds a run ({held}); continue it with --resume, "
                              "replace it with --overwrite, or train into another out_dir=...")
    others = [p for p in (run / METRICS_FILE, run / "loss.png", run / "samples") if p.exists()]
    print(f"--overwrite: removing the previous run in {run}: "
          + ", ".join([held, *(p.name + ("/" if p.is_dir() else "") for p in others)]), file=sys.stderr)
    old = [run / name for name in ("best", "last", ".best.old", ".last.old")]
    for p in [*(p for p in old if p.exists()), *others]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return None


def agree(decide: Callable[[], Path | None], master: bool, ddp: bool) -> Path | None:
    """Run `decide` on rank 0 only and give every rank its answer. When it fails, rank 0 raises its error
    (one line) and the other ranks exit with code 1 without repeating it."""
    if not ddp:
        return decide()
    answer, error = [None, None], None
    if master:
        try:
            found = decide()
            answer = [True, None if found is None else str(found)]
        except CheckpointError as e:
            answer, error = [False, None], e
    torch.distributed.broadcast_object_list(answer, src=0)
    if not answer[0]:
        torch.distributed.destroy_process_group()  # (exiting with it alive aborts the process)
        if error is not None:
            raise error
        raise SystemExit(1)
    return None if answer[1] is None else Path(answer[1])


# ----------------------------------------------------------------------------------------------------
# Saving last/ mid-epoch: every N minutes, and at the step a signal arrived


class Interrupted(Exception):
    """The training stopped at a signal after saving RUN/last; `str()` is the one line to print."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Guard:
    """Install with `with Guard(...) as guard:` around the training loop, and call `guard.after_step(step,
    save)` at the end of each step (`saved(step)` when the loop wrote last/ itself).

    - every `minutes` (0: never) rank 0 writes last/ (`save`), so a kill -9 loses at most that;
    - the first SIGINT or SIGTERM lets the current step finish, then every rank stops at the same step
      (an all-reduce under torchrun), rank 0 writes last/ and `Interrupted` is raised;
    - a second signal exits at once, without saving (the previous last/ stays whole: writes are atomic).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, run: Path, minutes: float, master: bool, ddp: bool, resume_hint: str,
                 clock: Callable[[], float] = time.monotonic):
        self.run, self.seconds, self.master, self.ddp, self.hint = run, minutes * 60, master, ddp, resume_hint
        self.clock = clock
        self.signum: int | None = None
        self.t_saved, self.step_saved, self.previous = clock(), -1, {}

    def __enter__(self) -> "Guard":
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            return self
        for s in self.SIGNALS:
            if signal.getsignal(s) is not signal.SIG_IGN:  # (a shell's background job ignores SIGINT: keep it so)
                self.previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            print(f"\n{signal.Signals(signum).name} again: stopped at once without saving", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.signum = signum

    def saved(self, step: int) -> None:
        self.t_saved, self.step_saved = self.clock(), step

    def stop_requested(self) -> bool:
        """Whether any rank got a signal (every rank gets the same answer)."""
        if not self.ddp:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if self.signum is None and int(flag):
            self.signum = int(flag)
        return bool(int(flag))

    def after_step(self, step: int, save: Callable[[], object]) -> None:
        stop = self.stop_requested()
        due = self.seconds > 0 and self.clock() - self.t_saved >= self.seconds
        if self.master and (stop or due) and self.step_saved != step:
            save()
            self.saved(step)
        if stop:
            if self.ddp:  # the others wait for rank 0's save: torchrun stops every rank when one exits
                torch.distributed.barrier()
                torch.distributed.destroy_process_group()
            name = signal.Signals(self.signum).name
            raise Interrupted(f"{name} at step {step}: saved {self.run / 'last'}; continue with: {self.hint}",
                              self.signum)


def resume_command(argv: list[str], world: int) -> str:
    """The command line that continues this run: the one given, with --resume instead of --overwrite."""
    import shlex

    args = [a for a in argv if a not in ("--resume", "--overwrite")] + ["--resume"]
    launcher = f"torchrun --nproc_per_node {world} train.py" if world > 1 else command_line("train")
    return " ".join([launcher, *map(shlex.quote, args)])
