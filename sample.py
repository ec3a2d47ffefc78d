"""Continue a MIDI prompt (or start from nothing) with a trained midistral model.

    python sample.py prompt.mid --ckpt runs/chorales --num-samples 4 --max-new-tokens 1024

Defaults are the report's best setting: temperature 0.5, top-k 6, no-repeat-6-gram. Writes, per sample,
OUT/<name>_<i>.mid (prompt + continuation, one track per program named by General MIDI instrument,
tempo and time signatures kept) and OUT/<name>_<i>.png (piano roll), and prints one line per file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from midistral.errors import MidistralError, MidiError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?", help="MIDI file to continue (omit to start from BOS)")
    p.add_argument("--ckpt", required=True, help="run folder (best/, else last/) or checkpoint folder")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--min-new-tokens", type=int, default=0, help="EOS is masked before this many tokens")
    p.add_argument("--temperature", type=float, default=0.5, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=6, help="0 = off")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--no-repeat-ngram", type=int, default=6, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prompt-bars", type=int, default=None, help="keep only the first K bars of the prompt")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.min_new_tokens < 0 or args.top_k < 0 or args.no_repeat_ngram < 0 or args.temperature < 0:
        p.error("--min-new-tokens, --top-k, --no-repeat-ngram and --temperature must be >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.prompt_bars is not None and args.prompt_bars < 1:
        p.error("--prompt-bars must be >= 1")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# Prompt


def first_bars(score, k: int):
    """The score cut at its k-th bar line (bar lines from its time signatures; 4/4 when it has none)."""
    downbeats = score.get_downbeats()
    if len(downbeats) > k:
        return score.clip(0, int(downbeats[k]), clip_end=True)
    return score


def prompt_ids(args, tok, context: int, max_new: int) -> tuple[np.ndarray, str]:
    """Token ids of the prompt (BOS first) and a short name for the output files."""
    from midistral.tokenize import load_score

    bos = [tok.bos_id] if tok.bos_id is not None else []
    if args.prompt is None:
        return np.array(bos or [0], dtype=np.int64), "sample"
    path = Path(args.prompt)
    if not path.is_file():
        raise MidiError(f"{path}: no such prompt file")
    score = load_score(path)
    where = ""
    if args.prompt_bars and score.note_num():
        score, where = first_bars(score, args.prompt_bars), f" in its first {args.prompt_bars} bars"
    if score.note_num() == 0:
        log(f"note: {path} has no notes{where}; generating from BOS")
        return np.array(bos or [0], dtype=np.int64), path.stem
    ids = np.concatenate([np.array(bos, dtype=np.int64), np.asarray(tok.encode(score), dtype=np.int64)])
    # Keep room for the continuation inside the model's context; drop the start of a long prompt.
    room = max(context - max_new, context // 2)
    if len(ids) > room:
        log(f"note: {path} is {len(ids)} tokens, longer than the {room} the model's context ({context}) "
            f"leaves beside {max_new} new tokens; keeping its last {room} tokens")
        ids = ids[-room:]
    return ids, path.stem


# ----------------------------------------------------------------------------------------------------
# Output: MIDI with named tracks, piano roll, report


def name_tracks(score):
    from midistral.tokenize import GM_NAMES

    for t in score.tracks:
        t.name = "Drums" if t.is_drum else GM_NAMES[t.program]
    return score


def keep_prompt_meta(score, prompt_path: str | None):
    """Copy the prompt's tempos / time signatures when the tokenizer did not encode them."""
    if prompt_path is None or (len(score.tempos) and len(score.time_signatures)):
        return score
    from midistral.tokenize import load_score

    src = load_score(prompt_path).resample(score.tpq)
    if not len(score.tempos):
        score.tempos = src.tempos
    if not len(score.time_signatures):
        score.time_signatures = src.time_signatures
    return score


def note_arrays(score):
    """Per track: (name, is_drum, dict of numpy arrays time/duration/pitch/velocity)."""
    return [(t.name, t.is_drum, t.notes.numpy()) for t in score.tracks]


def out_of_key_fraction(pitches: np.ndarray) -> float:
    """Share of pitched notes outside the major scale (of 12 transpositions) that covers the most notes."""
    if len(pitches) == 0:
        return 0.0
    hist = np.bincount(pitches % 12, minlength=12)
    major = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], dtype=bool)
    covered = max(hist[np.roll(major, r)].sum() for r in range(12))  # minor keys share these sets
    return 1.0 - covered / len(pitches)


def continuation_report(score, start_tick: int) -> str:
    """Notes per instrument in the continuation and the usual failure modes, one line."""
    parts, warn, pitched = [], [], []
    bars = score.get_downbeats()
    bars = bars[bars >= start_tick]
    patterns = []
    for name, is_drum, n in note_arrays(score):
        new = n["time"] >= start_tick
        parts.append(f"{name} {int(new.sum())}")
        if new.sum() == 0:
            warn.append(f"{name} silent")
        if not is_drum:
            pitched.append(n["pitch"][new])
        # what each bar plays, relative to its bar line: identical bars in a row are a loop
        t, p = n["time"][new], n["pitch"][new]
        bar_of = np.searchsorted(bars, t, side="right") - 1
        for b in range(len(bars) - 1):
            sel = bar_of == b
            patterns.append((b, name, tuple(zip((t[sel] - bars[b]).tolist(), p[sel].tolist()))))
    n_bars = max(len(bars) - 1, 0)
    if n_bars >= 4:
        per_bar: dict[int, list] = {}
        for b, name, notes in patterns:
            per_bar.setdefault(b, []).append((name, notes))
        distinct = len({tuple(v) for v in per_bar.values()})
        if distinct <= 2:
            warn.append(f"loops: {distinct} distinct bar(s) in {n_bars}")
    pitched = np.concatenate(pitched) if pitched else np.zeros(0, dtype=np.int64)
    ook = out_of_key_fraction(pitched.astype(np.int64))
    if ook > 0.15:
        warn.append(f"{ook:.0%} out of key")
    line = "continuation: " + (", ".join(parts) or "no tracks")
    return line + (f"  [{'; '.join(warn)}]" if warn else "")


