"""Attribute controls at sampling: key, note density and onset polyphony, and their requested-vs-achieved line.

    steer = Steering(tok, key="E major", density="low", polyphony=2)
    prompt = steer.prompt(prompt_ids)                   # + the attribute tokens the model was trained with
    ids = generate(model, prompt, ..., constraints=[GrammarConstraint(tok), *steer.constraints()])
    steer.report(new_ids)                   # 'key E major: 0 of 57 new notes out of key (0%); density ...'

`Steering` gathers what one call asks for; `midistral.sampler.Sampler.sample` builds one per call. The key is
a mask (controls/key.py). Density and polyphony steer through the attribute-control tokens the model was
trained with (tokenize/extra.py, data/mixes.py; MidiTok 3.1's names and values):

- the prompt gets them as in training: after BOS (and a style) the four track tokens, before each of the
  prompt's bars its three bar tokens (its real values); the track tokens span the prompt's bars and the
  requested values;
- `AttributeConstraint` writes the three bar tokens before every bar the model starts: where a bar may start,
  ACBarNoteDensity_<d> takes the probability the model gives to starting a bar (ids beginning with a Bar, and
  the lone BPE word start "▁" that opens a bar), then ACBarOnsetPolyphonyMin/Max are forced, then the model
  chooses the Bar id. The attribute tokens are inputs in training (no loss on them), so their own logits
  mean nothing: the model decides when a bar starts, the request decides what the bar is told.

Levels (notes starting per bar, all tracks together; MidiTok's density tokens count 0..17 and "18+"):
low 4, medium 8, high 16: in 4/4 with four voices, whole-note, half-note and quarter-note chords. A value not
asked for comes from the prompt's bars (their median), else from the other: polyphony round(density / 4),
density 4 x polyphony (a beat's worth of onsets per voice); the lowest onset polyphony of a bar is the
prompt's median, else 1.
"""

from __future__ import annotations

import numpy as np
import torch

from midistral import music
from midistral.controls.constraints import EveryBarConstraint
from midistral.controls.key import Key, KeyConstraint, out_of_key_share, parse_key
from midistral.errors import MidistralError
from midistral.tokenize.extra import BarStats

DENSITY_LEVELS = {"low": 4, "medium": 8, "high": 16}
NOT_TRAINED = ("this model has no attribute-control tokens (its tokenizer was saved without them); train one "
               "with data.attributes = 0.3 in its config (as configs/chorales.toml does)")


def parse_density(value, flag: str = "--density") -> int:
    """"low" | "medium" | "high" | a number of notes per bar (>= 0) -> notes per bar."""
    text = str(value).strip().lower()
    if text in DENSITY_LEVELS:
        return DENSITY_LEVELS[text]
    if text.isdigit():
        return int(text)
    raise MidistralError(f"{flag + ' ' if flag else ''}{value!r}: expected low, medium, high or a number of "
                         "notes per bar (e.g. 6)")


def parse_polyphony(value, flag: str = "--polyphony") -> int:
    """A number of notes starting together at most (>= 1)."""
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise MidistralError(f"{flag + ' ' if flag else ''}{value!r}: expected the most notes starting together, "
                             "a number >= 1")
    return int(text)


def density_label(value) -> str:
    level = str(value).strip().lower()
    return f"{level} ({DENSITY_LEVELS[level]}/bar)" if level in DENSITY_LEVELS else f"{int(value)}/bar"


