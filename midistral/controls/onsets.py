"""`OnsetConstraint`: at one onset, an instrument starts ten notes at most; past that, the model moves on.

    cons = [GrammarConstraint(tok), OnsetConstraint(tok), BarsConstraint(tok, 16)]

A small model sometimes stays at one onset and writes note after note there: the shipped model's samples had
chords of 14 to 1,068 notes on one tick (in 6 of 16 Bach and 10 of 16 classical samples), most of them the same
few pitches again, while no training piece starts more than seven notes at once on one instrument (ten
fingers are the bound used here). So an id whose notes at the current onset take their instrument past
`per_instrument` notes there (or switch to an instrument that has them: a note of it must follow) is masked,
and its probability goes to the ids that move on in time (a Bar,
Position or Rest first), in proportion: the model wanted more at this onset, and there is no more. Only an id's
notes before its first time move count (later ones start at another onset); where the mask would leave a row
nothing it does nothing. Two notes of one pitch at one onset stay allowed: the corpus has them (two voices
given one instrument), and masking them moved the chorale model's samples away from the real ones
(bench/RESULTS.md). It follows generate's protocol (start / mask / push) on BPE ids.
"""

from __future__ import annotations

import numpy as np
import torch

from midistral.controls.constraints import BAR, DRUM, PITCH, POSITION, PROGRAM, REST, id_expansions
from midistral.controls.masks import leaves_something

PER_INSTRUMENT = 10
CURRENT = -1  # "the instrument of the stream at this point" in the tables


class OnsetConstraint:
    """Mask ids that take an instrument past `per_instrument` notes at the current onset, or switch to one that
    has them (a note of it must follow); their probability moves on."""

    def __init__(self, tok, per_instrument: int = PER_INSTRUMENT):
        self.tok, self.cap = tok, int(per_instrument)
        self.exp = [e.tolist() for e in id_expansions(tok)]
        fam = tok.family.tolist()
        self._slot = {p: k for k, p in enumerate(sorted(tok.program_id))}  # program -> index of the counts
        self._program_of = tok.program_of
        # per id, before its first time move: each note it starts and each instrument it switches to (a
        # Program, which a note must follow), as (instrument slot or CURRENT, is a note)
        events = []
        for e in self.exp:
            row, prog = [], CURRENT
            for x in e:
                if fam[x] in (BAR, POSITION, REST):
                    break
                if fam[x] == PROGRAM:
                    prog = self._slot[self._program_of[x]]
                    row.append((prog, False))
                elif fam[x] in (PITCH, DRUM):
                    row.append((prog, True))
            events.append(row)
        k = max(1, max(len(r) for r in events))
        self._starts = np.array([i for i, r in enumerate(events) if r], np.int64)  # ids with notes or switches
        self._prog = np.full((len(self._starts), k), CURRENT, np.int64)
        self._real = np.zeros((len(self._starts), k), bool)  # a note
        self._switch = np.zeros((len(self._starts), k), bool)  # a Program
        for j, i in enumerate(self._starts.tolist()):
            n = len(events[i])
            self._prog[j, :n] = [p for p, _ in events[i]]
            self._real[j, :n] = [note for _, note in events[i]]
            self._switch[j, :n] = [not note for _, note in events[i]]
        # ids that move on in time first (their first base token is a Bar, Position or Rest)
        self._moves_on = torch.tensor([bool(e) and fam[e[0]] in (BAR, POSITION, REST) for e in self.exp])
        self._fam = fam
        self._ends = {i for i in (tok.eos_id, tok.extra and tok.extra.fill_end_id) if i is not None}

    def start(self, prompt_ids: torch.Tensor) -> None:
        n = len(prompt_ids)
        self.onset = [np.zeros(len(self._slot), np.int64) for _ in range(n)]  # notes per instrument at the onset
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
            self.onset[r][self.program[r]] += 1

    def _banned(self, r: int) -> np.ndarray:
        """The ids that would take an instrument past the cap at row r's onset."""
        prog = np.where(self._prog == CURRENT, self.program[r], self._prog)
        # notes of that instrument at the onset so far, plus the id's own up to this one
        same = self._real[:, :, None] & (prog[:, :, None] == prog[:, None, :])
        own = np.cumsum(same, axis=1)[:, np.arange(prog.shape[1]), np.arange(prog.shape[1])]
        count = self.onset[r][prog] + own
        # a note past the cap, or a switch to an instrument at the cap (the grammar wants a note of it next)
        return self._starts[((self._real & (count > self.cap)) | (self._switch & (count >= self.cap))).any(1)]

    def mask(self, logits: torch.Tensor) -> None:
        for r in range(logits.shape[0]):
            if self.done[r] or self.onset[r].max() < self.cap - self._prog.shape[1]:
                continue  # no id can reach the cap from here
            ban = torch.zeros(logits.shape[1], dtype=torch.bool)
            ban[torch.from_numpy(self._banned(r))] = True
            row = logits[r]
            ban, on = ban.to(row.device), self._moves_on.to(row.device)
            if not bool(ban.any()) or not leaves_something(row, ban):
                continue
            moving = row[:len(on)].masked_fill(~on, float("-inf"))
            if bool(torch.isfinite(moving).any()):
                # the masked ids' probability goes to moving on, scaling the moves by (moves + masked) / moves
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
