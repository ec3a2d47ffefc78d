"""Training-step speed and memory: our decoder vs transformers' MistralForCausalLM (sdpa), same weights.

    python bench/train_step.py                 # seq 2048 and 8192, batch 1 (several minutes on 2 cores)
    python bench/train_step.py --seqs 2048 --rounds 1
    python bench/train_step.py --seqs 2048 --ours eager compile bf16 compile+bf16   # train.compile / train.precision
    python bench/train_step.py --seqs 2048 --ours trainpy trainpy+bf16 trainpy+compile+bf16   # train.py's own step

One training step = forward + cross-entropy + backward + AdamW step, fp32, on the reference model of the
report (24M parameters: vocab 5000, hidden 512, intermediate 1024, 8 layers, 4 heads, 2 KV heads,
window 512, 8192 positions). The transformers model is built with random weights and saved with
save_pretrained; ours is loaded from that folder with `checkpoint.load_model`, so both train the same weights.

Each (model, length) runs in a fresh subprocess, so the peak resident set (resource.getrusage ru_maxrss,
in MiB) is that measurement's own; we also print the peak minus the resident set just before the first
step (the memory the training step itself needs). tokens/s is the median over the timed steps after one
warm-up step.

GFLOP/s: useful FLOPs of a step (6 * tokens * matmul parameters, plus the attention FLOPs over the keys
each query really sees: min(i + 1, W) for query i) divided by the step time, against a large fp32 matmul
measured in the same run. transformers' step does the same useful work (its attention computes the
full N x N scores and masks them; that extra work is not counted).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REF = dict(vocab_size=5000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
           num_attention_heads=4, num_key_value_heads=2, sliding_window=512, max_position_embeddings=8192,
           bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def step_flops(n: int, batch: int = 1) -> float:
    c = REF
    d, h, hd = c["hidden_size"], c["num_attention_heads"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    per_layer = d * (h * hd) * 2 + d * kv * 2 + 3 * d * c["intermediate_size"]
    matmul_params = c["num_hidden_layers"] * per_layer + d * c["vocab_size"]
    W = c["sliding_window"]
    keys_seen = sum(min(i + 1, W) for i in range(n))
    attn = c["num_hidden_layers"] * h * hd * keys_seen * 2 * 2  # QK^T and PV, 2 FLOPs per multiply-add
    return batch * 3 * (2 * n * matmul_params + attn)  # backward = 2x forward


def matmul_gflops(size: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def trainpy_step(model, ids: torch.Tensor, targets: torch.Tensor, variants: list[str]):
    """The step train.py runs (midistral.train.train_step: its optimiser groups, autocast from
    train.precision, gradient clipping), on a Job around `model` whose train set is the one chunk."""
    from midistral.config import RunConfig, TrainConfig
    from midistral.train import Job, TrainState, make_optimizer, train_step

    class OneChunk:
        chunk_len = None

        def __len__(self):
            return 1

        def batch(self, idx):
            return ids, targets

    tc = TrainConfig(batch_size=1, precision="bf16" if "bf16" in variants else "fp32", compile="compile" in variants)
    cfg = RunConfig(train=tc)
    device = torch.device("cpu")
    net = torch.compile(model) if tc.compile else model
    job = Job(cfg, Path("."), 0, 1, device, net, model, make_optimizer(model, tc, device), None, OneChunk(),
              OneChunk(), 1, 0, 1, 1, "", TrainState())  # one 2048-token chunk: nothing to pack
    return lambda: train_step(job, 0)[0]


def worker(which: str, folder: str, n: int, steps: int) -> dict:
    """which: "hf", or "ours"/"trainpy" with variants joined by "+": compile (torch.compile, as train.compile),
    bf16 (autocast, as train.precision=bf16). "trainpy" runs train.py's own step function."""
    from contextlib import nullcontext

    torch.manual_seed(0)
    variants = which.split("+")
    if variants[0] in ("ours", "trainpy"):
        from midistral.checkpoint import load_model

        model = load_model(folder)
    else:
        from transformers import MistralForCausalLM

        model = MistralForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, REF["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n))
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)

    net = torch.compile(model) if "compile" in variants else model
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in variants else nullcontext()

    def step():
        if variants[0] == "ours":
            with cast:
                loss = net(ids, targets)[1]
        else:
            loss = model(ids, labels=ids).loss  # transformers shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    if variants[0] == "trainpy":
        step = trainpy_step(model, ids, targets, variants)  # noqa: F811
    base = rss_mib()
    times, losses = [], []
    for i in range(steps + 1):
        t = time.perf_counter()
        losses.append(step())
        if i:  # the first step warms up (allocator, AdamW state)
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dt = min(times)
    return dict(which=which, n=n, step_s=dt, median_s=statistics.median(times), tok_s=n / dt, peak_mib=peak, step_mib=peak - base, loss0=losses[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--steps", type=int, default=2, help="timed steps per measurement (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating fresh-subprocess runs of each model")
    ap.add_argument("--ours", nargs="+", default=["eager"],
                    help="our variants: eager, compile, bf16, compile+bf16, and trainpy[+compile][+bf16] (train.py's "
                         "step function; each against the same transformers run)")
    ap.add_argument("--worker", nargs=3, metavar=("WHICH", "FOLDER", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        which, folder, n = args.worker
        print(json.dumps(worker(which, folder, int(n), args.steps)))
        return

    from transformers import MistralConfig, MistralForCausalLM

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32, batch 1")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        MistralForCausalLM(MistralConfig(**REF)).save_pretrained(tmp)
        peak = matmul_gflops()
        print(f"large matmul (2048^3 fp32): {peak:.1f} GFLOP/s")
        for n in args.seqs:
            res = {}
            for _ in range(args.rounds):
                for which in [v if v.startswith("trainpy") else "ours" if v == "eager" else "ours+" + v
                              for v in args.ours] + ["hf"]:
                    out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", which, tmp, str(n)],
                                         capture_output=True, text=True)
                    if out.returncode:
                        sys.exit(f"{which} at {n} failed:\n{out.stderr[-3000:]}")
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    best = res.setdefault(which, r)
                    best["step_s"] = min(best["step_s"], r["step_s"])
                    best["tok_s"] = n / best["step_s"]
                    best["peak_mib"], best["step_mib"] = max(best["peak_mib"], r["peak_mib"]), max(best["step_mib"], r["step_mib"])
            h = res["hf"]
            o = res.get("ours") or next(r for w, r in res.items() if w != "hf")
            gf = lambda r: step_flops(n) / r["step_s"] / 1e9  # noqa: E731
            print(f"\nseq {n}: first loss ours {o['loss0']:.5f} / transformers {h['loss0']:.5f}")
            print(f"  tokens/s      ours {o['tok_s']:8.1f}   transformers {h['tok_s']:8.1f}   ratio {o['tok_s'] / h['tok_s']:.2f}x")
            print(f"  step time s   ours {o['step_s']:8.2f}   transformers {h['step_s']:8.2f}")
            print(f"  peak RSS MiB  ours {o['peak_mib']:8.0f}   transformers {h['peak_mib']:8.0f}   ratio {o['peak_mib'] / h['peak_mib']:.2f}")
            print(f"  step MiB      ours {o['step_mib']:8.0f}   transformers {h['step_mib']:8.0f}   (peak - RSS before the first step)")
            print(f"  GFLOP/s       ours {gf(o):8.1f}   transformers {gf(h):8.1f}   ours = {100 * gf(o) / peak:.0f}% of the large matmul")
            for which, r in res.items():
                if which not in ("ours", "hf"):
                    print(f"  {which:13s} step {r['step_s']:.2f} s, {h['step_s'] / r['step_s']:.2f}x transformers, "
                          f"first loss {r['loss0']:.5f}")
    # recheck the matmul at the end: other jobs on the machine change it
    print(f"\nlarge matmul again: {matmul_gflops():.1f} GFLOP/s")


if __name__ == "__main__":
    main()
