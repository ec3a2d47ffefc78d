"""Accompaniment: add (or rewrite) one instrument's track over an existing piece, its notes kept exactly.

    score = accompany(model, tok, "song.mid", "bass")    # song.mid unchanged + a new bass track

The model walks the piece's token stream in time (`Walk`): the piece's own tokens are forced, and
between them it may write notes of the new instrument; docs/controls.md has the whole story.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Callable

import numpy as np
import symusic
import torch

from midistral.controls.constraints import (BAR, DRUM, DURATION, PITCH, POSITION, PROGRAM, REST, SPECIAL, TIMESIG,
                                            VELOCITY, id_expansions)
from midistral.controls.feeder import Feeder
from midistral.controls.instruments import unknown_instruments_note
from midistral.controls.key import out_of_key_ids, parse_key
from midistral.errors import MidiError, MidistralError
from midistral.general_midi import parse_program, program_name
from midistral.generate import NoRepeatNGram, sample_next
from midistral.sampling import SAMPLING
from midistral.tokenize import load_score
from midistral.tokenize.clock import EncoderClock, bar_lines


def parse_bar_range(spec) -> tuple[int, int | None]:
    """"5:12" -> (5, 12): bars 5 to 12, counted from 1, both included; "5:" to the end, ":12" from the start."""
    if isinstance(spec, (tuple, list)):
        a, b = spec
    else:
        m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", str(spec))
        if not m or not (m.group(1) or m.group(2)):
            raise MidistralError(f"bars: {spec!r} is not a bar range such as 5:12, 5: or :12")
        a, b = (int(m.group(1)) if m.group(1) else 1), (int(m.group(2)) if m.group(2) else None)
    if a is None:
        a = 1
    if int(a) < 1 or (b is not None and int(b) < int(a)):
        raise MidistralError(f"bars: {spec!r} is not a range of bars counted from 1 (first <= last)")
    return int(a), None if b is None else int(b)


def accompany(model, tok, score_or_path, program, *, bars=None, replace=False, temperature=SAMPLING.temperature,
              top_k=SAMPLING.top_k, no_repeat_ngram_size=SAMPLING.no_repeat_ngram_size, seed=None,
              grammar=SAMPLING.grammar, precision="fp32",
              max_notes_per_tick=6, known=None, log: Callable[[str], None] | None = None, key=None) -> symusic.Score:
    """The piece with its notes unchanged plus one new track for `program` (a number or a name), written by
    the model over the whole piece or over `bars` (a:b, counted from 1). replace=True first drops the
    notes of that program and writes new ones in their place.

    The model walks the piece's token stream in time: the existing tokens are forced (fed to the model
    in chunks through one rolling KV cache), and after each tick of the piece it may write notes of the
    new program at that tick, or at a new tick before the next existing one (new ticks lie on the piece's
    own rhythmic grid: the coarsest of eighths, triplets, sixteenths, ... that holds 90% of its onsets;
    at most one bar ahead), or go on. The new track is last in track order, so at each tick its notes
    follow the others'. Time tokens (rests, bar lines, positions) are recomputed as the encoder writes
    them for the piece with its new notes, so the stream the model reads stays an exact encoding. The
    walk offers only ids that keep the stream valid, so every id decodes: `grammar` is accepted for the
    common signature and changes nothing. At most `max_notes_per_tick` new notes start together.
    `precision` is the decode path's, as in generate() (midistral.model.precision). `known`: the programs
    the model learned (controls.known_programs); asked for another, a one-line note goes to `log` (else
    warnings.warn) naming those it knows. `key` ("E major", controls/key.py): the new notes only in that key.
    """
    score = load_score(score_or_path)
    label = str(score_or_path) if not isinstance(score_or_path, symusic.Score) else "the piece"
    program = parse_program(program, "replace-track" if replace else "add-track")
    if score.note_num() == 0:
        raise MidiError(f"{label}: has no notes to accompany")
    playing = {-1 if t.is_drum else t.program for t in score.tracks if len(t.notes)}
    if program in playing and not replace:
        raise MidistralError(f"add-track: {program_name(program)} (program {program}) already plays in {label}; "
                             f"use --replace-track {program} to rewrite it")
    keep = [t for t in score.tracks if not ((-1 if t.is_drum else t.program) == program)]
    context = symusic.Score(score.tpq)
    context.tempos, context.time_signatures = score.tempos, score.time_signatures
    for t in keep:
        context.tracks.append(t.copy())
    if context.note_num() == 0:
        raise MidiError(f"{label}: has no notes besides {program_name(program)}'s to accompany")
    note = unknown_instruments_note([program], known)
    if note is not None:
        (log or (lambda msg: warnings.warn(msg, stacklevel=3)))(f"note: {note}")
    walk = Walk(model, tok, context, program, parse_bar_range(bars) if bars is not None else None,
                temperature, top_k, no_repeat_ngram_size, seed, max_notes_per_tick, precision)
    if key is not None:
        walk.banned = set(np.flatnonzero(out_of_key_ids(tok, parse_key(key)).numpy()).tolist())
    new = walk.run()
    out = score.copy()
    if replace:
        out.tracks = [t.copy() for t in keep]
    out.tracks.append(new_track(tok, new, program, score.tpq))
    return out


def new_track(tok, base_ids: list[int], program: int, tpq: int) -> symusic.Track:
    """The notes of `program` in the walked stream, as a named track at the piece's resolution."""
    decoded = tok.decode(np.array(base_ids, dtype=np.int64))
    track = symusic.Track(name=program_name(program), program=max(program, 0), is_drum=program == -1)
    for t in decoded.tracks:
        if (-1 if t.is_drum else t.program) == program:
            n = t.notes.numpy()
            f = tpq / decoded.tpq
            track.notes = symusic.Note.from_numpy(
                np.round(n["time"] * f).astype(np.int32), np.maximum(np.round(n["duration"] * f), 1).astype(np.int32),
                n["pitch"], n["velocity"], "tick")
    return track


