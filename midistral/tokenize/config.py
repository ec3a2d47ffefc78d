"""REMIConfig: MidiTok 3.1's `TokenizerConfig` parameter names and defaults, for REMI with programs.

`REMIConfig(**TOKENIZER_PARAMS)` takes the reference setup's dict as is. Unknown names are refused with the
name (MidiTok silently stores them); the two extra keys the reference setup used are accepted:
`max_bar_embedding` (numbered Bar_0..Bar_{n-1} tokens) and `drum_pitch_range`, a misspelling of
`drums_pitch_range` that MidiTok ignores: we warn and ignore it too, so the vocabulary stays the same.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

from midistral.errors import ConfigError
from midistral.fields import suggestion

CHORD_MAPS = {  # MidiTok's names and dict order; offsets from the lowest note
    "min": (0, 3, 7), "maj": (0, 4, 7), "dim": (0, 3, 6), "aug": (0, 4, 8), "sus2": (0, 2, 7),
    "sus4": (0, 5, 7), "7dom": (0, 4, 7, 10), "7min": (0, 3, 7, 10), "7maj": (0, 4, 7, 11),
    "7halfdim": (0, 3, 6, 10), "7dim": (0, 3, 6, 9), "7aug": (0, 4, 8, 11), "9maj": (0, 4, 7, 10, 14),
    "9min": (0, 4, 7, 10, 13),
}

# The reference setup's TOKENIZER_PARAMS, verbatim (MidiTok names, including its two extra keys).
REPORT_PARAMS = {
    "pitch_range": (21, 109), "beat_res": {(0, 4): 12, (4, 12): 4}, "num_velocities": 32,
    "special_tokens": ["PAD", "BOS", "EOS", "MASK"], "use_chords": True, "use_rests": True, "use_tempos": True,
    "use_time_signatures": True, "use_programs": True, "num_tempos": 32, "tempo_range": (40, 250),
    "max_bar_embedding": 500, "drum_pitch_range": (0, 127),
}
# midistral's default: the reference setup with one Bar_None token (numbered bars add 500 tokens that carry
# no information the decoder needs, and cap pieces at 500 bars) and without the misspelled key.
DEFAULT_PARAMS = {k: v for k, v in REPORT_PARAMS.items() if k not in ("max_bar_embedding", "drum_pitch_range")}

# Parameters whose only supported value is MidiTok's default for REMI+ (one token stream for all programs).
_FIXED = {
    "use_velocities": True, "use_note_duration_programs": None, "use_sustain_pedals": False,
    "use_pitch_bends": False, "use_control_changes": False, "use_pitch_intervals": False,
    "use_key_signatures": False, "use_pitchdrum_tokens": True, "one_token_stream_for_programs": True,
    "program_changes": False, "chord_tokens_with_root_note": False, "chord_unknown": None,
    "delete_equal_successive_tempo_changes": False, "remove_duplicated_notes": False,
    "encode_ids_split": "bar", "use_bar_end_tokens": False, "add_trailing_bars": False, "log_tempos": False,
    "use_rests": True, "use_time_signatures": True, "use_programs": True,
}
# MidiTok parameters that have no effect on REMI+ tokens in this configuration: accepted and stored.
_INERT = {"sustain_pedal_duration", "pitch_bend_range", "delete_equal_successive_time_sig_changes",
          "default_note_duration", "ac_polyphony_track", "ac_pitch_class_bar", "ac_note_density_track",
          "ac_note_duration_bar", "ac_note_duration_track", "ac_repetition_track", "ac_polyphony_bar",
          "ac_note_density_bar", "ac_polyphony_min", "ac_polyphony_max", "ac_repetition_track_num_bins",
          "ac_repetition_track_num_consec_bars", "ac_note_density_bar_max", "ac_note_density_track_min",
          "ac_note_density_track_max", "pitch_intervals_max_time_dist", "max_pitch_interval",
          "num_pitch_intervals", "control_change_numbers", "control_change_n_bins"}


def _ranges(d) -> dict[tuple[int, int], int]:
    """beat_res-like dicts: {(0, 4): 12} or MidiTok's serialised {"0_4": 12}."""
    out = {}
    for k, v in dict(d).items():
        if isinstance(k, str):
            a, b = k.split("_")
            k = (int(a), int(b))
        out[(int(k[0]), int(k[1]))] = int(v)
    return out