def write_piano_roll(score, path: Path, title: str, start_tick: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    from midistral.io import atomic_path

    tpq = score.tpq
    fig, ax = plt.subplots(figsize=(14, 5), dpi=100)
    colors = plt.get_cmap("tab10")
    for i, (name, _, n) in enumerate(note_arrays(score)):
        if len(n["time"]) == 0:
            continue
        x0 = n["time"] / tpq
        x1 = (n["time"] + np.maximum(n["duration"], 1)) / tpq
        y0 = n["pitch"] - 0.4
        y1 = n["pitch"] + 0.4
        boxes = np.stack([np.stack([x0, y0], 1), np.stack([x1, y0], 1),
                          np.stack([x1, y1], 1), np.stack([x0, y1], 1)], 1)
        ax.add_collection(PolyCollection(boxes, facecolors=colors(i % 10), edgecolors="none",
                                         label=name, alpha=0.8))
    end = max(score.end(), 1) / tpq
    for b in score.get_downbeats():
        if b / tpq <= end:
            ax.axvline(b / tpq, color="0.85", lw=0.5, zorder=0)
    if start_tick:
        ax.axvline(start_tick / tpq, color="red", lw=1.2, ls="--", label="continuation starts")
    ax.set_xlim(0, end)
    ax.set_ylim(20, 109)
    ax.set_xlabel("quarter notes")
    ax.set_ylabel("pitch")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_midi(score, path: Path) -> None:
    from midistral.io import atomic_path

    with atomic_path(path) as tmp:
        score.dump_midi(tmp)


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except MidistralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    import torch

    from midistral.checkpoint import load_model_and_tokenizer, resolve_checkpoint
    from midistral.generate import generate, model_config

    if args.prompt is not None:  # a bad prompt is reported before any work on the model
        from midistral.tokenize import load_score

        if not Path(args.prompt).is_file():
            raise MidiError(f"{args.prompt}: no such prompt file")
        load_score(args.prompt)
    ckpt = resolve_checkpoint(args.ckpt)
    model, tok = load_model_and_tokenizer(ckpt, device=args.device)
    cfg = model_config(model)
    context = cfg.max_position_embeddings
    max_new = min(args.max_new_tokens, context - 1)
    if max_new < args.max_new_tokens:
        log(f"note: --max-new-tokens {args.max_new_tokens} exceeds the model's context; using {max_new}")
    ids, stem = prompt_ids(args, tok, context, max_new)
    if len(ids) + max_new > context:
        max_new = context - len(ids)
        log(f"note: prompt + continuation must fit the model's context ({context}); generating {max_new} tokens")
    log(f"checkpoint {ckpt}; prompt {len(ids)} tokens; {args.num_samples} sample(s) of up to {max_new} tokens")

    prompt = torch.from_numpy(ids)[None].repeat(args.num_samples, 1).to(args.device)
    t0 = time.perf_counter()
    out = generate(model, prompt, max_new, temperature=args.temperature, top_k=args.top_k or None,
                   top_p=args.top_p, no_repeat_ngram_size=args.no_repeat_ngram or None,
                   min_new_tokens=args.min_new_tokens, eos_id=tok.eos_id, seed=args.seed, progress=True)
    dt = time.perf_counter() - t0
    n_gen = (out.shape[1] - len(ids)) * args.num_samples
    log(f"generated {out.shape[1] - len(ids)} tokens x {args.num_samples} in {dt:.1f}s "
        f"({n_gen / max(dt, 1e-9):.0f} tok/s)")

    # Where the continuation starts in the decoded score: the end of the decoded prompt.
    prompt_score, _ = tok.decode_with_report(ids.tolist())
    start_tick = prompt_score.end() if args.prompt is not None and prompt_score.note_num() else 0

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = len(str(args.num_samples - 1))
    for i, row in enumerate(out.tolist()):
        score, n_skipped = tok.decode_with_report(row)
        score = keep_prompt_meta(name_tracks(score), args.prompt)
        base = out_dir / (f"{stem}_{i:0{width}d}" if args.num_samples > 1 else stem)
        midi_path, png_path = base.with_suffix(".mid"), base.with_suffix(".png")
        write_midi(score, midi_path)
        write_piano_roll(score, png_path, f"{midi_path.name} ({ckpt})", start_tick)
        n_bars = int((score.get_downbeats() < score.end()).sum()) if score.note_num() else 0
        seconds = score.to("second").end()
        instruments = ", ".join(t.name for t in score.tracks) or "none"
        new = row[len(ids):]
        n_tokens = new.index(tok.eos_id) + 1 if tok.eos_id in new else len(new)
        eos = " (ended with EOS)" if tok.eos_id in new else ""
        print(f"{midi_path}  bars {n_bars}  notes {score.note_num()}  instruments [{instruments}]  "
              f"{seconds:.1f}s  tokens {n_tokens}{eos}  skipped {n_skipped}  (+ {png_path.name})")
        print(f"    {continuation_report(score, start_tick)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
