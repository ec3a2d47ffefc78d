"""Music quality, ours vs the reference pipeline, on the same chorales, model size and CPU time.

    python bench/quality.py [--steps 392] [--samples 20] [--out /tmp/quality]

ours:     train.py --config configs/chorales.toml (train.max_steps=--steps), then our generate from BOS.
reference: MidiTok REMI (REMIPlus parameters) + MidiTok BPE trained on the same train split, transformers'
          MistralForCausalLM of the same size trained by a plain AdamW loop on the same chunking, batch, lr and
          schedule until it has used the CPU time our train.py used, then transformers' generate.
Both sample from BOS with the reference settings (temperature 0.5, top-k 6, no-repeat-ngram 6, 256..512 new
tokens); ours is also sampled as `sample.py` does by default (SamplingConfig(), grammar on). All are scored with
midistral.evaluate against the run's test split: OA per metric, side by side. Both trainings see the same
files and the same number of transposed copies (data.transpose, data.transpose_copies).
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.simplefilter("ignore")

import miditok  # noqa: E402
import symusic  # noqa: E402
from transformers import MistralConfig, MistralForCausalLM  # noqa: E402

from midistral.checkpoint import load_model_and_tokenizer  # noqa: E402
from midistral.config import load_config  # noqa: E402
from midistral.data import TokenChunks, epoch_order  # noqa: E402
from midistral.data.dataset import DATA_FORMAT  # noqa: E402
from midistral.evaluate import SUMMARY_METRICS, compare, measure_set  # noqa: E402
from midistral.generate import generate  # noqa: E402
from midistral.sampler import Sampler  # noqa: E402
from midistral.tokenize import DEFAULT_PARAMS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORT_SAMPLING = dict(temperature=0.5, top_k=6, no_repeat_ngram_size=6)


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train_ours(out: Path, steps: int) -> float:
    """Our train.py on the embedded default; returns the CPU seconds it used."""
    before = children_cpu_seconds()
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "chorales.toml"), f"out_dir={out}", "sample.num_samples=0"]
    if steps:
        cmd.append(f"train.max_steps={steps}")
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return children_cpu_seconds() - before


def miditok_shards(manifest: dict, folder: Path, vocab: int, shift_range: tuple[int, int], copies: int, seed: int):
    """The reference setup's tokenization of the same split: MidiTok BPE on the train files, shards TokenChunks reads;
    each train file also `copies` times transposed by distinct random shifts in `shift_range`, as ours."""
    tok = miditok.REMI(miditok.TokenizerConfig(**DEFAULT_PARAMS))
    train_files = manifest["counts"]["train"]["files_list"]
    tok.train(vocab_size=vocab, model="BPE", files_paths=[Path(f) for f in train_files])
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shifts = [s for s in range(shift_range[0], shift_range[1] + 1) if s]
    for split in ("train", "val"):
        seqs = []
        for f in manifest["counts"][split]["files_list"]:
            score = symusic.Score(f)
            picked = rng.choice(shifts, size=min(copies, len(shifts)), replace=False) if split == "train" and shifts else []
            versions = [score] + [score.shift_pitch(int(k)) for k in picked]
            seqs += [np.asarray(tok.encode(v).ids, np.uint16) for v in versions]
        np.concatenate(seqs).tofile(folder / f"{split}.bin")
        np.save(folder / f"{split}.idx.npy", np.r_[0, np.cumsum([len(s) for s in seqs])].astype(np.int64))
    # the manifest TokenChunks checks: data format, dtype, vocabulary, shard sizes
    shards = {p.name: {"bytes": p.stat().st_size} for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps({**DATA_FORMAT, "dtype": "uint16", "vocab_size": len(tok),
                                                      "fingerprint": "miditok", "shards": shards}))
    return tok


def train_report(tok, folder: Path, cfg, cpu_budget: float, schedule_steps: int):
    """transformers' Mistral, same size as ours, plain AdamW loop until `cpu_budget` CPU seconds are spent."""
    m, tc, dc = cfg.model, cfg.train, cfg.data
    pad, bos, eos = tok["PAD_None"], tok["BOS_None"], tok["EOS_None"]
    hf = MistralForCausalLM(MistralConfig(
        vocab_size=len(tok), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, sliding_window=m.sliding_window,
        max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=False,
        pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, attn_implementation="sdpa"))
    chunks = TokenChunks(folder, "train", dc.min_seq, dc.max_seq, bos, eos, pad)
    opt = torch.optim.AdamW(hf.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    warm = int(tc.warmup_ratio * schedule_steps)
    lr_at = lambda s: tc.lr * ((s + 1) / warm if s < warm else  # noqa: E731
                                  0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, schedule_steps - warm)))))
    start, step, epoch = time.process_time(), 0, 0
    while step < schedule_steps and time.process_time() - start < cpu_budget:
        order = epoch_order(len(chunks), 0, epoch)
        for i in range(0, len(order) - tc.batch_size + 1, tc.batch_size):
            x, y = chunks.batch(order[i:i + tc.batch_size])
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            logits = hf(x).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), tc.grad_clip or 1e9)
            opt.step(), opt.zero_grad()
            step += 1
            if step >= schedule_steps or time.process_time() - start >= cpu_budget:
                break
        epoch += 1
    return hf.eval(), step, time.process_time() - start