@dataclass
class REMIConfig:
    pitch_range: tuple[int, int] = (21, 109)
    beat_res: dict = field(default_factory=lambda: {(0, 4): 8, (4, 12): 4})
    num_velocities: int = 32
    special_tokens: list = field(default_factory=lambda: ["PAD", "BOS", "EOS", "MASK"])
    use_chords: bool = False
    use_tempos: bool = False
    num_tempos: int = 32
    tempo_range: tuple[int, int] = (40, 250)
    beat_res_rest: dict = field(default_factory=lambda: {(0, 1): 8, (1, 2): 4, (2, 12): 2})
    chord_maps: dict = field(default_factory=lambda: dict(CHORD_MAPS))
    time_signature_range: dict = field(default_factory=lambda: {8: [3, 12, 6], 4: [5, 6, 3, 2, 1, 4]})
    programs: list = field(default_factory=lambda: list(range(-1, 128)))
    drums_pitch_range: tuple[int, int] = (27, 88)
    max_bar_embedding: int | None = None  # None: one Bar_None token; n: Bar_0 .. Bar_{n-1}
    extra: dict = field(default_factory=dict)  # accepted MidiTok keys without effect here, kept for saving

    def __init__(self, **params):
        known = {f.name for f in fields(self)} - {"extra"}
        for f in fields(self):
            setattr(self, f.name, f.default_factory() if callable(f.default_factory) else f.default)
        for key, value in params.items():
            if key == "drum_pitch_range":
                warnings.warn(
                    "REMIConfig: 'drum_pitch_range' is a misspelling of 'drums_pitch_range'; MidiTok 3.1 ignores it "
                    f"(drums keep {self.drums_pitch_range}), and so do we to keep the same vocabulary. "
                    "Use 'drums_pitch_range' to change the drum range.",
                    stacklevel=2,
                )
                self.extra[key] = value
            elif key in ("use_chords", "use_tempos"):
                setattr(self, key, bool(value))
            elif key in _FIXED:
                want = _FIXED[key]
                if want is not None and value != want:
                    raise ConfigError(f"tokenizer {key}={value!r} is not supported (midistral's REMI+ needs {want!r})")
                if key == "use_note_duration_programs" and value is not None and set(value) != set(range(-1, 128)):
                    raise ConfigError(f"tokenizer {key}: only all programs (-1..127) are supported")
            elif key in _INERT:
                self.extra[key] = value
            elif key in known:
                setattr(self, key, value)
            else:
                raise ConfigError(f"unknown tokenizer config key {key!r}{suggestion(key, known | set(_FIXED))}")
        self._normalise()

    def _normalise(self):
        self.pitch_range = (int(self.pitch_range[0]), int(self.pitch_range[1]))
        self.drums_pitch_range = (int(self.drums_pitch_range[0]), int(self.drums_pitch_range[1]))
        self.tempo_range = (float(self.tempo_range[0]), float(self.tempo_range[1]))
        self.beat_res = _ranges(self.beat_res)
        self.beat_res_rest = _ranges(self.beat_res_rest)
        self.time_signature_range = {int(k): [int(x) for x in v] for k, v in dict(self.time_signature_range).items()}
        self.chord_maps = {str(k): tuple(int(x) for x in v) for k, v in dict(self.chord_maps).items()}
        self.special_tokens = [str(t) for t in self.special_tokens]
        self.programs = list(self.programs)
        if self.max_bar_embedding is not None:
            self.max_bar_embedding = int(self.max_bar_embedding)
        if not 0 <= self.pitch_range[0] <= self.pitch_range[1] <= 127:
            raise ConfigError(f"tokenizer pitch_range={self.pitch_range} must lie within 0..127")
        for den in self.time_signature_range:
            if den not in (4, 8):
                raise ConfigError(f"tokenizer time_signature_range: denominator {den} is not supported (4 and 8 are)")

    @property
    def max_num_pos_per_beat(self) -> int:
        return max(self.beat_res.values())

    def to_dict(self) -> dict:
        """JSON-ready, in MidiTok's serialised spelling (beat_res keys "0_4")."""
        d = {
            "pitch_range": list(self.pitch_range),
            "beat_res": {f"{a}_{b}": r for (a, b), r in self.beat_res.items()},
            "num_velocities": self.num_velocities,
            "special_tokens": list(self.special_tokens),
            "use_chords": self.use_chords,
            "use_tempos": self.use_tempos,
            "num_tempos": self.num_tempos,
            "tempo_range": list(self.tempo_range),
            "beat_res_rest": {f"{a}_{b}": r for (a, b), r in self.beat_res_rest.items()},
            "chord_maps": {k: list(v) for k, v in self.chord_maps.items()},
            "time_signature_range": {str(k): v for k, v in self.time_signature_range.items()},
            "programs": list(self.programs),
            "drums_pitch_range": list(self.drums_pitch_range),
        }
        if self.max_bar_embedding is not None:
            d["max_bar_embedding"] = self.max_bar_embedding
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "REMIConfig":
        return cls(**d)

    @classmethod
    def from_miditok_dict(cls, d: dict) -> "REMIConfig":
        """The "config" dict of a tokenizer JSON saved by MidiTok 3.1 (`tokenizer.save`)."""
        d = dict(d)
        extra = d.pop("additional_params", {}) or {}
        params = {}
        for k, v in d.items():
            if k in ("special_tokens",):
                v = [str(t).removesuffix("_None") for t in v]
            if k == "time_signature_range":
                v = {int(a): b for a, b in v.items()}
            params[k] = v
        for k, v in extra.items():
            if k in ("use_bar_end_tokens", "add_trailing_bars"):
                continue
            params[k] = v
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**params)
