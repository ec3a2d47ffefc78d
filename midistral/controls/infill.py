"""Regenerate bars A..B of a piece with both sides as context (fill-in-the-middle at bar boundaries).

    results = infill(model, tok, "song.mid", bars=(5, 8))                # every track in bars 5-8
    results = infill(model, tok, score, bars=(3, 4), tracks=[0, 33])     # only piano and bass there
    results[0].score                                                      # the piece with the new bars

How: one FIM prompt, in the layout the model learnt in training (data/mixes.py, docs/infilling.md):

    spm  BOS [Style_s]  Infill_Bar x (B-A+1)  bars B+1..end  FillBar_Start  bars 1..A-1
    psm  BOS [Style_s]  bars 1..A-1  Infill_Bar x (B-A+1)  bars B+1..end  FillBar_Start

then the model writes the middle until FillBar_End, under the grammar (tokenize/grammar.py: a middle
starts with a bar and ends with FillBar_End once every note is closed) and a constraint that makes it
write exactly B-A+1 bars, with only the instruments of the piece. The middle is decoded after the prefix
(so its times are the piece's) and spliced into the original score:

- every note whose onset lies outside the span is kept exactly (ticks, so seconds, unchanged), held notes
  included: a note that starts before bar A and rings into the span keeps its length;
- notes of the regenerated tracks that start inside the span are removed (also those ringing past it);
- every new note starts inside the span; a new note that would ring past the span's end is cut there,
  so the suffix sounds as written.

`tracks` (programs, -1 for drums): the model writes the middle of every track (it was trained on whole
bars), and only the listed tracks' new notes replace theirs; the other tracks keep their notes exactly.
Their new notes were written with the kept tracks' notes of the span unseen (only before and after it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import symusic
import torch

from midistral.controls.instruments import program_name
from midistral.errors import MidistralError
from midistral.generate import generate
from midistral.music import merge_doubled_notes
from midistral.tokenize.extra import BarStats
from midistral.tokenize.grammar import GrammarConstraint, expansions
from midistral.tokenize.remi import Family, load_score


@dataclass
class InfillResult:
    score: symusic.Score  # the piece with the span regenerated (the original's ticks per quarter)
    new_notes: int  # notes written into the span
    removed_notes: int  # notes of the regenerated tracks that started in the span
    tokens: int  # ids the model wrote
    ended: bool  # it wrote FillBar_End (else the token budget closed the middle)
    skipped: int  # ids the decoder skipped (0 under the grammar)
    span: tuple[int, int] = (0, 0)  # the span's [start, end) in the score's ticks
    ids: list[int] | None = None  # the middle's ids, as the model wrote them


NOT_TRAINED = ("this model was not trained for infilling: its tokenizer has no fill-in-the-middle tokens; "
               "train one with data.infill = 0.3 in its config (as configs/chorales.toml does)")


def check_infill_model(tok) -> None:
    """A one-line MidistralError unless the tokenizer has the fill-in-the-middle tokens."""
    if tok.extra is None or getattr(tok.extra, "fill_start_id", None) is None:
        raise MidistralError(NOT_TRAINED)


def infill_budget(k: int, max_new_tokens: int | None = None) -> int:
    """Ids the model may write for a middle of `k` bars (`max_new_tokens` if given)."""
    return max_new_tokens or 96 * k + 64


class BarCount:
    """A `generate` constraint: exactly `k` bars in the middle, only programs of `programs`.

    Ids that start a bar (or the bar attributes that lead to one) are forbidden once k bars are written,
    FillBar_End before; ids holding a Program outside `programs` always. A row it would leave without
    an allowed id keeps the other constraints' mask."""

    def __init__(self, tok, k: int, programs):
        self.k = k
        stats = BarStats(tok)
        V = len(tok)
        self.starts_bar = torch.zeros(V, dtype=torch.bool)
        self.starts_bar[:stats.n_music] = torch.from_numpy(stats.starts_bar[:stats.n_music])
        e = tok.extra
        self.bar_ac = torch.zeros(V, dtype=torch.bool)
        self.bar_ac[[i for t, i in e.id.items() if t.startswith("ACBarNoteDensity")]] = True
        self.fill_end = e.fill_end_id
        allowed = {tok.program_id[p] for p in programs if p in tok.program_id}
        bad = [i for i, x in enumerate(expansions(tok))
               if any(tok.family[b] == Family.PROGRAM and b not in allowed for b in x.tolist())]
        self.foreign = torch.zeros(V, dtype=torch.bool)
        self.foreign[bad] = True
        self.count = None

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.count = torch.zeros(prompt_ids.shape[0], dtype=torch.long)

    def mask(self, logits: torch.Tensor) -> None:
        V = self.foreign.shape[0]
        forbid = self.foreign[None, :].repeat(logits.shape[0], 1)
        full = self.count >= self.k
        forbid[full] |= (self.starts_bar | self.bar_ac)[None, :]
        forbid[~full, self.fill_end] = True
        sub = logits[:, :V]
        dead = torch.isinf(sub.masked_fill(forbid, float("-inf"))).all(-1) & ~torch.isinf(sub).all(-1)
        forbid[dead] = False
        sub.masked_fill_(forbid, float("-inf"))

    def push(self, tokens: torch.Tensor) -> None:
        t = tokens.cpu().clamp(0, self.starts_bar.shape[0] - 1)
        self.count += self.starts_bar[t].long()


