"""Music quality, ours vs the reference pipeline, on the same data, model size and CPU time (or steps).

    python bench/quality.py [--steps 392] [--samples 20] [--out /tmp/quality]
    python bench/quality.py --folder ../shared/midi/dev --steps 400 --bars 8 --samples 24   # real pop/multi-track
           [--train-seed S] [--seed S] [--ours RUN --cpu-seconds N --reuse-reference] [--mix]

`--folder DIR`: data we did not tune on. Both pipelines prepare DIR as the reference setup did (4/4 only, at
most 200 bars, split 80/10/10 by our prepare; MidiTok tokenizes the same files), train the embedded default's
model size for exactly `--steps` steps of the same batches, and sample from BOS at both settings, the
reference setup's and sample.py's defaults (both pipelines at both). Samples are cut to their first `--bars`
bars (ours at its defaults asks for them: `--bars`, with and without the grammar mask); the real set is every
`--bars`-bar excerpt of the held-out songs (validation and test splits). Ours trains plain, as the reference loop
(`--mix` keeps the config's fill-in-the-middle and attribute chunks), in train.py's default precision, and is
sampled from its weights after exactly `--steps` steps (RUN/last), as the reference's.

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
from midistral.music import first_bars  # noqa: E402
from midistral.sampler import Sampler  # noqa: E402
from midistral.sampling import SamplingConfig  # noqa: E402
from midistral.tokenize import DEFAULT_PARAMS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORT_SAMPLING = dict(temperature=0.5, top_k=6, no_repeat_ngram_size=6)


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


DEFAULT_SAMPLING = {k: getattr(SamplingConfig(), k) for k in ("temperature", "top_k", "no_repeat_ngram_size")}  # sample.py's


def folder_overrides(folder: Path, mix: bool = False) -> list[str]:
    """The embedded default's config on a folder of MIDI files, filtered as the reference setup's Lakh data.
    Without `mix`, plain next-token training as the reference loop's (no fill-in-the-middle or attribute
    chunks): on 33 pop songs at 400 steps the mix cost 0.14 OA at the reference settings (bench/RESULTS.md)."""
    plain = [] if mix else ["data.infill=0", "data.attributes=0"]
    return ['data.source="folder"', f'data.dir="{folder.resolve()}"', "data.only_4_4=true", "data.max_bars=200",
            "train.patience=0", *plain]  # no early stop: both pipelines train exactly --steps steps


def train_ours(out: Path, steps: int, overrides: list[str]) -> float:
    """Our train.py on the embedded default's config; returns the CPU seconds it used."""
    before = children_cpu_seconds()
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "chorales.toml"), f"out_dir={out}",
           "sample.num_samples=0", *overrides]
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


def train_report(tok, folder: Path, cfg, cpu_budget: float, schedule_steps: int, stop: int = 0):
    """transformers' Mistral, same size as ours, plain AdamW loop until `cpu_budget` CPU seconds are spent (or
    `stop` steps of the `schedule_steps` schedule are done)."""
    m, tc, dc = cfg.model, cfg.train, cfg.data
    pad, bos, eos = tok["PAD_None"], tok["BOS_None"], tok["EOS_None"]
    torch.manual_seed(tc.seed)
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
    stop = stop or schedule_steps
    start, step, epoch = time.process_time(), 0, 0
    while step < stop and time.process_time() - start < cpu_budget:
        order = epoch_order(len(chunks), tc.seed, epoch)  # train.py's order for the same seed
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
            if step >= stop or time.process_time() - start >= cpu_budget:
                break
        epoch += 1
    return hf.eval(), step, time.process_time() - start


@torch.no_grad()
def sample_report(hf, tok, n: int, max_new: int, min_new: int, seed: int, settings=REPORT_SAMPLING) -> list:
    torch.manual_seed(seed)
    ids = torch.full((n, 1), tok["BOS_None"], dtype=torch.long)
    out = hf.generate(ids, do_sample=True, max_new_tokens=max_new, min_new_tokens=min_new, pad_token_id=tok["PAD_None"],
                      eos_token_id=tok["EOS_None"], attention_mask=torch.ones_like(ids), **settings)
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


def sample_ours_defaults(run: Path, n: int, seed: int, bars: int | None = None, **settings) -> list:
    """What `sample.py --ckpt RUN --num-samples n [--bars B]` writes: its defaults (SamplingConfig()), from BOS;
    `settings` as sample.py's options (grammar=False: --no-grammar)."""
    sampler = Sampler.load(run, device="cpu", log=lambda msg: None)
    return [s.score for s in sampler.sample(None, num_samples=n, seed=seed, bars=bars, **settings)]