class AttributeConstraint:
    """A `generate` constraint: before every bar the model starts, the three bar attribute tokens `bar_ids`
    (density, polyphony min, polyphony max). Pass it last: it reads the mask the other constraints left."""

    # phases of a row: free, after the density token, after the polyphony minimum, after the maximum (a bar
    # starts next), after a lone "▁" there (its Bar comes next)
    FREE, AFTER_DENSITY, AFTER_MIN, BAR_NEXT, AFTER_WORD_START = range(5)

    def __init__(self, tok, bar_ids: list[int]):
        self.tok, self.bar_ids = tok, [int(i) for i in bar_ids]
        stats, V = BarStats(tok), len(tok)
        self.starts_bar = torch.zeros(V, dtype=torch.bool)
        self.starts_bar[:stats.n_music] = torch.from_numpy(stats.starts_bar[:stats.n_music])
        self.word_start = torch.zeros(V, dtype=torch.bool)
        self.word_start[:stats.n_music] = torch.from_numpy(stats.empty[:stats.n_music])
        self.bar_lead = self.starts_bar | self.word_start
        self.bar_attr = torch.zeros(V, dtype=torch.bool)
        self.bar_attr[[i for t, i in tok.extra.id.items() if t.startswith("ACBar")]] = True
        self.ngram_exempt = self.bar_ids  # given, not drawn: the n-gram ban never applies to them
        self.eos = tok.eos_id

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.phase = [self.FREE] * prompt_ids.shape[0]
        self.finished = [False] * prompt_ids.shape[0]

    def mask(self, logits: torch.Tensor) -> None:
        V, inf = self.starts_bar.shape[0], float("-inf")
        for r, phase in enumerate(self.phase):
            if self.finished[r]:
                continue
            row = logits[r, :V]
            ok = ~torch.isinf(row)
            if phase == self.FREE:
                density = self.bar_ids[0]
                bar_mass = torch.logsumexp(row[self.bar_lead & ok], 0) if bool((self.starts_bar & ok).any()) else None
                row.masked_fill_(self.bar_attr, inf)
                if bar_mass is not None and bool(ok[density]):  # the bar's start, through its density token
                    row.masked_fill_(self.bar_lead, inf)
                    row[density] = bar_mass
            elif phase in (self.AFTER_DENSITY, self.AFTER_MIN):
                forced = self.bar_ids[phase]
                if bool(ok[forced]):
                    logits[r] = inf
                    logits[r, forced] = 0.0
            else:
                keep = self.bar_lead if phase == self.BAR_NEXT else self.starts_bar
                if bool((keep & ok).any()):
                    row.masked_fill_(~keep, inf)
                    logits[r, V:] = inf

    def push(self, tokens: torch.Tensor) -> None:
        V = self.starts_bar.shape[0]
        for r, t in enumerate(tokens.tolist()):
            if self.finished[r] or t == self.eos:
                self.finished[r] = True
                continue
            phase = self.phase[r]
            if phase in (self.FREE, self.AFTER_DENSITY, self.AFTER_MIN):
                self.phase[r] = phase + 1 if t == self.bar_ids[phase] else self.FREE
            elif phase == self.BAR_NEXT and 0 <= t < V and bool(self.word_start[t]):
                self.phase[r] = self.AFTER_WORD_START
            else:  # the bar started (or, where another mask left it no choice, something else came)
                self.phase[r] = self.FREE


