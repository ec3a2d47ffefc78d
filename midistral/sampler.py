"""The sampling pipeline as a library: load a checkpoint once, then continue prompts or add tracks.

    sampler = Sampler.load("runs/chorales")             # model + tokenizer, once
    for s in sampler.sample("song.mid", num_samples=4, seed=0, reject=True):
        print(s.line)                                   # bars, notes, instruments, failure modes
        Path("out.mid").write_bytes(s.midi_bytes())

A prompt is a path, MIDI bytes (an upload) or a symusic Score; a bad one raises a one-line MidiError
naming it. `sample.py` and the web studio are thin layers over this module.

How tokens are drawn (temperature, top-k, lengths, ...) is a `SamplingConfig` (midistral/sampling.py), given
whole or as keyword arguments: `sampler.sample(prompt, top_k=20)`.

Rejection (`reject=True`): a sample whose continuation has a silent prompt instrument, loops, or
leaves the key more than the thresholds of `RejectionLimits` allow, or copies `max_copied_run` bars in a
row from one training piece (when the checkpoint's training data or copy index is here), is generated
again with another seed, up to `reject_tries` times; `Sample.rejected` says what was thrown away and why.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import symusic
import torch

from midistral import controls, music
from midistral.checkpoint import load_model_and_tokenizer, read_model_config, resolve_checkpoint
from midistral.errors import MidistralError
from midistral.generate import ProgressReport, generate
from midistral.evaluate import copy_index_for
from midistral.metrics import failure_modes
from midistral.model.cache import model_config
from midistral.model.precision import check_device, check_precision, default_precision
from midistral.model.static import compile_pays_off
from midistral.reports import (accompaniment_report, continuation_report, rejection_reasons,  # noqa: F401 (API)
                               summary_line)
from midistral.sampling import RejectionLimits, SamplingConfig, check_call
from midistral.tokenize import load_score
from midistral.tokenize.grammar import Grammar, GrammarConstraint


@dataclass
class Sample:
    """One generated piece: prompt + continuation (or the piece with its new track)."""

    score: symusic.Score        # named tracks, the prompt's tempo and meter
    start_tick: int             # where the continuation starts (0: from scratch)
    n_tokens: int               # new tokens, EOS included
    skipped: int                # tokens the decoder skipped (did not fit the grammar)
    metrics: dict               # failure modes of the continuation: silent_share, loop_score, out_of_key
    line: str                   # one-line summary
    report: str = ""            # second line: new notes per instrument and warnings
    ended: bool = False         # the model emitted EOS
    rejected: list[str] = field(default_factory=list)  # earlier tries thrown away, with the reason
    new_track: int | None = None  # index of the added track (accompaniment)
    new_ids: list[int] = field(default_factory=list)  # the ids the model wrote (continuation or middle)
    end_tick: int | None = None  # where the new music ends (an infilled span's end; None: the piece's end)

    def midi_bytes(self) -> bytes:
        return music.midi_bytes(self.score)

    def piano_roll_png(self, title: str = "") -> bytes:
        return music.piano_roll_png(self.score, title, self.start_tick, self.new_track)


@dataclass(frozen=True)
class _Plan:
    """One call's generation: how tokens are drawn, and what this call adds (length, instruments, progress)."""

    config: SamplingConfig
    max_new: int                # new tokens at most (with bars: what the context leaves)
    min_new: int                # EOS masked before
    bars: int | None
    programs: list[int] | None
    on_progress: Callable[[int, int], None] | None
    steering: controls.Steering | None = None  # key, density, polyphony (controls/attributes.py)
    gapless: bool = False       # no beat where every instrument is silent (controls/gaps.py)


@dataclass
class _Prompt:
    ids: np.ndarray             # BOS + prompt tokens
    source: symusic.Score | None  # the prompt as given (for its tempo / meter)
    start_tick: int
    programs: list[int]         # instruments of the (decoded) prompt