class _Node:
    __slots__ = ("kids", "leaf")

    def __init__(self):
        self.kids: dict[int, _Node] = {}
        self.leaf = None  # ("note", tick) after time tokens + Program, ("group",), ("end",)


class Walk:
    """The accompaniment walk: existing groups of tokens (one per tick) forced, new notes sampled between."""

    def __init__(self, model, tok, context, program, bar_range, temperature, top_k, ngram, seed, max_per_tick,
                 precision="fp32"):
        self.model, self.tok, self.program, self.precision = model, tok, program, precision
        self.temperature, self.top_k, self.max_per_tick = temperature, top_k, max_per_tick
        self.fam = tok.family.tolist()
        self.prog_tok = tok.program_id[program]
        self.pitch_fam = DRUM if program == -1 else PITCH
        enc = tok.encode_with_times(context)
        tpq, ts_list = enc.tpq, enc.time_signatures
        self.tpq, self.ts_list = tpq, ts_list
        self.groups = self._groups(enc.ids.tolist(), enc.ticks.tolist(), enc.onsets.tolist(), enc.ends.tolist())
        max_end = max(g[3] for g in self.groups)
        lines = bar_lines(ts_list, tpq, max_end + 16 * tpq * 4)
        self.t_end = int(lines[np.searchsorted(lines, max_end, side="left")])
        lo, hi = 0, self.t_end
        if bar_range is not None:
            a, b = bar_range
            lo = int(lines[a - 1]) if a - 1 < len(lines) else self.t_end
            hi = min(int(lines[b]) if b is not None and b < len(lines) else self.t_end, self.t_end)
        if lo >= self.t_end:
            n_bars = int(np.searchsorted(lines, self.t_end, side="left"))
            raise MidistralError(f"bars: {a}:{'' if b is None else b} starts after the piece's last bar ({n_bars})")
        self.lo, self.hi = lo, hi
        self.grid = _piece_grid([g[0] for g in self.groups if any(self.fam[x] == PROGRAM for x in g[2])], tpq)
        self.exp = [e.tolist() for e in id_expansions(tok)]
        by_first: dict[int, list[int]] = {}
        for i, e in enumerate(self.exp):
            if e:
                by_first.setdefault(e[0], []).append(i)
        self.by_first = by_first
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,)).item()))
        self.ngram_size = ngram
        self.banned: set[int] = set()  # ids never sampled (a key's out-of-key notes)

    def _groups(self, ids, ticks, onsets, note_ends):
        """(tick, TimeSig change id or None, item ids, max end) per tick of the encoded piece, in order."""
        fam = self.fam
        change_ticks = {t for t, _, _ in self.ts_list}
        ends: dict[int, int] = {}
        for t, e in zip(onsets, note_ends):
            ends[t] = max(ends.get(t, t), e)
        groups, cur = [], None
        for x, t in zip(ids, ticks):
            f = fam[x]
            if f in (BAR, POSITION, REST) or (f == TIMESIG and t not in change_ticks):
                continue
            if cur is None or cur[0] != t:
                cur = [t, None, [], max(ends.get(t, t), t)]
                groups.append(cur)
            if f == TIMESIG:
                cur[1] = x
            else:
                cur[2].append(x)
        return groups

    # -- the encoder's time tokens, on a copy of its clock

    def _group_tokens(self, st, g, prev_end: int) -> list[int]:
        """The tokens the encoder writes for group g (time tokens, meter change, items) after notes that
        sound until `prev_end`; advances `st`."""
        t, ts_tok, items, _ = g
        toks: list[int] = []
        if ts_tok is not None:
            st.advance(t, prev_end, True, toks, [])
            toks.append(ts_tok)
            n, d = self.tok.id_to_token[ts_tok].split("_")[1].split("/")
            st.change_ts(t, (t, int(n), int(d)))
            prev_end = max(prev_end, t)
        if items:
            st.advance(t, prev_end, False, toks, [])
            toks += items
        return toks

    def _trie(self) -> _Node | None:
        """The options (below), behind the tokens held back from the last forced run: the model may then pick
        an id that spans the end of the existing tokens and the start of its choice, as BPE does in training."""
        root, held, self.held = self._options(), self.held, []
        if root is None:
            self.base += held
            return None
        for x in reversed(held):
            node = _Node()
            node.kids[x] = root
            root = node
        return root

    def _options(self) -> _Node | None:
        """Every way on from the current tick: a note here, a note at a later tick before the next existing
        group (its time tokens, then Program), or the next group itself; None when the walk is over."""
        root = _Node()
        t, nxt = self.t_cur, self.gi + 1
        t_next = self.groups[nxt][0] if nxt < len(self.groups) else self.t_end
        if self.lo <= t < self.hi and len(self.here) < self.max_per_tick:
            self._add(root, [self.prog_tok], ("note", t))
        stop = min(t_next, self.hi, t + self.st.bar_len + 1)
        step = max(self.grid, self.st.tpp)
        for t2 in range(-(-max(t + 1, self.lo) // step) * step, stop, step):
            st = copy.copy(self.st)
            toks: list[int] = []
            st.advance(t2, self.prev_end, False, toks, [])
            self._add(root, toks + [self.prog_tok], ("note", t2))
        if nxt < len(self.groups):
            if t_next >= self.hi and not root.kids:
                return None
            toks = self._group_tokens(copy.copy(self.st), self.groups[nxt], self.prev_end)
            self._add(root, toks, ("group",) if t_next < self.hi else ("stop",))
        elif self.tok.eos_id is not None and root.kids:
            self._add(root, [self.tok.eos_id], ("end",))
        else:
            return None
        return root

    @staticmethod
    def _add(root: _Node, toks: list[int], leaf) -> None:
        node = root
        for x in toks:
            node = node.kids.setdefault(x, _Node())
        node.leaf = leaf

    # -- ids the model may choose, and what they do

    def _consume(self, node: _Node, k: int, expansion: list[int]):
        """Follow `expansion` from a trie node (k = -1) or from inside a note (k = 0 Pitch, 1 Velocity,
        2 Duration): (node, k, leaf passed, note finished), or None if the id does not fit."""
        leaf, fam = None, self.fam
        for x in expansion:
            if k < 0:
                if node.leaf is not None:  # nothing follows a group, the end, or a stop inside one id
                    return None
                node = node.kids.get(x)
                if node is None:
                    return None
                if node.leaf is not None:
                    leaf = node.leaf
                    if leaf[0] == "note":
                        k = 0
            elif k == 3:
                return None
            else:
                want = (self.pitch_fam, VELOCITY, DURATION)[k]
                if fam[x] != want or (k == 0 and x in self.here):
                    return None
                k += 1
        return node, k, leaf

    def _allowed(self, node: _Node, k: int) -> list[int]:
        if k >= 0:  # inside a note the answer depends only on k and the pitches already at this tick
            key = (k, frozenset(self.here) if k == 0 else None)
            if key not in self.note_allowed:
                self.note_allowed[key] = [i for f in self.first_of[k] for i in self.by_first.get(f, ())
                                          if self._consume(node, k, self.exp[i]) is not None]
            return self.note_allowed[key]
        return [i for f in node.kids for i in self.by_first.get(f, ())
                if self._consume(node, k, self.exp[i]) is not None]

    def _forced_ids(self, toks: list[int]) -> list[int]:
        """BPE ids for forced base tokens: split at bar lines (a bar starts a BPE word, with its "▁")."""
        if self.tok.bpe is None or not toks:
            return list(toks)
        cuts = [i for i, x in enumerate(toks) if self.fam[x] in (BAR, SPECIAL)] + [len(toks)]
        cuts = sorted(set([0] + cuts))
        out: list[int] = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            seg = toks[a:b]
            if self.fam[seg[0]] == SPECIAL:  # special tokens are never merged
                out.append(seg[0])
                seg = seg[1:]
                if not seg:
                    continue
            out += self.tok.bpe.encode_word(seg, starts_bar=self.fam[seg[0]] == BAR)
        return out

    # -- the walk

    @torch.inference_mode()
    def run(self) -> list[int]:
        """Walk the piece; returns the base ids of the whole stream (existing and new notes)."""
        tok = self.tok
        fam_ids = {f: [i for i in range(len(tok.vocab)) if self.fam[i] == f] for f in (self.pitch_fam, VELOCITY, DURATION)}
        self.first_of = [fam_ids[self.pitch_fam], fam_ids[VELOCITY], fam_ids[DURATION]]
        self.st = EncoderClock(tok, self.tpq, self.ts_list[0])
        self.prev_end, self.gi, self.here = 0, 0, set()
        bos = [tok.bos_id] if tok.bos_id is not None else []
        first = self._group_tokens(self.st, self.groups[0], self.prev_end)
        self.prev_end = max(self.prev_end, self.groups[0][3])
        self.t_cur = self.groups[0][0]
        self.base, self.pending, self.held = [], [], []
        self._force(bos + first, hold=True)
        self.feeder = Feeder(self.model, self.precision)
        self.ngram = NoRepeatNGram(self.ngram_size, torch.tensor([[0]])) if self.ngram_size else None
        self.n_sampled = 0
        self.note_allowed: dict = {}
        node = self._trie()
        while node is not None:
            node = self._advance(node)
        return self.base

    def _advance(self, node: _Node) -> _Node | None:
        """From the start of a decision (a fresh trie), sample until its leaf is reached and a note (if any)
        is complete; returns the next trie or None at the end."""
        k, leaf = -1, None
        while True:
            if k < 0 and leaf is None and _n_leaves(node) == 1:  # one way on: force it
                toks, leaf = _only_path(node)
                self._force(toks, hold=leaf[0] == "group")
                if leaf[0] == "note":
                    k = 0
                node = None
            else:
                i = self._sample(node, k)
                node, k, passed = self._consume(node, k, self.exp[i])
                self.base += self.exp[i]
                self.pending.append(i)
                leaf = leaf or passed
            if leaf is not None and leaf[0] == "note" and leaf[1] != self.t_cur:
                self.st.advance(leaf[1], self.prev_end, False, [], [])
                self.t_cur, self.here = leaf[1], set()
                leaf = ("note", self.t_cur)
            if leaf is not None and leaf[0] != "note":
                return self._after(leaf)
            if k == 3:
                return self._note_done()

    def _sample(self, node: _Node, k: int) -> int:
        """One of the ids the walk allows here, drawn from the model's logits over just those (the n-gram
        ban applies unless it would leave none), with the walk's temperature and top-k."""
        logits = self._logits(node, k)
        allowed = self._allowed(node, k)
        if self.banned:  # no fallback: an in-key pitch is always among the choices
            allowed = [i for i in allowed if i not in self.banned]
        if self.ngram is not None:
            banned = set(self.ngram.banned()[1])
            allowed = [i for i in allowed if i not in banned] or allowed
        choice = sample_next(logits[allowed][None].float(), self.temperature, self.top_k, None, self.generator)
        self.n_sampled += 1
        return allowed[int(choice[0])]

    def _force(self, toks: list[int], hold: bool) -> None:
        """Forced base tokens: to the stream as BPE ids; with `hold`, the last id's tokens wait for the next
        choice (so the model may continue them with an id merged across the boundary)."""
        ids = self._forced_ids(toks)
        if hold and ids and self.fam[self.exp[ids[-1]][0]] != SPECIAL:
            self.held = self.exp[ids[-1]]
            ids, toks = ids[:-1], toks[:len(toks) - len(self.held)]
        self.base += toks
        self.pending += ids

    def _logits(self, node: _Node, k: int) -> torch.Tensor:
        ids, self.pending = self.pending, []
        if self.ngram is not None:
            for x in ids:
                self.ngram.push([x])
        return self.feeder.feed(ids, lambda limit: self._draft(node, limit) if k < 0 else [])

    def _draft(self, node: _Node, limit: int) -> list[int]:
        """The ids the walk reads next if the piece goes on without a new note for a few ticks (whole ticks,
        at least one, up to about `limit` ids): from `node` the way to the next group, then the groups
        after it, segmented as the walk segments forced runs (the last id of each held back for the next
        choice: the walk asks the model at the end of each tick)."""
        path = _group_path(node)
        if path is None:
            return []
        st, prev_end, out, j = copy.copy(self.st), self.prev_end, [], self.gi + 1
        while True:
            ids = self._forced_ids(path)
            if out and len(out) + len(ids) - 1 > limit:
                return out
            out += ids[:-1]
            g = self.groups[j]
            self._group_tokens(st, g, prev_end)
            prev_end, j = max(prev_end, g[3]), j + 1
            if j >= len(self.groups) or self.groups[j][0] >= self.hi:
                return out
            path = self.exp[ids[-1]] + self._group_tokens(copy.copy(st), self.groups[j], prev_end)

    def _after(self, leaf) -> _Node | None:
        if leaf[0] != "group":
            return None
        self.gi += 1
        g = self.groups[self.gi]
        self._group_tokens(self.st, g, self.prev_end)
        self.prev_end = max(self.prev_end, g[3])
        self.t_cur, self.here = g[0], set()
        return self._trie()

    def _note_done(self) -> _Node | None:
        """The note just written (Pitch, Velocity, Duration at the end of the stream) joins the piece."""
        pitch, dur = self.base[-3], self.base[-1]
        self.here.add(pitch)
        ticks = self.tok.duration_ticks(self.st.tpb)[dur - self.tok.dur0]
        self.prev_end = max(self.prev_end, self.t_cur + int(ticks))
        return self._trie()


def _piece_grid(onsets: list[int], tpq: int, share: float = 0.9) -> int:
    """The coarsest rhythmic grid (in ticks: eighths, triplet eighths, sixteenths, ...) that holds `share`
    of the piece's onsets: new notes start on it, so the new part moves in the piece's own rhythm."""
    ons = np.asarray(onsets, dtype=np.int64)
    for step in (tpq // 2, tpq // 3, tpq // 4, tpq // 6, tpq // 8, tpq // 12):
        if step >= 1 and len(ons) and np.mean(ons % step == 0) >= share:
            return int(step)
    return 1


def _group_path(node: _Node) -> list[int] | None:
    """The tokens from `node` to the next existing group, None if that is not a way on from here."""
    for x, kid in node.kids.items():
        if kid.leaf is not None:
            if kid.leaf[0] == "group":
                return [x]
        else:
            rest = _group_path(kid)
            if rest is not None:
                return [x] + rest
    return None


def _n_leaves(node: _Node) -> int:
    return (node.leaf is not None) + sum(_n_leaves(c) for c in node.kids.values())


def _only_path(node: _Node):
    toks = []
    while node.leaf is None:
        (x, node), = node.kids.items()
        toks.append(x)
    return toks, node.leaf