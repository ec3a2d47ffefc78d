"""Train midistral: `python train.py --config configs/chorales.toml [section.key=value ...] [--resume]`.

A plain loop (nanoGPT-style): prepare the data if needed, build the model, then
    for each step: gradient-accumulated forward/backward on chunks -> clip -> AdamW -> lr schedule
    every train.eval_every steps and at each epoch end: validation loss; a new best is saved to RUN/best
    at each epoch end and at train.max_steps: checkpoint RUN/last (everything --resume needs)
    early stopping after train.patience epochs in which no evaluation improved.
The data order is a pure function of (seed, epoch), so `--resume` continues exactly where it stopped.
Runs under `torchrun --nproc_per_node N` with DistributedDataParallel (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from midistral.errors import CheckpointError, MidistralError


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warm-up over warmup_ratio * total steps, then cosine decay to peak * min_ratio."""
    warm = int(warmup_ratio * total)
    if step < warm:
        return peak * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, tc: dict, device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]  # matrices only
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=tc["lr"], betas=tuple(tc["betas"]), fused=fused or None)


def log_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:  # append-only: a crash loses at most the line being written
        f.write(json.dumps(row) + "\n")


def resume_dir(run: Path) -> Path:
    """The checkpoint to resume from: RUN/last, or RUN/.last.old when a kill fell between the two renames
    of a checkpoint swap (the new folder was not yet in place, the previous one is whole)."""
    for d in (run / "last", run / ".last.old"):
        if (d / "state.pt").is_file():
            return d
    raise CheckpointError(f"{run}: nothing to resume (no last/state.pt)")


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the rows a killed run logged after its last checkpoint, so the resumed run's rows replace
    them instead of repeating their steps. Returns how many rows were dropped."""
    from midistral.io import atomic_write_text

    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if row.get("step", 0) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


def plot_metrics(run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from midistral.io import atomic_path

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a TOML run config (configs/*.toml)")
    ap.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last checkpoint")
    ap.add_argument("overrides", nargs="*", help="section.key=value (and out_dir=DIR)")
    args = ap.parse_args(argv)
    try:
        return train(args)
    except MidistralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def train(args) -> int:
    from tqdm import tqdm

    from midistral.checkpoint import save_checkpoint
    from midistral.config import load_config
    from midistral.data import TokenChunks, epoch_order, prepare, prepared_dir
    from midistral.model import ModelConfig, Transformer
    from midistral.tokenize import REMI

    cfg = load_config(args.config, args.overrides)
    tc, dc = cfg["train"], cfg["data"]
    run = Path(cfg["out_dir"])

    # distributed: torchrun sets these
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    ddp = world > 1
    if tc["device"] == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(tc["device"])
    if ddp:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0

    last = resume_dir(run) if args.resume else None  # before data prep: a typo in out_dir fails at once
    data_dir = prepared_dir(cfg)
    if master:
        prepare(cfg)
    if ddp:
        torch.distributed.barrier()
    tok = REMI.load(data_dir / "tokenizer.json")
    mk = lambda split: TokenChunks(data_dir, split, dc["min_seq"], dc["max_seq"], tok.bos_id, tok.eos_id, tok.pad_id)  # noqa: E731
    train_set, val_set = mk("train"), mk("val")
    if len(train_set) == 0:
        raise MidistralError(f"{data_dir}: the train split has no chunks (lower data.min_seq?)")

    mcfg = ModelConfig(**{**cfg["model"], "vocab_size": len(tok), "pad_token_id": tok.pad_id,
                          "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id})
    if mcfg.max_position_embeddings < dc["max_seq"]:
        raise MidistralError(f"model.max_position_embeddings={mcfg.max_position_embeddings} < data.max_seq={dc['max_seq']}")
    torch.manual_seed(tc["seed"])
    model = Transformer(mcfg).to(device)
    opt = make_optimizer(model, tc, device)

    global_batch = tc["batch_size"]
    if global_batch % world:
        raise MidistralError(f"train.batch_size={global_batch} must be divisible by the number of processes ({world})")
    steps_per_epoch = max(1, len(train_set) // (global_batch * tc["grad_accum"]))
    # The lr schedule spans train.epochs; train.max_steps only says where to stop, so a run stopped early
    # and resumed with a larger max_steps follows the same schedule as one that never stopped.
    schedule_len = tc["epochs"] * steps_per_epoch
    # improved: an evaluation beat best_val since the last epoch end (patience counts epochs without one)
    state = {"step": 0, "best_val": float("inf"), "bad_evals": 0, "improved": False, "warmup_ratio": tc["warmup_ratio"],
             "schedule_start": 0}

    if args.resume:
        model.load_weights({k: v for k, v in _load_safetensors(last / "model.safetensors").items()}, last)
        saved = torch.load(last / "state.pt", weights_only=True, map_location="cpu")
        if tc["restart"]:  # the report's second cycle: same weights, fresh optimiser and schedule, no warm-up
            state.update(step=saved["step"], best_val=saved["best_val"], bad_evals=0, improved=False, warmup_ratio=0.0,
                         schedule_start=saved["step"])
        else:
            opt.load_state_dict(saved["optimizer"])
            state.update({k: saved[k] for k in ("step", "best_val", "bad_evals", "warmup_ratio", "schedule_start")},
                         improved=saved.get("improved", False))
            torch.set_rng_state(saved["torch_rng"])
        if master:
            dropped = truncate_metrics(run / "metrics.jsonl", state["step"])
            print(f"resumed {run} at step {state['step']}" + (" (restart cycle)" if tc["restart"] else "")
                  + (f"; dropped {dropped} metric rows logged after that checkpoint" if dropped else ""))
    elif master and (run / "metrics.jsonl").exists():
        (run / "metrics.jsonl").unlink()  # a fresh run in an old folder starts a fresh log

    total = tc["max_steps"] or state["schedule_start"] + schedule_len  # where this run stops
    raw_model = model
    if tc["compile"]:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def batch_at(step: int, micro: int):
        epoch, i = divmod(step, steps_per_epoch)
        order = epoch_order(len(train_set), tc["seed"], epoch)
        start = (i * tc["grad_accum"] + micro) * global_batch
        idx = order[np.arange(start, start + global_batch) % len(order)]
        return train_set.batch(idx[rank::world])

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        n = min(len(val_set), tc["eval_batches"] * global_batch)
        tot, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for s in range(rank * global_batch // world, n, global_batch):
            x, y = val_set.batch(np.arange(s, min(s + global_batch // world, n)))
            with autocast:
                _, loss = raw_model(x.to(device), y.to(device))
            k = (y != -100).sum()
            tot += loss.double().cpu() * k
            count += k
        if ddp:
            t = torch.stack([tot, count]).to(device)
            torch.distributed.all_reduce(t)
            tot, count = t[0].cpu(), t[1].cpu()
        model.train()
        return float(tot / count) if count > 0 else float("nan")

    def checkpoint(step: int):
        """RUN/last: weights, tokenizer and everything --resume needs."""
        if not master:
            return

        def write_state(d: Path):
            torch.save({"optimizer": opt.state_dict(), "step": step, "best_val": state["best_val"],
                        "bad_evals": state["bad_evals"], "improved": state["improved"],
                        "warmup_ratio": state["warmup_ratio"], "schedule_start": state["schedule_start"],
                        "torch_rng": torch.get_rng_state()}, d / "state.pt")
            (d / "train_config.json").write_text(json.dumps(cfg, indent=2))

        save_checkpoint(run / "last", raw_model, tok, extra=write_state)
        plot_metrics(run)

    def save_best(step: int, val: float):
        """RUN/best: the weights of the best evaluation so far, whenever it happens (mid-epoch too)."""
        if master:
            save_checkpoint(run / "best", raw_model, tok, extra=lambda d: (d / "best.json").write_text(
                json.dumps({"step": step, "val_loss": val}) + "\n"))

    if master:
        run.mkdir(parents=True, exist_ok=True)
        n_params = raw_model.num_params()
        print(f"run {run}: {n_params:,} parameters, {len(train_set)} train chunks, {len(val_set)} val chunks, "
              f"{steps_per_epoch} steps/epoch, {total} steps, device {device}, {world} process(es)")
    model.train()
    step = state["step"]
    bar = tqdm(total=total, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    t_last, tokens_since = time.perf_counter(), 0
    while step < total:
        lr = lr_at(step - state["schedule_start"], schedule_len, tc["lr"], state["warmup_ratio"], tc["min_lr_ratio"])
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(tc["grad_accum"]):
            x, y = batch_at(step, micro)
            x, y = x.to(device), y.to(device)
            sync = not ddp or micro == tc["grad_accum"] - 1
            ctx = model.no_sync() if not sync else _nullcontext()
            n_local = (y != -100).sum()
            scale = 1.0
            if ddp:  # weight each rank by its share of the batch's tokens, so N processes = 1 process
                n_global = n_local.clone()
                torch.distributed.all_reduce(n_global)
                scale = float(n_local) * world / max(float(n_global), 1.0)
            with ctx, autocast:
                _, loss = model(x, y)
                (loss * scale / tc["grad_accum"]).backward()
            loss_sum += loss.detach() * scale
            tokens_since += int(n_local) * world
        if tc["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_val = loss_sum / tc["grad_accum"]
        if ddp:
            torch.distributed.all_reduce(loss_val)
            loss_val /= world
        loss_val = float(loss_val)
        if master:
            now = time.perf_counter()
            tps = tokens_since / max(now - t_last, 1e-9)
            if step % tc["log_every"] == 0 or step == total:
                log_jsonl(run / "metrics.jsonl", {"step": step, "loss": loss_val, "lr": lr, "tokens_per_s": round(tps, 1)})
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            t_last, tokens_since = now, 0
        epoch_end = step % steps_per_epoch == 0
        val = None
        if (tc["eval_every"] and step % tc["eval_every"] == 0) or epoch_end or step == total:
            val = evaluate()
            if master:
                log_jsonl(run / "metrics.jsonl", {"step": step, "val_loss": val, "epoch": step / steps_per_epoch})
                bar.write(f"step {step}: val loss {val:.4f}")
            if val < state["best_val"]:
                state["best_val"], state["improved"] = val, True
                save_best(step, val)
        if epoch_end or step == total:
            if epoch_end:
                state["bad_evals"] = 0 if state["improved"] else state["bad_evals"] + 1
                state["improved"] = False
            checkpoint(step)
            if tc["patience"] and state["bad_evals"] >= tc["patience"]:
                if master:
                    bar.write(f"early stop at step {step}: no improvement for {tc['patience']} epoch(s)")
                break
    bar.close()
    if ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if master:
        print(f"done: {run} (best val loss {state['best_val']:.4f}); sample with: python sample.py --ckpt {run}")
        if tc["sample_after"] and cfg["sample"]["num_samples"] > 0:
            write_samples(run, cfg["sample"])
    return 0


def write_samples(run: Path, sc: dict) -> None:
    """A few pieces from the trained model, with sample.py (the same code a user runs)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sample

    sample.main(["--ckpt", str(run), "--out", str(run / "samples"), "--num-samples", str(sc["num_samples"]),
                 "--max-new-tokens", str(sc["max_new_tokens"]), "--min-new-tokens", str(sc["min_new_tokens"]),
                 "--temperature", str(sc["temperature"]),
                 "--top-k", str(sc["top_k"]), "--no-repeat-ngram", str(sc["no_repeat_ngram"]), "--seed", str(sc["seed"])])


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    sys.exit(main())