class Sampler:
    """A model and its tokenizer, loaded once; `sample`, `accompany` and `infill` return `Sample`s."""

    def __init__(self, model, tok, ckpt: Path | None = None, device: str = "cpu", precision: str | None = None,
                 log: Callable[[str], None] | None = None, compile: bool | None = None):
        self.model, self.tok, self.ckpt, self.compile = model, tok, ckpt, compile  # compile None: where it pays off
        self.device, self.precision = device, precision
        self.log = log or (lambda msg: None)
        self.context = model_config(model).max_position_embeddings

    @cached_property
    def grammar(self) -> Grammar:
        """The token grammar's tables, built once per sampler (every constrained generation shares them)."""
        return Grammar(self.tok)

    @cached_property
    def known_programs(self) -> frozenset[int] | None:
        """The programs (-1 = drums) the model's training split plays; None when its data cannot be found."""
        return controls.known_programs(self.ckpt, self.tok)

    @property
    def styles(self) -> list[str]:
        """The styles the model was trained with (`style=` of sample and infill); [] for a model without."""
        return list(self.tok.extra.styles) if self.tok.extra is not None else []

    @cached_property
    def style_defaults(self) -> dict[str, dict]:
        """Per style, the controls `sample` uses where the call leaves them open (controls/styles.py)."""
        return controls.read_style_defaults(self.ckpt, self.styles)

    def style_id(self, style: str | None) -> int | None:
        """The id of `style` (None: no style); a one-line MidistralError naming the styles the model knows."""
        if style is None:
            return None
        if style not in self.styles:
            known = ", ".join(self.styles) or "none (it was trained without style tokens)"
            raise MidistralError(f"style {style!r}: the model does not know it; its styles: {known}")
        return self.tok.extra.style_ids[style]

    @classmethod
    def load(cls, ckpt: str | os.PathLike | None = None, device: str = "cpu", precision: str | None = None,
             log: Callable[[str], None] | None = None, compile: bool | None = None) -> "Sampler":
        """From a run folder (best/, else last/) or a checkpoint folder (None: the shipped default model,
        models/default); CheckpointError if unusable."""
        path = resolve_checkpoint(ckpt)
        check_device(device)
        if precision is None:
            precision = default_precision(device, read_model_config(path).decode_weights)
        else:
            check_precision(precision, device)
        # only the decode model, read tensor by tensor: the fp32 state dict and linear weights never exist
        # at once (peak memory); the same model as prepare_for_decode of the loaded checkpoint
        model, tok = load_model_and_tokenizer(path, device=device, precision=precision)
        return cls(model, tok, path, device, precision, log, compile)

    # ------------------------------------------------------------------------------------------------
    # Prompt

    def read_prompt(self, prompt, prompt_bars: int | None = None, name: str | None = None):
        """The prompt as a Score (None: start from scratch), cut to its first `prompt_bars` bars."""
        if prompt is None:
            return None
        label = name or (str(prompt) if isinstance(prompt, (str, os.PathLike)) else None)
        score = load_score(prompt, name)
        if prompt_bars and score.note_num():
            cut = music.first_bars(score, prompt_bars)
            if cut.note_num() == 0:
                self.log(f"note: {label or 'the prompt'} has no notes in its first {prompt_bars} bars; "
                         "generating from BOS")
            return cut
        if score.note_num() == 0:
            self.log(f"note: {label or 'the prompt'} has no notes; generating from BOS")
        return score

    def _encode_prompt(self, score: symusic.Score | None, max_new: int, style: str | None = None) -> _Prompt:
        # the style token right after BOS, where training puts it (data/mixes.py)
        head = [self.tok.bos_id] if self.tok.bos_id is not None else []
        head += [self.style_id(style)] if style is not None else []
        if score is None or score.note_num() == 0:
            return _Prompt(np.array(head or [0], dtype=np.int64), score, 0, [])
        ids = np.concatenate([np.array(head, dtype=np.int64), np.asarray(self.tok.encode(score), dtype=np.int64)])
        # keep room for the continuation inside the model's context: drop the start of a long prompt
        room = max(self.context - max_new, self.context // 2)
        if len(ids) > room:
            self.log(f"note: the prompt is {len(ids)} tokens, longer than the {room} the model's context "
                     f"({self.context}) leaves beside {max_new} new tokens; keeping its last {room} tokens")
            ids = np.r_[ids[:len(head)], ids[len(ids) - room + len(head):]]  # BOS and style stay
        decoded, _ = self.tok.decode_with_report(ids.tolist())
        programs = [music.track_program(t) for t in decoded.tracks if len(t.notes)]
        return _Prompt(ids, score, decoded.end() if decoded.note_num() else 0, programs)

    def _token_budget(self, config: SamplingConfig, bars: int | None) -> int:
        """New tokens at most: as asked (or the default) within the context; with `bars` and no length asked,
        a bound per bar (sampling.TOKENS_PER_BAR), not a length: the bars end the piece."""
        want = config.max_new(bars)
        max_new = min(want, self.context - 1)
        if max_new < want and (bars is None or config.max_new_tokens is not None):
            self.log(f"note: max_new_tokens {want} exceeds the model's context; using {max_new}")
        return max_new

    @staticmethod
    def _config(config: SamplingConfig | None, settings: dict) -> SamplingConfig:
        """`config` (default: SamplingConfig()) with keyword `settings` over it, checked."""
        config = config or SamplingConfig()
        return config.replace(**settings) if settings else config

    # ------------------------------------------------------------------------------------------------
    # Sampling

    def sample(self, prompt=None, config: SamplingConfig | None = None, *, num_samples: int = 1,
               seed: int | None = None, bars: int | None = None, programs=None, prompt_bars: int | None = None,
               reject: bool = False, limits: RejectionLimits | None = None, prompt_name: str | None = None,
               style: str | None = None, on_progress: Callable[[int, int], None] | None = None, key=None,
               density=None, polyphony=None, gapless: bool | None = None, style_defaults: bool = True,
               **settings) -> list[Sample]:
        """Continue `prompt` (path, MIDI bytes, Score or None) `num_samples` times, as one batch.

        `config` says how tokens are drawn; keyword `settings` (temperature=, top_k=, max_new_tokens=, ...)
        override its fields. `bars`: continue for exactly that many bars; `programs`: only these instruments
        ("0,33,-1", "piano,bass,drums" or a list of GM numbers, -1 = drums); `prompt_bars`: keep only the
        prompt's first bars. `style`: one of `self.styles` (for a model trained with style tokens).
        `reject`: generate a sample again while it is over `limits`;
        `on_progress(step, total)` is called after every generated token. `key` ("E major"): new pitched
        notes only in that key; `density` ("low" | "medium" | "high" | notes per bar) and `polyphony` (most
        notes starting together) steer each bar through its attribute tokens; Sample.report then gives the
        requested and achieved values (midistral/controls/attributes.py). `gapless`: no beat in which every
        instrument is silent once the music has started (midistral/controls/gaps.py). With a `style`, what
        the call leaves as None comes from `self.style_defaults` (`style_defaults=False`: not)."""
        config = self._config(config, settings)
        preset = self.style_defaults.get(style, {}) if self.style_id(style) is not None and style_defaults else {}
        density, polyphony, gapless, flags = controls.with_style_defaults(preset, prompt is None, density, polyphony,
                                                                          gapless)
        if flags:
            self.log(f"style {style}: {flags} (its defaults; --no-style-defaults: without)")
        check_call(num_samples=num_samples, seed=seed, bars=bars, prompt_bars=prompt_bars)
        steering = controls.Steering(self.tok, key=key, density=density, polyphony=polyphony)
        if programs is not None:
            programs = self.parse_programs(programs)
        note = controls.unknown_instruments_note(programs, self.known_programs)
        source = self.read_prompt(prompt, prompt_bars, prompt_name)
        max_new = self._token_budget(config, bars)
        p = self._encode_prompt(source, max_new, style)
        p.ids = steering.prompt(p.ids)
        if len(p.ids) + max_new > self.context:
            max_new = self.context - len(p.ids)
            if bars is None:
                self.log(f"note: prompt + continuation must fit the model's context ({self.context}); "
                         f"generating at most {max_new} tokens")
        if bars is not None:  # the bars end the piece; the context is only a bound
            self.log(f"generating {bars} bar{'s' * (bars != 1)} (at most {max_new} tokens)")
        plan = _Plan(config, max_new, config.min_new(from_scratch=source is None and bars is None), bars, programs,
                     on_progress, steering, gapless)

        def make(n: int, seed_: int | None) -> list[Sample]:
            out = [self._finish(row, p, bars) for row in self._generate(p.ids, n, seed_, plan)]
            return self._check_copying(out) if reject else out

        samples = self._rejecting(make, num_samples, seed, reject, limits, lambda s, lim: continuation_report(
            s.score, s.start_tick, s.metrics, lim, s.rejected))
        return steering.annotate(_noted(samples, note))

    def _rejecting(self, make, num_samples: int, seed: int | None, reject: bool, limits: RejectionLimits | None,
                   describe) -> list[Sample]:
        """`make(n, seed)` -> n Samples; with `reject`, those over a threshold are made again (another seed)."""
        limits = limits or RejectionLimits()
        samples = make(num_samples, seed)
        tries = limits.reject_tries if reject else 1
        for attempt in range(1, tries):
            bad = [i for i, s in enumerate(samples) if rejection_reasons(s.metrics, limits)]
            if not bad:
                break
            retry_seed = None if seed is None else seed + 1_000_003 * attempt
            for i, again in zip(bad, make(len(bad), retry_seed)):
                why = "; ".join(rejection_reasons(samples[i].metrics, limits))
                self.log(f"note: sample {i} rejected ({why}); generating it again")
                again.rejected = samples[i].rejected + [f"try {attempt}: {why}"]
                samples[i] = again
        for s in samples:
            s.report = describe(s, limits)
        return samples

    # ------------------------------------------------------------------------------------------------
    # Accompaniment

    def accompany(self, prompt, program, config: SamplingConfig | None = None, *, bars=None, replace: bool = False,
                  num_samples: int = 1, seed: int | None = None, reject: bool = False,
                  limits: RejectionLimits | None = None, prompt_name: str | None = None,
                  on_progress: Callable[[int, int], None] | None = None, key=None, **settings) -> list[Sample]:
        """Add a track for `program` (GM number, -1 = drums, or a name such as "bass") to the piece
        `prompt`, keeping its notes exactly; `replace=True` first drops that instrument's notes. `bars`:
        the span to write, "A:B" (counted from 1, both included), "A:" or ":B"; None: the whole piece. `key`:
        the new notes only in that key.
        Of `config` (and keyword `settings`), temperature, top_k and no_repeat_ngram_size apply: the walk
        covers the piece, so the lengths do not, and every id it offers keeps the grammar.

        Sample.new_track is the new track's index; its metrics describe the new track (silent_share:
        bars of the piece in which it plays nothing)."""
        config = self._config(config, settings)
        check_call(num_samples=num_samples, seed=seed)
        program, steering = self.parse_program(program), controls.Steering(self.tok, key=key)
        note = controls.unknown_instruments_note([program], self.known_programs)
        source = load_score(prompt, prompt_name)
        if source.note_num() == 0:
            label = prompt_name or (str(prompt) if isinstance(prompt, (str, os.PathLike)) else "the piece")
            raise MidistralError(f"{label}: has no notes to accompany")
        piece = prompt if isinstance(prompt, (str, os.PathLike)) else source  # a path: its messages name it

        def make(n: int, seed_: int | None) -> list[Sample]:
            out = []
            for i in range(n):
                score = controls.accompany(self.model, self.tok, piece, program, bars=bars, replace=replace,
                                           temperature=config.temperature, top_k=config.top_k,
                                           no_repeat_ngram_size=config.no_repeat_ngram_size, grammar=config.grammar,
                                           seed=None if seed_ is None else seed_ + i, key=steering.key,
                                           **self._precision_option())
                out.append(self._finish_accompaniment(score, source, program, bars))
                if on_progress is not None:
                    on_progress(i + 1, n)
            return out

        samples = self._rejecting(make, num_samples, seed, reject, limits, lambda s, lim: accompaniment_report(
            s.score, s.new_track, s.metrics, lim, s.rejected))
        return steering.annotate(_noted(samples, note))

    def infill(self, piece, bars, tracks=None, config: SamplingConfig | None = None, *, num_samples: int = 1,
               seed: int | None = None, style: str | None = None, prompt_name: str | None = None,
               on_progress: Callable[[int, int], None] | None = None, key=None, density=None, polyphony=None,
               **settings) -> list[Sample]:
        """Regenerate bars A..B (`bars` = (A, B), counted from 1, both included) of `piece`, of every
        instrument or only of `tracks` (names or GM numbers); every note outside the span is kept exactly
        (one fill-in-the-middle prompt: midistral/controls/infill.py). Of `config` (and `settings`),
        temperature, top_k, top_p, no_repeat_ngram_size and max_new_tokens (the middle's ids) apply.
        Sample.metrics describe the span; Sample.report gives notes kept and new per instrument. `key`: the
        new notes only in that key, `density` and `polyphony` for the span's bars (as `sample`)."""
        config = self._config(config, settings)
        check_call(num_samples=num_samples, seed=seed)
        controls.check_infill_model(self.tok)
        self.style_id(style)
        steering = controls.Steering(self.tok, key=key, density=density, polyphony=polyphony)
        first, last = (int(b) for b in bars)
        label = prompt_name or (str(piece) if isinstance(piece, (str, os.PathLike)) else "the piece")
        source = load_score(piece, prompt_name)
        chosen = None if tracks is None else self.parse_programs(tracks)
        extra = [] if on_progress is None else [
            ProgressReport(on_progress, controls.infill_budget(last - first + 1, config.max_new_tokens))]
        try:
            results = controls.infill(
                self.model, self.tok, source, (first, last), chosen, num_samples=num_samples, style=style,
                temperature=config.temperature, top_k=config.top_k or None, top_p=config.top_p,
                no_repeat_ngram_size=config.no_repeat_ngram_size or None, max_new_tokens=config.max_new_tokens,
                seed=seed, constraints=extra, steering=steering, **self._precision_option())
        except MidistralError as e:
            raise MidistralError(f"{label}: {e}") from None
        out = []
        for r in results:
            score = music.keep_prompt_meta(music.name_tracks(r.score), source)
            programs = chosen or [music.track_program(t) for t in score.tracks]
            metrics = failure_modes(score.clip(0, r.span[1]), r.span[0], programs)  # the span after its prefix
            out.append(Sample(score, r.span[0], r.tokens, r.skipped, metrics,
                              summary_line(score, r.tokens, r.ended, r.skipped, metrics),
                              controls.infill_report(score, r.span, (first, last), programs), ended=r.ended,
                              new_ids=r.ids, end_tick=r.span[1]))
        return steering.annotate(out)

    @staticmethod
    def parse_programs(programs) -> list[int]:
        """GM program numbers (-1 = drums) from "0,33,-1", "piano,bass,drums" or a list of them."""
        return controls.parse_programs(programs)

    @staticmethod
    def parse_bar_range(spec) -> tuple[int, int | None]:
        """"5:12" -> (5, 12): bars counted from 1, both included; "5:" to the end, ":12" from the start."""
        return controls.parse_bar_range(spec)

    @staticmethod
    def parse_program(program) -> int:
        """One GM program number (-1 = drums) from a number or a name such as "bass"."""
        return controls.parse_program(program)

    def _finish_accompaniment(self, score: symusic.Score, source: symusic.Score, program: int, bars) -> Sample:
        """A Sample whose metrics describe the new track over the bars it was written for."""
        score = music.keep_prompt_meta(music.name_tracks(score), source)
        new_track = next(i for i in reversed(range(len(score.tracks)))
                         if music.track_program(score.tracks[i]) == program)
        alone = score.copy()
        alone.tracks = [score.tracks[new_track].copy()]
        n_tokens = len(self.tok.encode(alone)) if alone.note_num() else 0
        start, end = _bar_span(score, bars)
        whole = failure_modes(score.clip(start, end), start, [program])  # clip keeps the ticks: bars from start
        track = failure_modes(alone.clip(start, end), start, [])
        metrics = {"silent_share": whole["silent_share"], "loop_score": track["loop_score"],
                   "out_of_key": track["out_of_key"]}
        return Sample(score, 0, n_tokens, 0, metrics, summary_line(score, n_tokens, False, 0, metrics),
                      new_track=new_track)

    # ------------------------------------------------------------------------------------------------
    # Generation

    def _generate(self, ids: np.ndarray, batch: int, seed: int | None, plan: "_Plan") -> list[list[int]]:
        prompt = torch.from_numpy(ids)[None].repeat(batch, 1).to(self.device)
        constraints = self._constraints(plan)
        c = plan.config
        t0 = time.perf_counter()
        out = generate(self.model, prompt, plan.max_new, temperature=c.temperature, top_k=c.top_k or None,
                       top_p=c.top_p, no_repeat_ngram_size=c.no_repeat_ngram_size or None,
                       min_new_tokens=plan.min_new, eos_id=self.tok.eos_id, seed=seed, constraints=constraints,
                       **self._precision_option(),
                       compile=self.compile if self.compile is not None
                       else compile_pays_off(batch, getattr(model_config(self.model), "decode_weights", None)))
        dt = time.perf_counter() - t0
        n_new = out.shape[1] - len(ids)
        self.log(f"generated {n_new} tokens x {batch} in {dt:.1f}s ({n_new * batch / max(dt, 1e-9):.0f} tok/s)")
        if plan.bars is not None:
            complete = next(c.complete for c in constraints if isinstance(c, controls.BarsConstraint))
            if not all(complete):
                self.log(f"note: {plan.max_new} tokens ran out before {plan.bars} bars in "
                         f"{complete.count(False)} sample(s)")
        return [row[len(ids):] for row in out.tolist()]

    def _constraints(self, plan: "_Plan") -> list:
        """Fresh constraint objects for one generate call: grammar, instruments, length, progress."""
        constraints = []
        if plan.config.grammar:
            # the grammar closes the last note as the token budget ends; with a length in bars the budget
            # is the whole context and the bars decide the end (closing early would fight their EOS mask)
            budget = None if plan.bars is not None else plan.max_new
            constraints.append(GrammarConstraint(self.tok, budget, grammar=self.grammar))
        constraints.append(controls.OnsetConstraint(self.tok))  # ten notes per instrument and onset at most
        if plan.programs is not None:
            constraints.append(controls.ProgramsConstraint(self.tok, plan.programs))
        if plan.bars is not None:
            constraints.append(controls.BarsConstraint(self.tok, plan.bars))
        if plan.programs is not None:  # each asked-for instrument it knows plays in every bar
            known = self.known_programs
            constraints.append(controls.EveryBarConstraint(self.tok, [p for p in plan.programs
                                                                      if known is None or p in known]))
        if plan.gapless:
            constraints.append(controls.GaplessConstraint(self.tok))
        if plan.steering is not None:  # last of the masks: the attribute tokens read what the others leave
            constraints += plan.steering.constraints()
        if plan.on_progress is not None:
            constraints.append(ProgressReport(plan.on_progress, plan.max_new))
        return constraints

    @cached_property
    def copy_index(self):
        """The training split's bars (midistral.metrics.CopyIndex) if the checkpoint's data is here, else None."""
        return copy_index_for(self.ckpt, midi_folder=False) if self.ckpt is not None else None

    def _check_copying(self, samples: list[Sample]) -> list[Sample]:
        """Adds copied_bars and copied_run of each continuation to its metrics (when the training bars are here)."""
        for s in samples if self.copy_index is not None else ():
            s.metrics.update(self.copy_index.copying(s.score, s.start_tick))
        return samples

    def _precision_option(self) -> dict:
        """The precision argument of generate / controls.accompany (None: their exact fp32 default)."""
        return {} if self.precision is None else {"precision": self.precision}

    def _finish(self, new: list[int], p: _Prompt, bars: int | None = None) -> Sample:
        ended = self.tok.eos_id is not None and self.tok.eos_id in new
        n_tokens = new.index(self.tok.eos_id) + 1 if ended else len(new)
        score, skipped = self.tok.decode_with_report(p.ids.tolist() + new[:n_tokens])
        score = music.merge_doubled_notes(score, p.start_tick)
        score = music.end_at_last_bar(score) if bars is not None else score  # N bars asked: no note rings past
        score = music.keep_prompt_meta(music.name_tracks(score), p.source)
        metrics = failure_modes(score, p.start_tick, p.programs)
        return Sample(score, p.start_tick, n_tokens, skipped, metrics,
                      summary_line(score, n_tokens, ended, skipped, metrics), ended=ended, new_ids=new[:n_tokens])


def _noted(samples: list[Sample], note: str | None) -> list[Sample]:
    """The samples with `note` among the warnings of their report (the line the CLI and the studio show)."""
    if note:
        for s in samples:
            s.report = s.report[:-1] + f"; {note}]" if s.report.endswith("]") else f"{s.report}  [{note}]"
    return samples


def _bar_span(score: symusic.Score, bars) -> tuple[int, int]:
    """Ticks [start, end) of the bars "A:B" (counted from 1, both included; None: the whole piece)."""
    end = score.end() + 1
    if bars is None:
        return 0, end
    first, last = controls.parse_bar_range(bars)
    downbeats = music.downbeats(score)
    start = int(downbeats[first - 1]) if first - 1 < len(downbeats) else end
    stop = int(downbeats[last]) if last is not None and last < len(downbeats) else end
    return start, max(stop, start)


def sample_paths(out_dir: Path, stem: str, n: int) -> list[Path]:
    """OUT/<stem>.mid for one sample, OUT/<stem>_<i>.mid for several."""
    width = len(str(n - 1))
    return [out_dir / (f"{stem}_{i:0{width}d}.mid" if n > 1 else f"{stem}.mid") for i in range(n)]


def write_sample_files(samples: list[Sample], out_dir: Path, stem: str, ckpt) -> None:
    """OUT/<stem>_<i>.mid and .png per sample (the title names `ckpt`), and its two lines on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, midi_path in zip(samples, sample_paths(out_dir, stem, len(samples))):
        png_path = midi_path.with_suffix(".png")
        music.write_midi(s.score, midi_path)
        music.write_piano_roll(s.score, png_path, f"{midi_path.name} ({ckpt})", s.start_tick, s.new_track)
        print(f"{midi_path}  {s.line}  (+ {png_path.name})")
        print(f"    {s.report}")
