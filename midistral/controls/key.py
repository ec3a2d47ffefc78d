"""Key control: new pitched notes only in a key (`--key "E major"`, `--key "D minor"`).

    key = parse_key("F# minor")                      # Key(root=6, minor=True)
    cons = [GrammarConstraint(tok), KeyConstraint(tok, key)]
    ids = generate(model, prompt, 512, eos_id=tok.eos_id, constraints=cons)   # 0 new notes outside F# minor

The key's pitch classes: major is the major scale; minor is the natural minor scale plus its raised 6th and
7th (melodic and harmonic minor), so D minor allows B and C# beside Bb and C. Drums (PitchDrum tokens) are
never masked. With BPE an id is masked when any Pitch in its expansion lies outside the key, so no sampled id
writes an out-of-key note: the guarantee is on the tokens, not a retry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from midistral.controls.constraints import PITCH, id_expansions
from midistral.errors import MidistralError

NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_LETTER = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_ACCIDENTAL = {"": 0, "#": 1, "♯": 1, "b": -1, "♭": -1}
MAJOR_STEPS = (0, 2, 4, 5, 7, 9, 11)
MINOR_STEPS = (0, 2, 3, 5, 7, 8, 9, 10, 11)  # natural minor + the raised 6th (9) and 7th (11)
_KEY_RE = re.compile(r"\s*([A-Ga-g])\s*([#♯b♭]?)\s*(major|minor|maj|min|m)?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Key:
    root: int  # pitch class of the tonic, 0 = C
    minor: bool

    @property
    def pitch_classes(self) -> frozenset[int]:
        return frozenset((self.root + s) % 12 for s in (MINOR_STEPS if self.minor else MAJOR_STEPS))

    @property
    def in_key(self) -> np.ndarray:
        """(12,) bool: pitch class -> in the key."""
        mask = np.zeros(12, bool)
        mask[list(self.pitch_classes)] = True
        return mask

    def __str__(self) -> str:
        return f"{NOTE_NAMES[self.root]} {'minor' if self.minor else 'major'}"


def parse_key(text, flag: str = "--key") -> Key:
    """"E major", "D minor", "F# minor", "Bb", "c#m" -> Key; anything else a one-line error naming `flag`."""
    if isinstance(text, Key):
        return text
    m = _KEY_RE.fullmatch(str(text))
    if not m:
        raise MidistralError(f"{flag + ' ' if flag else ''}{text!r}: expected a key such as \"E major\", "
                             "\"F# minor\" or \"Bb major\"")
    letter, accidental, mode = m.group(1).upper(), m.group(2), (m.group(3) or "major")
    # "m" alone is minor, "M" alone major (as in chord symbols); the words in any case
    minor = mode == "m" or mode.lower() in ("minor", "min")
    root = (_LETTER[letter] + _ACCIDENTAL[accidental.lower()]) % 12
    return Key(root, minor)


def pitch_of_base(tok) -> np.ndarray:
    """For each base id: its MIDI pitch if it is a Pitch token (not PitchDrum), else -1."""
    fam = tok.family
    pitch = np.full(len(fam), -1, np.int64)
    is_pitch = fam == PITCH
    pitch[is_pitch] = np.flatnonzero(is_pitch) - tok.pitch0 + tok.config.pitch_range[0]
    return pitch


def out_of_key_ids(tok, key: Key) -> torch.Tensor:
    """(len(tok),) bool: the ids whose expansion holds a Pitch outside `key` (extra ids: none)."""
    pitch = pitch_of_base(tok)
    in_key = key.in_key
    bad = [bool(((p := pitch[e]) >= 0).any() and (~in_key[p[p >= 0] % 12]).any()) if len(e) else False
           for e in id_expansions(tok)]
    return torch.tensor(bad, dtype=torch.bool)


class KeyConstraint:
    """A `generate` constraint: no id that writes a pitched note outside `key` (drums free)."""

    def __init__(self, tok, key):
        self.key = parse_key(key)
        self.bad = out_of_key_ids(tok, self.key)

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.bad = self.bad.to(prompt_ids.device)

    def mask(self, logits: torch.Tensor) -> None:
        logits[:, :self.bad.shape[0]].masked_fill_(self.bad, float("-inf"))

    def push(self, tokens: torch.Tensor) -> None:
        pass


def out_of_key_share(tok, new_ids, key: Key) -> tuple[int, int]:
    """(pitched notes outside `key`, pitched notes) among the notes the ids `new_ids` write."""
    base = tok.base_ids(np.asarray(new_ids, np.int64))
    pitch = pitch_of_base(tok)[base]
    pitch = pitch[pitch >= 0]
    return int((~key.in_key[pitch % 12]).sum()), int(len(pitch))