def bar_attributes(score, start_tick: int, end_tick: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per new bar of a decoded piece: the notes starting in it and the most starting together (all tracks).
    New bars are those from the first bar line at or after `start_tick` (the prompt's end) to the last bar
    with an onset, as the listener counts them (bar lines crossed by a rest included); with `end_tick` (an
    infilled span's end), every bar before it, empty ones too."""
    lines = music.downbeats(score)
    notes = [t.notes.numpy()["time"] for t in score.tracks]
    onsets = np.sort(np.concatenate(notes)) if notes else np.zeros(0, np.int64)
    if end_tick is not None:
        onsets = onsets[onsets < end_tick]
    first = int(np.searchsorted(lines, start_tick, side="left"))
    bar = np.searchsorted(lines, onsets, side="right") - 1
    onsets, bar = onsets[bar >= first], bar[bar >= first] - first
    n = 0 if end_tick is None else int(np.searchsorted(lines, end_tick, side="left")) - first
    if not len(bar) and not n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    dens = np.bincount(bar, minlength=n)
    _, where, together = np.unique(onsets, return_index=True, return_counts=True)
    pmax = np.zeros(len(dens), np.int64)
    np.maximum.at(pmax, bar[where], together)
    return dens, pmax


def _median(values, default: int) -> int:
    return int(np.round(np.median(values))) if len(values) else default


def density_bounds(density: int, cap: int) -> tuple[int, int | None]:
    """The notes a steered bar may hold: at least 3/4 of the request, at most 5/4 (and one more than asked);
    `cap` (the density tokens' "or more") has no upper bound."""
    if density <= 0:
        return 0, 0
    return max(1, round(0.75 * density)), None if density >= cap else max(density + 1, round(1.25 * density))


class DensityConstraint(EveryBarConstraint):
    """Every new bar holds a number of notes near the request: it may not close (Bar, bar attributes, a
    rest across its line, EOS) before `low` notes have started in it, and takes no id that would start more
    than `high` (an id's notes count, and one for an id ending on a Position or Program). The attribute
    tokens say what the bar should be; these bounds hold the model to it where it strays (a 10M model
    follows a density token only roughly). Bars are counted as EveryBarConstraint counts them, from the
    continuation's first bar line; a note doubled at its onset counts once, as the piece is written once. Pass
    it before AttributeConstraint, which reads the bar starts it leaves."""

    def __init__(self, tok, density: int, cap: int):
        super().__init__(tok, programs=())
        self.low, self.high = density_bounds(density, cap)

    @property
    def active(self) -> bool:
        return True

    def unfinished(self, r: int) -> bool:
        return self.armed[r] and not self.done[r] and len(self.notes[r]) < self.low

    def room(self, r: int) -> int | None:
        return None if not self.armed[r] or self.high is None else self.high - len(self.notes[r])


class Steering:
    """The attribute controls of one call: `key` (a Key or "E major"), `density` ("low" | "medium" | "high" |
    notes per bar), `polyphony` (the most notes starting together); None = not asked."""

    def __init__(self, tok, key=None, density=None, polyphony=None):
        self.tok = tok
        self.key: Key | None = None if key is None else parse_key(key)
        self.density_asked = density
        self.density = None if density is None else parse_density(density)
        self.polyphony = None if polyphony is None else parse_polyphony(polyphony)
        self.stats = None
        if self.steers_bars:
            e = tok.extra
            if e is None or "ACBarNoteDensity_0" not in e.id:
                raise MidistralError(f"{self._flags()}: {NOT_TRAINED}")
            cap, top = e.params["density_bar_max"], e.params["polyphony_max"]
            if self.density is not None and self.density > cap:
                raise MidistralError(f"--density {density!r}: the model's density tokens count up to {cap} notes "
                                     f"per bar ({cap} means {cap} or more)")
            if self.polyphony is not None and self.polyphony > top:
                raise MidistralError(f"--polyphony {polyphony!r}: the model's polyphony tokens go up to {top}")
            self.stats = BarStats(tok)
        self.bar_values = None  # (density, polyphony min, polyphony max) of every new bar, set by prompt()

    @property
    def steers_bars(self) -> bool:
        return self.density is not None or self.polyphony is not None

    @property
    def active(self) -> bool:
        return self.key is not None or self.steers_bars

    def _flags(self) -> str:
        return " and ".join(f for f, v in (("--density", self.density), ("--polyphony", self.polyphony))
                            if v is not None)

    def prompt(self, ids: np.ndarray, suffix: np.ndarray | None = None) -> np.ndarray:
        """`ids` (BOS, a style, then the prompt's ids) with the attribute tokens density and polyphony need.
        `suffix`: infilling's bars after the span, which the track-level tokens describe too (mark them with
        `mark_bars`)."""
        ids = np.asarray(ids, np.int64)
        if not self.steers_bars:
            return ids
        e = self.tok.extra
        style = set(e.style_ids.values())
        n_head = 0
        while n_head < len(ids) and (ids[n_head] == self.tok.bos_id or int(ids[n_head]) in style):
            n_head += 1
        head, body = ids[:n_head], ids[n_head:]
        starts = self.stats.bar_starts(body)
        dens, pmin, pmax = self.stats.per_bar(body, starts)
        if suffix is not None:  # infilling: the bars after the span describe the piece too
            s_starts = self.stats.bar_starts(suffix)
            dens, pmin, pmax = (np.r_[a, b] for a, b in zip((dens, pmin, pmax),
                                                             self.stats.per_bar(suffix, s_starts)))
        sounding = dens > 0
        p_max = self.polyphony or _median(pmax[sounding], min(max(round((self.density or 0) / 4), 1), 6))
        d = self.density if self.density is not None else _median(dens, min(4 * p_max, e.params["density_bar_max"]))
        p_min = min(_median(pmin[sounding], 1), p_max)
        self.bar_values = (d, p_min, p_max)
        track = e.track_ids(np.r_[dens, d], int(min([*pmin[sounding], p_min])), int(max([*pmax, p_max])))
        return np.r_[head, track, self.mark_bars(body)].astype(np.int64)

    def mark_bars(self, body: np.ndarray) -> np.ndarray:
        """`body` (whole bars of ids) with each bar's attribute tokens (its own values) before it."""
        body = np.asarray(body, np.int64)
        if not self.steers_bars:
            return body
        starts = self.stats.bar_starts(body)
        out, last = [], 0
        for s, values in zip(starts.tolist(), zip(*self.stats.per_bar(body, starts))):
            out += [*body[last:s], *self.tok.extra.bar_ids(*values)]
            last = s
        return np.asarray([*out, *body[last:]], np.int64)

    def constraints(self) -> list:
        """Fresh `generate` constraints for one call (after the grammar, instruments and length)."""
        out = [KeyConstraint(self.tok, self.key)] if self.key is not None else []
        if self.steers_bars:
            if self.bar_values is None:
                raise MidistralError("Steering.prompt() must add the attribute tokens before generating")
            if self.density is not None:
                out.append(DensityConstraint(self.tok, self.density, self.tok.extra.params["density_bar_max"]))
            out.append(AttributeConstraint(self.tok, self.tok.extra.bar_ids(*self.bar_values)))
        return out

    def key_report(self, out: int, total: int) -> str:
        return f"key {self.key}: {out} of {total} new notes out of key ({out / max(total, 1):.0%})"

    def report(self, sample) -> str:
        """Requested and achieved value of every control asked for, for a Sample of `Sampler.sample` (its
        written ids give the key's share, its piece the bars)."""
        parts = []
        if self.key is not None:
            parts.append(self.key_report(*out_of_key_share(self.tok, np.asarray(sample.new_ids, np.int64), self.key)))
        if self.steers_bars:  # the new bars: to the end, or to the end of an infilled span
            dens, pmax = bar_attributes(sample.score, sample.start_tick, sample.end_tick)
            n = f"over {len(dens)} new bar{'s' * (len(dens) != 1)}"
            if self.density is not None:
                mean = f"{dens.mean():.1f}" if len(dens) else "-"
                parts.append(f"density {density_label(self.density_asked)}: {mean} notes per bar {n}")
            if self.polyphony is not None:
                sounding = pmax[dens > 0]
                got = f"{sounding.mean():.1f} (highest {sounding.max()})" if len(sounding) else "-"
                parts.append(f"polyphony {self.polyphony}: mean bar maximum {got} {n}")
        return "; ".join(parts)

    def annotate(self, samples: list) -> list:
        """The Samples with the requested and achieved value of each control at the end of their report."""
        for s in samples if self.active else ():
            s.report += f"  controls: {self.report(s) if s.new_track is None else self.report_track(s)}"
        return samples

    def report_track(self, sample) -> str:
        """The line for an added track (Sample.new_track): the key over its notes (drums never count)."""
        track = sample.score.tracks[sample.new_track]
        pitches = np.zeros(0, np.int64) if track.is_drum else track.notes.numpy()["pitch"].astype(np.int64)
        if self.key is None:
            return ""
        return self.key_report(int((~self.key.in_key[pitches % 12]).sum()), len(pitches))
