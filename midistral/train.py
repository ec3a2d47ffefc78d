"""Train midistral: `python train.py --config configs/chorales.toml [section.key=value ...] [--resume | --overwrite]`.

A plain loop (nanoGPT-style): prepare the data if needed, build the model, then
    for each step: gradient-accumulated forward/backward on chunks -> clip -> AdamW -> lr schedule
    every train.eval_every steps and at each epoch end: validation loss; a new best is saved to RUN/best
    at each epoch end, at train.max_steps, every train.checkpoint_minutes and at Ctrl-C (SIGINT) or SIGTERM:
    checkpoint RUN/last (everything --resume needs)
    early stopping after train.patience epochs in which no evaluation improved.
The data order is a pure function of (seed, epoch, step), so `--resume` continues exactly where it stopped.
A folder that already holds a run is refused unless --resume or --overwrite says what to do with it (runs.py).
Runs under `torchrun --nproc_per_node N` with DistributedDataParallel (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from midistral.checkpoint import resolve_checkpoint
from midistral.config import RunConfig, SampleConfig, TrainConfig, load_config
from midistral.data import TokenChunks, epoch_order, load_splits, made_with, prepare, prepared_dir
from midistral.data.mixes import Mixes
from midistral.distributed import init_distributed, is_master
from midistral.errors import ArgumentParser, MidistralError
from midistral.io import RunLock
from midistral.model import Transformer, training
from midistral.runs import (Guard, Interrupted, agree, append_metrics, check_same_data, claim_run, load_last,
                            load_start_weights, plot_metrics, read_train_state, resume_command, resume_dir,
                            save_best, save_last, truncate_metrics)
from midistral.sampler import Sampler, write_sample_files
from midistral.tokenize import REMI
from midistral.config_files import command_line


@dataclass
class TrainState:
    """What --resume restores besides the weights, the optimiser and the RNG (state.pt holds these keys)."""

    step: int = 0
    best_val: float = math.inf
    bad_evals: int = 0          # epochs in a row in which no evaluation improved (early stopping)
    improved: bool = False      # an evaluation beat best_val since the last epoch end
    warmup_ratio: float = 0.0
    schedule_start: int = 0     # the step the lr schedule counts from (a restart cycle starts a new one)


@dataclass
class Job:
    """Everything the loop needs, built once by `setup`."""

    cfg: RunConfig
    run: Path
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module      # what the step calls: compiled and/or DDP-wrapped
    raw_model: Transformer      # what is saved and evaluated
    opt: torch.optim.Optimizer
    tok: REMI
    train_set: TokenChunks
    val_set: TokenChunks
    steps_per_epoch: int
    pack_len: int               # rows of a packed batch (train.pack); 0: one padded row per chunk
    schedule_len: int           # the lr schedule spans train.epochs (max_steps only says where to stop)
    total: int                  # the step this run stops at
    data_fingerprint: str
    state: TrainState

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1

    def autocast(self):
        return training.autocast(training.train_precision(self.cfg.train.precision, self.device), self.device)


PLOT_EVERY_S = 30.0  # RUN/loss.png at an epoch end at most this often (a chorale epoch is ~15 s), and at the end


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warm-up over warmup_ratio * total steps, then cosine decay to peak * min_ratio."""
    warm = int(warmup_ratio * total)
    if step < warm:
        return peak * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, tc: TrainConfig, device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]  # matrices only
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), fused=(device.type == "cuda") or None)


def batch_at(job: Job, step: int, micro: int):
    """This process's share of micro-batch `micro` of `step`: a pure function of (seed, epoch, position)."""
    tc, global_batch = job.cfg.train, job.cfg.train.batch_size
    epoch, i = divmod(step, job.steps_per_epoch)
    order = epoch_order(len(job.train_set), tc.seed, epoch, job.train_set.chunk_len, global_batch, tc.group_by_length)
    start = (i * tc.grad_accum + micro) * global_batch
    idx = order[np.arange(start, start + global_batch) % len(order)]
    return chunks_batch(job.train_set, idx[job.rank::job.world], job.pack_len)


