"""`OnsetConstraint`: at one onset, an instrument starts a pitch at most once and at most ten notes in all.

    cons = [GrammarConstraint(tok), OnsetConstraint(tok), BarsConstraint(tok, 16)]

A small model sometimes stays at one onset and writes note after note there: the shipped model's samples had
chords of 35 to 1,068 notes on one tick, most of them the same few pitches again. Two notes of one pitch
starting together on one instrument are one note to a MIDI player (the first note-off ends both), and no
training piece starts more than seven notes at once on one instrument (ten fingers are the bound used here).
So ids whose notes at the current onset repeat a pitch of their instrument there, or take it past
`per_instrument` notes, are masked, and their probability goes to the ids that move on in time (a Bar,
Position or Rest first), in proportion: spread over all ids it turned a restated voice into a new one (the
chorales' polyphony rose from 3.95 to 4.03 voices, sd 0.2 to 0.4). Only an id's notes before its first time
move count (later ones start at another onset); where the mask would leave a row nothing it does nothing. It
follows generate's protocol (start / mask / push) on BPE ids.
"""

from __future__ import annotations

import numpy as np
import torch

from midistral.controls.constraints import BAR, DRUM, PITCH, POSITION, PROGRAM, REST, id_expansions

PER_INSTRUMENT = 10
N_PITCH = 128
CURRENT = -99  # "the instrument of the stream at this point" in the tables


class OnsetConstraint:
    """Mask ids that repeat a pitch of an instrument at the current onset or pass `per_instrument` notes there."""

    def __init__(self, tok, per_instrument: int = PER_INSTRUMENT):
        self.tok, self.cap = tok, int(per_instrument)
        self.exp = [e.tolist() for e in id_expansions(tok)]
        fam = tok.family.tolist()
        self._slot = {p: k for k, p in enumerate(sorted(tok.program_id))}  # program -> row of the onset tables
        self._program_of = tok.program_of
        # per id, the (instrument, pitch) of each note it starts before its first time move
        pairs = []
        for e in self.exp:
            row, prog = [], CURRENT
            for x in e:
                if fam[x] in (BAR, POSITION, REST):
                    break
                if fam[x] == PROGRAM:
                    prog = self._slot[self._program_of[x]]
                elif fam[x] in (PITCH, DRUM):
                    row.append((prog, self._pitch(x, fam[x])))
            pairs.append(row)
        k = max(1, max(len(r) for r in pairs))
        self._prog = np.full((len(pairs), k), CURRENT, np.int64)
        self._pitch_tab = np.full((len(pairs), k), -1, np.int64)
        for i, r in enumerate(pairs):
            for j, (p, q) in enumerate(r):
                self._prog[i, j], self._pitch_tab[i, j] = p, q
        self._starts = np.flatnonzero((self._pitch_tab >= 0).any(1))  # ids that start a note at this onset
        # ids that move on in time first (their first base token is a Bar, Position or Rest)
        self._moves_on = torch.tensor([bool(e) and fam[e[0]] in (BAR, POSITION, REST) for e in self.exp])
        self._fam = fam
        self._ends = {i for i in (tok.eos_id, tok.extra and tok.extra.fill_end_id) if i is not None}

    def _pitch(self, x: int, f: int) -> int:
        base = self.tok.drum0 - self.tok.config.drums_pitch_range[0] if f == DRUM \
            else self.tok.pitch0 - self.tok.config.pitch_range[0]
        return x - base

    def start(self, prompt_ids: torch.Tensor) -> None:
        n = len(prompt_ids)
        self.onset = [np.zeros((len(self._slot), N_PITCH), np.int64) for _ in range(n)]  # notes per (slot, pitch)
        self.program = [self._slot.get(0, 0)] * n
        self.done = [False] * n
        for r, row in enumerate(prompt_ids.tolist()):
            for x in self.tok.base_ids(row).tolist():
                self._feed(r, x)

    def _feed(self, r: int, x: int) -> None:
        f = self._fam[x]
        if f in (BAR, POSITION, REST):
            self.onset[r][:] = 0
        elif f == PROGRAM:
            self.program[r] = self._slot[self._program_of[x]]
        elif f in (PITCH, DRUM):
            self.onset[r][self.program[r], self._pitch(x, f)] += 1

    def mask(self, logits: torch.Tensor) -> None:
        ids = self._starts
        for r in range(logits.shape[0]):
            if self.done[r]:
                continue
            onset = self.onset[r]
            if not onset.any():
                continue
            prog = np.where(self._prog[ids] == CURRENT, self.program[r], self._prog[ids])
            pitch = self._pitch_tab[ids]
            real = pitch >= 0
            safe = np.maximum(pitch, 0)
            repeats = real & (onset[prog, safe] > 0)
            # notes of that instrument at the onset so far, plus the id's own up to this one
            before = np.cumsum(real[:, :, None] & (prog[:, :, None] == prog[:, None, :]), axis=1)
            own = before[:, np.arange(prog.shape[1]), np.arange(prog.shape[1])]
            too_many = real & (onset.sum(1)[prog] + own > self.cap)
            ban = torch.zeros(logits.shape[1], dtype=torch.bool)
            ban[torch.from_numpy(ids[(repeats | too_many).any(1)])] = True
            row = logits[r]
            ban, on = ban.to(row.device), self._moves_on.to(row.device)
            if not bool(ban.any()) or not bool(torch.isfinite(row.masked_fill(ban, float("-inf"))).any()):
                continue
            moving = row[:len(on)].masked_fill(~on, float("-inf"))
            if bool(torch.isfinite(moving).any()):
                # the masked ids' probability goes to moving on (not to other pitches: a voice the model meant
                # to restate would otherwise become a new voice), scaling the moves by (moves + masked) / moves
                kept, masked = torch.logsumexp(moving, 0), torch.logsumexp(row.masked_fill(~ban, float("-inf")), 0)
                row[:len(on)] = torch.where(on, row[:len(on)] + torch.logaddexp(kept, masked) - kept, row[:len(on)])
            row.masked_fill_(ban, float("-inf"))

    def push(self, tokens: torch.Tensor) -> None:
        for r, t in enumerate(tokens.tolist()):
            if t in self._ends:
                self.done[r] = True
            if not self.done[r] and 0 <= t < len(self.exp):
                for x in self.exp[t]:
                    self._feed(r, x)
