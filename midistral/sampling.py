"""Sampling settings, in one place: their defaults, their checks, their help text.

    from midistral.sampling import SamplingConfig
    config = SamplingConfig(temperature=0.9, top_k=20)       # a bad value: one ConfigError line naming it
    sampler.sample("song.mid", config, num_samples=4, seed=0)

The names are transformers' `generate()` names. `generate`, `controls.accompany`, `Sampler`, `sample.py`
(its flags are built from these fields), the `[sample]` section of a run config and the studio all take
their defaults from here. What is asked per call (the prompt, how many samples, the seed, a length in
bars, instruments) stays an argument of that call.

The defaults were measured on the chorale model against its test split: temperature 0.7 / top-k 12 score
mean OA 0.79, the narrower 0.5 / 6 score 0.75 (bench/RESULTS.md). Imports no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from midistral.errors import ConfigError
from midistral.fields import Bool, FieldError, Float, Int, check_fields, from_dict, refuse_unknown, setting

DEFAULT_MAX_NEW_TOKENS = 1024
# with a length in bars, new tokens at most per bar: a bound far above real music's (about 40 a bar for four
# voices, 100-200 for a quartet or piano texture), so only a model that never closes a bar meets it
TOKENS_PER_BAR = 256
# EOS masked before this many tokens without a prompt and a length in bars: no 2-5-bar pieces (the shortest
# chorale is 134 tokens); mean OA 0.82 against 0.80 without.
MIN_NEW_FROM_SCRATCH = 128


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn: the logits processors (transformers' order: n-gram ban, temperature, top-k,
    top-p), the length, and the token grammar mask."""

    temperature: float = setting(0.7, Float(0), "softmax temperature; 0 = greedy")
    top_k: int = setting(12, Int(0), "draw among the k most likely tokens; 0 = off", metavar="K")
    top_p: float | None = setting(None, Float(0, 1, open_lo=True, unset=True),
                                  "draw among the fewest tokens whose probability reaches P (default: off)",
                                  metavar="P")
    no_repeat_ngram_size: int = setting(6, Int(0), "never repeat an n-gram of this many tokens; 0 = off")
    max_new_tokens: int | None = setting(
        None, Int(1, unset=True),
        f"new tokens at most (default: {DEFAULT_MAX_NEW_TOKENS}; with --bars, as many as the context holds)")
    min_new_tokens: int | None = setting(
        None, Int(0, unset=True),
        f"EOS is masked before this many new tokens (default: {MIN_NEW_FROM_SCRATCH} from scratch without "
        "--bars, else 0)")
    grammar: bool = setting(True, Bool(), "mask tokens that would break the token grammar",
                            off_help="do not mask tokens that break the token grammar")

    def __post_init__(self):
        check_fields(self)
        if self.min_new_tokens is not None and self.max_new_tokens is not None \
                and self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"min_new_tokens={self.min_new_tokens} > max_new_tokens={self.max_new_tokens}: "
                              "expected min_new_tokens <= max_new_tokens")

    @classmethod
    def from_dict(cls, d: dict, source: str = "sampling settings", where: str = ""):
        """From a TOML table or JSON object: unknown keys refused with a "did you mean", values checked."""
        return from_dict(cls, d, source, where)

    def replace(self, **changes) -> "SamplingConfig":
        """A copy with `changes` (checked; an unknown name is refused with a "did you mean")."""
        refuse_unknown(type(self), changes, "sampling settings")
        return dataclasses.replace(self, **changes)

    def max_new(self, bars: int | None = None) -> int:
        """New tokens asked for: as set, else the default; with a length in bars, a bound of TOKENS_PER_BAR a bar
        (the bars end the piece; the bound stops a model that never closes a bar from filling its context)."""
        if self.max_new_tokens is None:
            return DEFAULT_MAX_NEW_TOKENS if bars is None else TOKENS_PER_BAR * int(bars) + 64
        return self.max_new_tokens

    def min_new(self, from_scratch: bool) -> int:
        """EOS masked before this many tokens: as set, else MIN_NEW_FROM_SCRATCH from scratch (no prompt, no bars)."""
        if self.min_new_tokens is None:
            return MIN_NEW_FROM_SCRATCH if from_scratch else 0
        return self.min_new_tokens


@dataclass(frozen=True)
class RejectionLimits:
    """With rejection on, a sample over any of these thresholds is generated again with another seed."""

    reject_tries: int = setting(4, Int(1), "generations per sample at most, the first included")
    max_silent_share: float = setting(0.25, Float(0, 1), "share of bars in which a prompt instrument is silent")
    max_loop_score: float = setting(0.5, Float(0, 1), "share of bars that repeat one of the previous two")
    max_out_of_key: float = setting(0.15, Float(0, 1), "share of pitched notes outside the key")
    max_copied_run: int = setting(4, Int(1), "bars in a row equal to bars of one training piece (when its data is "
                                  "at hand; metrics.MAX_COPIED_RUN)")

    def __post_init__(self):
        check_fields(self)


SAMPLING = SamplingConfig()  # the defaults, for signatures


# What is asked per call beside a SamplingConfig (Sampler.sample / accompany, sample.py's flags): its checks.
CALL_CHECKS = {"num_samples": Int(1), "seed": Int(0, 2**63 - 1, unset=True), "bars": Int(1, unset=True),
               "prompt_bars": Int(1, unset=True)}


def check_call(**values) -> None:
    """A FieldError naming the first per-call argument (num_samples, seed, bars, prompt_bars) out of range."""
    for name, value in values.items():
        why = CALL_CHECKS[name].expected(value)
        if why is not None:
            raise FieldError(name, value, why)