def chunks_batch(chunks: TokenChunks, idx, pack_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, segments): packed into rows of pack_len tokens, or padded (segments None) at 0."""
    return chunks.packed_batch(idx, pack_len) if pack_len else (*chunks.batch(idx), None)


def pack_len(cfg: RunConfig, device: torch.device) -> int:
    """train.pack: the row length of packed batches (data.max_seq - 1, a padded batch's longest row), or 0."""
    on = cfg.train.pack == "on" or (cfg.train.pack == "auto" and device.type != "cuda")
    return cfg.data.max_seq - 1 if on else 0


def train_step(job: Job, step: int) -> tuple[float, int]:
    """One optimiser step (gradient accumulation, clipping); returns (mean loss over processes, tokens)."""
    tc, accum = job.cfg.train, job.cfg.train.grad_accum
    loss_sum, tokens = torch.zeros((), device=job.device), 0
    for micro in range(accum):
        x, y, seg = (t if t is None else t.to(job.device) for t in batch_at(job, step, micro))
        n_local = (y != -100).sum()
        scale = 1.0
        if job.ddp:  # weight each rank by its share of the batch's tokens, so N processes = 1 process
            n_global = n_local.clone()
            torch.distributed.all_reduce(n_global)
            scale = float(n_local) * job.world / max(float(n_global), 1.0)
        sync = not job.ddp or micro == accum - 1
        with (nullcontext() if sync else job.model.no_sync()), job.autocast():
            _, loss = job.model(x, y, segments=seg)
            (loss * scale / accum).backward()
        loss_sum += loss.detach() * scale
        tokens += int(n_local) * job.world
    if tc.grad_clip:
        torch.nn.utils.clip_grad_norm_(job.model.parameters(), tc.grad_clip)
    job.opt.step()
    job.opt.zero_grad(set_to_none=True)
    loss = loss_sum / accum
    if job.ddp:
        torch.distributed.all_reduce(loss)
        loss /= job.world
    return float(loss), tokens


@torch.no_grad()
def evaluate(job: Job) -> float:
    """Mean validation cross-entropy per token over the first train.eval_batches batches."""
    global_batch = job.cfg.train.batch_size
    job.model.eval()
    n = min(len(job.val_set), job.cfg.train.eval_batches * global_batch)
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for s in range(job.rank * global_batch // job.world, n, global_batch):
        x, y, seg = chunks_batch(job.val_set, np.arange(s, min(s + global_batch // job.world, n)), job.pack_len)
        with job.autocast():
            _, loss = job.raw_model(x.to(job.device), y.to(job.device), segments=seg if seg is None else seg.to(job.device))
        k = (y != -100).sum()
        total += loss.double().cpu() * k
        count += k
    if job.ddp:
        both = torch.stack([total, count]).to(job.device)
        torch.distributed.all_reduce(both)
        total, count = both[0].cpu(), both[1].cpu()
    job.model.train()
    return float(total / count)


def load_data(cfg: RunConfig, master: bool, ddp: bool) -> tuple[REMI, TokenChunks, TokenChunks]:
    """The prepared data (rank 0 prepares it if needed): tokenizer, train and val chunks."""
    data_dir = prepare(cfg) if master else prepared_dir(cfg)
    if ddp:
        torch.distributed.barrier()
    return load_splits(data_dir, cfg.data.min_seq, cfg.data.max_seq, Mixes.from_data_config(cfg.data), cfg.train.seed,
                       cfg.data.style_repeats)


def restore(job: Job, last: Path, saved: dict) -> None:
    """Load RUN/last (or .last.old) into the job: weights, and unless train.restart, optimiser, RNG and state."""
    restart = job.cfg.train.restart
    load_last(last, saved, job.raw_model, job.opt, job.tok, prepared_dir(job.cfg), weights_only=restart)
    if restart:  # the reference setup's second cycle: same weights, fresh optimiser and schedule, no warm-up
        job.state = TrainState(step=saved["step"], best_val=saved["best_val"], schedule_start=saved["step"])
    else:
        job.state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})


def setup(cfg: RunConfig, args: argparse.Namespace) -> Job:
    """Data, model, optimiser and state, restored from RUN/last with --resume."""
    tc, run = cfg.train, Path(cfg.out_dir)
    rank, world, device = init_distributed(tc.device)
    # before data prep: a folder holding a run is refused (or resumed, or overwritten) at once, rank 0 deciding
    last = agree(lambda: claim_run(run, args.resume, args.overwrite), rank == 0, world > 1)
    training.train_precision(tc.precision, device)  # bf16 where it cannot run: one line, before any work
    saved = read_train_state(last / "state.pt") if last is not None else None
    if saved is not None and not tc.restart:  # before preparing: never overwrite the run's data with other data
        check_same_data(last, saved, made_with(cfg)[1], prepared_dir(cfg))
    tok, train_set, val_set = load_data(cfg, rank == 0, world > 1)
    mcfg = dataclasses.replace(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                               eos_token_id=tok.eos_id)
    if tc.batch_size % world:
        raise MidistralError(f"train.batch_size={tc.batch_size} must be divisible by the number of processes ({world})")
    torch.manual_seed(tc.seed)
    raw_model = Transformer(mcfg).to(device)
    steps_per_epoch = max(1, len(train_set) // (tc.batch_size * tc.grad_accum))
    job = Job(cfg, run, rank, world, device, raw_model, raw_model, make_optimizer(raw_model, tc, device), tok,
              train_set, val_set, steps_per_epoch, pack_len(cfg, device), tc.epochs * steps_per_epoch, 0, train_set.fingerprint,
              TrainState(warmup_ratio=tc.warmup_ratio))
    if last is not None:
        restore(job, last, saved)
    elif tc.init_from:  # a new run starting from trained weights (the default model's second cycle: MODEL_CARD.md)
        load_start_weights(resolve_checkpoint(tc.init_from), raw_model, tok, prepared_dir(cfg))
    job.total = tc.max_steps or job.state.schedule_start + job.schedule_len
    if job.state.step >= job.total:
        raise MidistralError(f"{run}: already at step {job.state.step} of {job.total}, nothing to train "
                             "(raise train.max_steps or train.epochs)")
    if job.master:
        if last is not None:
            dropped = truncate_metrics(run / "metrics.jsonl", job.state.step)
            print(f"resumed {run} at step {job.state.step}" + (" (restart cycle)" if tc.restart else "")
                  + (f"; dropped {dropped} metric rows logged after that checkpoint" if dropped else ""))
        elif (run / "metrics.jsonl").exists():
            (run / "metrics.jsonl").unlink()  # a fresh run in an old folder starts a fresh log
        if last is None and tc.init_from:
            print(f"weights from {tc.init_from}")
        print(f"run {run}: {raw_model.num_params():,} parameters, {len(train_set)} train chunks, {len(val_set)} val "
              f"chunks, {steps_per_epoch} steps/epoch, {job.total} steps, device {device}, {world} process(es)")
    if tc.compile:
        job.model = torch.compile(job.model)
    if job.ddp:
        job.model = torch.nn.parallel.DistributedDataParallel(job.model, device_ids=[device] if device.type == "cuda" else None)
    return job


def train(job: Job, guard: Guard) -> None:
    """The loop: step, log, evaluate (best/), checkpoint (last/) at epoch ends, every train.checkpoint_minutes
    and at a signal (`guard`: it raises Interrupted after saving), stop early."""
    tc, state, metrics = job.cfg.train, job.state, job.run / "metrics.jsonl"

    def save():
        save_last(job.run, job.raw_model, job.tok, asdict(state), job.opt, job.data_fingerprint, job.cfg.to_dict())

    bar = tqdm(total=job.total, initial=state.step, disable=not job.master, desc="train", dynamic_ncols=True)
    t_last = t_plot = time.perf_counter()
    job.model.train()
    while state.step < job.total:
        lr = lr_at(state.step - state.schedule_start, job.schedule_len, tc.lr, state.warmup_ratio, tc.min_lr_ratio)
        for g in job.opt.param_groups:
            g["lr"] = lr
        loss, tokens = train_step(job, state.step)
        if not math.isfinite(loss):
            raise MidistralError(f"{job.run}: the training loss is {loss} at step {state.step + 1} (lower train.lr?)")
        state.step += 1
        step = state.step
        if job.master:
            now = time.perf_counter()
            tps, t_last = tokens / max(now - t_last, 1e-9), now
            if step % tc.log_every == 0 or step == job.total:
                append_metrics(metrics, {"step": step, "loss": loss, "lr": lr, "tokens_per_s": round(tps, 1)})
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
            bar.update(1)
        epoch_end = step % job.steps_per_epoch == 0
        if (tc.eval_every and step % tc.eval_every == 0) or epoch_end or step == job.total:
            val = evaluate(job)
            if job.master:
                append_metrics(metrics, {"step": step, "val_loss": val, "epoch": step / job.steps_per_epoch})
                bar.write(f"step {step}: val loss {val:.4f}")
            if val < state.best_val:
                state.best_val, state.improved = val, True
                if job.master:
                    save_best(job.run, job.raw_model, job.tok, step, val)
        if epoch_end or step == job.total:
            if epoch_end:
                state.bad_evals = 0 if state.improved else state.bad_evals + 1
                state.improved = False
            stopping = step == job.total or (tc.patience and state.bad_evals >= tc.patience)
            if job.master:
                save()
                if stopping or time.perf_counter() - t_plot >= PLOT_EVERY_S:
                    plot_metrics(job.run)
                    t_plot = time.perf_counter()
            guard.saved(step)
            if tc.patience and state.bad_evals >= tc.patience:
                if job.master:
                    bar.write(f"early stop at step {step}: no improvement for {tc.patience} epoch(s)")
                break
        try:
            guard.after_step(step, save)
        except Interrupted:
            bar.close()
            raise
    bar.close()


def write_samples(run: Path, sc: SampleConfig) -> None:
    """A few pieces from the trained model ([sample]), as sample.py writes them, in RUN/samples."""
    sampler = Sampler.load(run, log=lambda msg: print(msg, file=sys.stderr))
    samples = sampler.sample(None, sc, num_samples=sc.num_samples, seed=sc.seed)
    write_sample_files(samples, run / "samples", "sample", sampler.ckpt)


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a TOML run config (configs/*.toml)")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last checkpoint")
    how.add_argument("--overwrite", action="store_true",
                     help="replace the run in out_dir (its checkpoints, metrics and samples; the prepared data stays)")
    ap.add_argument("overrides", nargs="*", help="section.key=value (and out_dir=DIR), anywhere on the line")
    args = ap.parse_intermixed_args(argv)
    job = None
    try:
        cfg = load_config(args.config, args.overrides)
        run = Path(cfg.out_dir)
        if args.resume and is_master():
            resume_dir(run)  # before the lock creates the folder: a typo in out_dir fails at once
        with RunLock(run) if is_master() else nullcontext():
            job = setup(cfg, args)
            with Guard(run, cfg.train.checkpoint_minutes, job.master, job.ddp,
                       resume_command(sys.argv[1:] if argv is None else argv, job.world)) as guard:
                train(job, guard)
            if job.ddp:
                torch.distributed.barrier()
                torch.distributed.destroy_process_group()
        if job.master:
            print(f"done: {run} (best val loss {job.state.best_val:.4f}); "
                  f"sample with: {command_line('sample')} --ckpt {run}")
            if cfg.train.sample_after and cfg.sample.num_samples > 0:
                write_samples(run, cfg.sample)
    except MidistralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        if is_master():
            print(f"\n{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # outside the loop's Guard: before training (data preparation) or after it
        print("\ninterrupted " + ("before training started: nothing to save" if job is None else
                                  "after training: the run is saved"), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