def _programs(score: symusic.Score) -> list[int]:
    return sorted({-1 if t.is_drum else int(t.program) for t in score.tracks if len(t.notes)})


def context_bars(tok, prefix: np.ndarray, suffix: np.ndarray, context: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The prefix's last and the suffix's first whole bars, each at most context // 2 ids."""
    if context is None:
        return prefix, suffix
    half, stats = context // 2, BarStats(tok)
    p_starts, s_starts = stats.bar_starts(prefix), np.r_[stats.bar_starts(suffix), len(suffix)]
    keep_from = next((int(s) for s in p_starts if len(prefix) - s <= half), len(prefix))
    keep_to = max([int(e) for e in s_starts if e <= half] or [0])
    return prefix[keep_from:], suffix[:keep_to]


def infill_prompt(tok, score: symusic.Score, first: int, last: int, style: str | None = None,
                  context: int | None = None, steering=None):
    """(prompt ids, the span's [start, end) in the decoded timeline (tpq 24), in the score's ticks, and
    the prefix ids). Bars are counted from 1, both included. `context`: at most that many ids of prefix
    and suffix in the prompt (half each, whole bars nearest the span). `steering` (controls.Steering with
    a density or polyphony): the attribute tokens, as in training (track-level after the head, each
    context bar's own before it; the middle's are the asked-for values, written by its constraint)."""
    check_infill_model(tok)
    bars = tok.base_ids_by_bar(score)
    timed = tok.encode_with_times(score)
    bar_ticks = timed.bar_ticks
    n = len(bars)
    if first > last:
        raise MidistralError(f"bars {first}-{last}: the first bar is after the last")
    if not 1 <= first <= last <= n:
        raise MidistralError(f"bars {first}-{last}: the piece has bars 1-{n}")
    e = tok.extra
    enc = (tok.bpe.encode_bars if tok.bpe is not None
           else lambda b: np.concatenate(b) if b else np.zeros(0, np.int64))
    prefix, suffix = enc(bars[:first - 1]), enc(bars[last:])
    if style and style not in e.style_ids:
        raise MidistralError(f"style {style!r}: the model knows {', '.join(e.styles) or 'no style'}")
    head = [tok.bos_id] + ([e.style_ids[style]] if style else [])
    near_prefix, near_suffix = context_bars(tok, np.asarray(prefix, np.int64), np.asarray(suffix, np.int64), context)
    if steering is not None and steering.steers_bars:  # head + track attributes + the marked prefix
        steered, near_prefix = steering.prompt(np.r_[head, near_prefix], suffix=near_suffix), steering.mark_bars(near_prefix)
        head, near_suffix = steered[:len(steered) - len(near_prefix)], steering.mark_bars(near_suffix)
    prompt = np.r_[head, e.fim(near_prefix, last - first + 1, near_suffix)].astype(np.int64)
    enc_tpq = timed.tpq
    ends = np.r_[bar_ticks, bar_ticks[-1] + (bar_ticks[-1] - bar_ticks[-2] if len(bar_ticks) > 1 else 4 * enc_tpq)]
    span_enc = (int(ends[first - 1]), int(ends[last]))
    span24 = tuple(t * 24 // enc_tpq for t in span_enc)
    span_orig = tuple(int(round(t * score.ticks_per_quarter / enc_tpq)) for t in span_enc)
    return prompt, span24, span_orig, np.asarray(prefix, dtype=np.int64)


def infill(model, tok, score, bars: tuple[int, int], tracks=None, *, num_samples: int = 1, style: str | None = None,
           temperature: float = 0.7, top_k: int | None = 12, top_p: float | None = None,
           no_repeat_ngram_size: int | None = None, max_new_tokens: int | None = None, context: int | None = None,
           seed: int | None = None, precision: str = "fp32", constraints=(), steering=None) -> list[InfillResult]:
    """Regenerate bars A..B (1-based, inclusive) of every track, or of `tracks` (programs); see the module
    docstring for what is kept, removed and cut. One result per sample. `context`: ids of prefix and
    suffix the model sees (half each; default twice the attention window, within its positions);
    `constraints`: more `generate` constraints (e.g. a progress report); `steering` (controls.Steering):
    key, density and polyphony (the attribute tokens in the prompt: infill_prompt), with its constraints."""
    score = load_score(score)
    first, last = int(bars[0]), int(bars[1])
    k = last - first + 1
    budget = infill_budget(k, max_new_tokens)
    cfg = model.config
    room = cfg.max_position_embeddings - budget - k - 4
    context = min(context or 2 * (cfg.sliding_window or room), room)
    prompt, span24, span, prefix = infill_prompt(tok, score, first, last, style, context, steering)
    programs = _programs(score)
    chosen = programs if tracks is None else [int(p) for p in tracks]
    missing = [p for p in chosen if p not in programs]
    if missing:
        raise MidistralError(f"tracks {', '.join(map(program_name, missing))}: not in the piece (it has "
                             f"{', '.join(map(program_name, programs)) or 'no notes'})")
    device = next(model.parameters()).device
    steer = steering.constraints() if steering is not None else []  # after its prompt(): the bar values
    constraints = [GrammarConstraint(tok, budget), BarCount(tok, k, programs), *steer, *constraints]
    out = generate(model, torch.tensor(prompt, device=device)[None].repeat(num_samples, 1), budget,
                   temperature=temperature, top_k=top_k, top_p=top_p, no_repeat_ngram_size=no_repeat_ngram_size,
                   eos_id=tok.extra.fill_end_id, pad_id=tok.pad_id, seed=seed, constraints=constraints,
                   precision=precision)
    results = []
    for row in out[:, len(prompt):].tolist():
        ended = tok.extra.fill_end_id in row
        middle = row[:row.index(tok.extra.fill_end_id)] if ended else row
        decoded, skipped = tok.decode_with_report(np.r_[prefix, np.asarray(middle, dtype=np.int64)])
        decoded = merge_doubled_notes(decoded, span24[0])  # the middle's notes: one per instrument, onset, pitch
        new, added, removed = splice(score, decoded, span24, span, chosen)
        results.append(InfillResult(new, added, removed, len(middle), ended, skipped, span, middle))
    return results


def splice(score: symusic.Score, decoded: symusic.Score, span24: tuple[int, int], span: tuple[int, int],
           programs) -> tuple[symusic.Score, int, int]:
    """The score with the notes of `programs` starting in `span` (its ticks) replaced by the notes of
    `decoded` (tpq 24) starting in `span24`; (new score, notes added, notes removed)."""
    out = score.copy()
    lo, hi = span
    scale = score.ticks_per_quarter / 24
    removed = 0
    for tr in out.tracks:
        if (-1 if tr.is_drum else int(tr.program)) in programs:
            a = tr.notes.numpy()
            keep = (a["time"] < lo) | (a["time"] >= hi)
            removed += int((~keep).sum())
            tr.notes = symusic.Note.from_numpy(*(a[f][keep] for f in ("time", "duration", "pitch", "velocity")), "tick")
    added = 0
    for dtr in decoded.tracks:
        prog = -1 if dtr.is_drum else int(dtr.program)
        if prog not in programs:
            continue
        a = dtr.notes.numpy()
        inside = (a["time"] >= span24[0]) & (a["time"] < span24[1])
        t = np.clip(np.round(a["time"][inside] * scale).astype(np.int64), lo, hi - 1)
        d = np.maximum(np.minimum(np.round(a["duration"][inside] * scale).astype(np.int64), hi - t), 1)
        if not len(t):
            continue
        target = next((x for x in out.tracks if (-1 if x.is_drum else int(x.program)) == prog), None)
        if target is None:
            target = symusic.Track(dtr.name, 0 if prog == -1 else prog, prog == -1)
            out.tracks.append(target)
        for ti, di, p, v in zip(t.tolist(), d.tolist(), a["pitch"][inside].tolist(), a["velocity"][inside].tolist()):
            target.notes.append(symusic.Note(ti, di, p, v))
        added += len(t)
    for tr in out.tracks:
        tr.notes.sort()
    return out, added, removed


def infill_report(score: symusic.Score, span: tuple[int, int], bars: tuple[int, int], programs) -> str:
    """One line: per instrument, the notes kept outside the span and the new notes in it (regenerated
    instruments, `programs`) or that it was kept exactly (the others), and the regenerated instruments
    that got no note in the span. Tracks named (music.name_tracks)."""
    lo, hi = span
    parts, silent = [], []
    for tr in score.tracks:
        t = tr.notes.numpy()["time"]
        inside = int(((t >= lo) & (t < hi)).sum())
        prog = -1 if tr.is_drum else int(tr.program)
        parts.append(f"{tr.name} kept {len(t) - inside}, new {inside}" if prog in programs
                     else f"{tr.name} kept {len(t)} (not regenerated)")
        silent += [tr.name] if prog in programs and not inside else []
    line = f"infill bars {bars[0]}-{bars[1]}: " + ("; ".join(parts) or "no tracks")
    return line + (f"  [{', '.join(silent)} silent in the span]" if silent else "")