def excerpts(files, bars: int) -> list:
    """Every whole `bars`-bar window of these 4/4 files that has notes, moved to time 0."""
    out = []
    for f in files:
        score = symusic.Score(str(f))
        span = bars * 4 * score.ticks_per_quarter
        for start in range(0, score.end() - span + 1, span):
            cut = score.clip(start, start + span, clip_end=True).shift_time(-start)
            if cut.note_num():
                out.append(cut)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=0, help="train.max_steps for ours (0: the config's epochs); with "
                                                           "--folder both pipelines train exactly this many")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--min-new", type=int, default=256)
    ap.add_argument("--out", default="/tmp/quality")
    ap.add_argument("--ours", help="reuse this trained run of configs/chorales.toml instead of training one")
    ap.add_argument("--cpu-seconds", type=float, help="with --ours: the CPU time that run used")
    ap.add_argument("--folder", type=Path, help="a folder of real MIDI files in place of the chorales (needs --steps)")
    ap.add_argument("--bars", type=int, default=8, help="with --folder: samples and real excerpts of this many bars")
    ap.add_argument("--reuse-reference", action="store_true", help="the reference pipeline trained by an earlier run "
                                                                   "into the same --out (saved there)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (the same for every set)")
    ap.add_argument("--train-seed", type=int, default=0, help="train.seed of both trainings: weights and data order")
    ap.add_argument("--mix", action="store_true", help="with --folder: keep the config's fill-in-the-middle and "
                                                      "attribute mix in our training (default: plain, as the reference's)")
    args = ap.parse_args()
    if args.folder and not args.steps:
        ap.error("--folder needs --steps (both pipelines train exactly that many)")
    out = Path(args.out)
    ours = Path(args.ours) if args.ours else out / "ours"
    overrides = (folder_overrides(args.folder, args.mix) if args.folder else []) + [f"train.seed={args.train_seed}"]
    cfg = load_config(ROOT / "configs" / "chorales.toml", [f"out_dir={ours}", *overrides])
    cpu = args.cpu_seconds if args.ours else train_ours(ours, args.steps, overrides)
    manifest = json.loads((ours / "data" / "manifest.json").read_text())
    n_train_chunks = len(TokenChunks(ours / "data", "train", cfg.data.min_seq, cfg.data.max_seq, 1, 2, 0))
    # the schedule spans the config's epochs, as train.py's (max_steps only says where to stop)
    schedule = cfg.train.epochs * (n_train_chunks // cfg.train.batch_size)
    if not args.folder:
        schedule = args.steps or schedule
    ref = out / "report"
    if args.reuse_reference and (ref / "model" / "config.json").is_file():  # trained by an earlier run into --out
        mt = miditok.REMI(params=ref / "tokenizer.json")
        hf = MistralForCausalLM.from_pretrained(ref / "model").eval()
        hf_steps, hf_cpu = json.loads((ref / "trained.json").read_text()).values()
    else:
        mt = miditok_shards(manifest, ref / "data", cfg.data.bpe_vocab_size, cfg.data.transpose,
                            cfg.data.transpose_copies, 0)
        budget = math.inf if args.folder else cpu  # equal steps on a folder, equal CPU time on the chorales
        hf, hf_steps, hf_cpu = train_report(mt, ref / "data", cfg, budget, schedule, args.steps if args.folder else 0)
        mt.save(ref / "tokenizer.json")
        hf.save_pretrained(ref / "model")
        (ref / "trained.json").write_text(json.dumps({"steps": hf_steps, "cpu_s": hf_cpu}))
    print(f"training CPU time: ours {cpu:.0f} s, reference {hf_cpu:.0f} s ({hf_steps} of {schedule} steps)")
    if args.folder and not (ours / "model.safetensors").is_file():
        ours = ours / "last"  # the weights after exactly --steps steps, as the reference's (not best by validation)
    if args.folder:
        held_out = manifest["counts"]["val"]["files_list"] + manifest["counts"]["test"]["files_list"]
        real_pieces = excerpts(held_out, args.bars)
        print(f"real set: {len(real_pieces)} excerpts of {args.bars} bars from {len(held_out)} held-out songs; "
              f"{manifest['counts']['train']['files']} training songs")
        cut = lambda scores: [first_bars(s, args.bars) for s in scores]  # noqa: E731
        sets = {"ours, reference settings": lambda: cut(sample_ours(ours, args.samples, args.max_new, args.min_new, args.seed)),
                "reference pipeline, reference settings":
                    lambda: cut(sample_report(hf, mt, args.samples, args.max_new, args.min_new, args.seed)),
                "ours, sample.py defaults": lambda: sample_ours_defaults(ours, args.samples, args.seed, bars=args.bars),
                "ours, sample.py defaults --no-grammar":
                    lambda: sample_ours_defaults(ours, args.samples, args.seed, bars=args.bars, grammar=False),
                "reference pipeline, sample.py's settings":
                    lambda: cut(sample_report(hf, mt, args.samples, args.max_new, args.min_new, args.seed, DEFAULT_SAMPLING))}
    else:
        real_pieces = manifest["counts"]["test"]["files_list"]
        sets = {"ours, reference settings": lambda: sample_ours(ours, args.samples, args.max_new, args.min_new, args.seed),
                "reference pipeline, reference settings":
                    lambda: sample_report(hf, mt, args.samples, args.max_new, args.min_new, args.seed),
                "ours, sample.py defaults": lambda: sample_ours_defaults(ours, args.samples, args.seed)}
    real = measure_set(real_pieces)
    results = {name: compare(real, measure_set(make())) for name, make in sets.items()}
    print("| metric | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    rows = {name: {r["metric"]: r["oa"] for r in res["rows"]} for name, res in results.items()}
    for metric in SUMMARY_METRICS:
        print(f"| {metric} | " + " | ".join(f"{r.get(metric, float('nan')):.2f}" for r in rows.values()) + " |")
    print("| mean (min) | " + " | ".join(f"{r['mean_oa']:.2f} ({r['min_oa']:.2f})" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