@torch.no_grad()
def sample_report(hf, tok, n: int, max_new: int, min_new: int, seed: int) -> list:
    torch.manual_seed(seed)
    ids = torch.full((n, 1), tok["BOS_None"], dtype=torch.long)
    out = hf.generate(ids, do_sample=True, max_new_tokens=max_new, min_new_tokens=min_new, pad_token_id=tok["PAD_None"],
                      eos_token_id=tok["EOS_None"], attention_mask=torch.ones_like(ids), **REPORT_SAMPLING)
    scores = []
    for row in out[:, 1:].tolist():
        row = [t for t in row if t not in (tok["PAD_None"], tok["EOS_None"])]
        scores.append(tok.decode(miditok.TokSequence(ids=row, are_ids_encoded=True)) if row else symusic.Score())
    return scores


def sample_ours(run: Path, n: int, max_new: int, min_new: int, seed: int) -> list:
    model, tok = load_model_and_tokenizer(run)
    ids = torch.full((n, 1), tok.bos_id, dtype=torch.long)
    out = generate(model, ids, max_new, min_new_tokens=min_new, eos_id=tok.eos_id, pad_id=tok.pad_id, seed=seed, **REPORT_SAMPLING)
    return [tok.decode([t for t in row if t not in (tok.pad_id, tok.eos_id)]) for row in out[:, 1:].tolist()]


def sample_ours_defaults(run: Path, n: int, seed: int) -> list:
    """What `sample.py --ckpt RUN --num-samples n` writes: its defaults (SamplingConfig()), from BOS."""
    sampler = Sampler.load(run, device="cpu", log=lambda msg: None)
    return [s.score for s in sampler.sample(None, num_samples=n, seed=seed)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=0, help="train.max_steps for ours (0: the config's epochs)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--min-new", type=int, default=256)
    ap.add_argument("--out", default="/tmp/quality")
    ap.add_argument("--ours", help="reuse this trained run of configs/chorales.toml instead of training one")
    ap.add_argument("--cpu-seconds", type=float, help="with --ours: the CPU time that run used")
    args = ap.parse_args()
    out = Path(args.out)
    ours = Path(args.ours) if args.ours else out / "ours"
    cfg = load_config(ROOT / "configs" / "chorales.toml", [f"out_dir={ours}"])
    cpu = args.cpu_seconds if args.ours else train_ours(ours, args.steps)
    manifest = json.loads((ours / "data" / "manifest.json").read_text())
    n_train_chunks = len(TokenChunks(ours / "data", "train", cfg.data.min_seq, cfg.data.max_seq, 1, 2, 0))
    schedule = args.steps or cfg.train.epochs * (n_train_chunks // cfg.train.batch_size)
    mt = miditok_shards(manifest, out / "report" / "data", cfg.data.bpe_vocab_size, cfg.data.transpose,
                        cfg.data.transpose_copies, 0)
    hf, hf_steps, hf_cpu = train_report(mt, out / "report" / "data", cfg, cpu, schedule)
    print(f"training CPU time: ours {cpu:.0f} s, reference {hf_cpu:.0f} s ({hf_steps} of {schedule} steps)")
    real = measure_set(manifest["counts"]["test"]["files_list"])
    results = {}
    for name, scores in (("ours", sample_ours(ours, args.samples, args.max_new, args.min_new, 0)),
                         ("reference", sample_report(hf, mt, args.samples, args.max_new, args.min_new, 0)),
                         ("ours, sample.py defaults", sample_ours_defaults(ours, args.samples, 0))):
        results[name] = compare(real, measure_set(scores))
    print("| metric | ours, reference settings | reference pipeline, reference settings | ours, sample.py defaults |\n"
          "|---|---|---|---|")
    rows = {name: {r["metric"]: r["oa"] for r in res["rows"]} for name, res in results.items()}
    for metric in SUMMARY_METRICS:
        print(f"| {metric} | " + " | ".join(f"{r.get(metric, float('nan')):.2f}" for r in rows.values()) + " |")
    print("| mean (min) | " + " | ".join(f"{r['mean_oa']:.2f} ({r['min_oa']:.2f})" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
