"""Attribute controls at sampling: key, note density and onset polyphony, and their requested-vs-achieved line.

    steer = Steering(tok, key="E major", density="low", polyphony=2)
    prompt = steer.prompt(prompt_ids)                   # + the attribute tokens the model was trained with
    ids = generate(model, prompt, ..., constraints=[GrammarConstraint(tok), *steer.constraints()])
    steer.report(new_ids)                               # 'key E major: 0 of 57 notes out of key; ...'

`Steering` gathers what one call asks for; `midistral.sampler.Sampler` builds one per call. The key is a
mask (controls/key.py); density and polyphony steer through the attribute-control tokens of
tokenize/extra.py (docs/sampling.md, "Attribute controls").
"""

from __future__ import annotations

import numpy as np

from midistral.controls.key import Key, KeyConstraint, out_of_key_share, parse_key


class Steering:
    """The attribute controls of one call: `key` (a Key or "E major"); None = not asked."""

    def __init__(self, tok, key=None):
        self.tok = tok
        self.key: Key | None = None if key is None else parse_key(key)

    @property
    def active(self) -> bool:
        return self.key is not None

    def constraints(self) -> list:
        """Fresh `generate` constraints for one call (after the grammar, instruments and length)."""
        return [KeyConstraint(self.tok, self.key)] if self.key is not None else []

    def key_report(self, out: int, total: int) -> str:
        return f"key {self.key}: {out} of {total} new notes out of key ({out / max(total, 1):.0%})"

    def report_track(self, sample) -> str:
        """The line for an added track (Sample.new_track): the key over its notes (drums never count)."""
        track = sample.score.tracks[sample.new_track]
        pitches = np.zeros(0, np.int64) if track.is_drum else track.notes.numpy()["pitch"].astype(np.int64)
        if self.key is None:
            return ""
        return self.key_report(int((~self.key.in_key[pitches % 12]).sum()), len(pitches))

    def report(self, new_ids) -> str:
        """Requested and achieved value of every control asked for, from the ids a sample wrote."""
        parts = []
        if self.key is not None:
            parts.append(self.key_report(*out_of_key_share(self.tok, np.asarray(new_ids, np.int64), self.key)))
        return "; ".join(parts)
