"""Controls for generation: which instruments play, how many bars, and adding a track to a piece.

    programs = parse_programs("piano,bass,drums")              # [0, 33, -1]
    cons = [ProgramsConstraint(tok, programs), BarsConstraint(tok, 8)]
    ids = generate(model, prompt, max_new_tokens=bars_token_budget(model, prompt.shape[1]),
                   eos_id=tok.eos_id, constraints=cons)           # stops at the bar line after 8 new bars
    score = accompany(model, tok, "song.mid", program=33)       # song.mid unchanged + a new bass track

- instruments.py: instrument names (the General MIDI table in midistral.general_midi) and the instruments
  a trained model knows (`known_programs`, `unknown_instruments_note`);
- constraints.py: `ProgramsConstraint` and `BarsConstraint`, constraints for midistral.generate (start /
  mask / push) on BPE ids, on the tokenizer's bar clock (midistral.tokenize.clock);
- accompany.py: `accompany`, the walk that writes a new track between a piece's own notes, reading the
  model through feeder.py (one rolling KV cache, speculative drafts rolled back with its snapshots);
- key.py, attributes.py: `KeyConstraint` (new notes only in a key) and `Steering` (key, note density and
  onset polyphony for one call, with the requested-vs-achieved report);
- gaps.py: `GaplessConstraint` (no beat in which every instrument is silent, once the music has started);
- masks.py: the mask that gives way where it would leave a row nothing (the soft constraints share it);
- onsets.py: `OnsetConstraint` (at one onset an instrument starts ten notes at most, then moves on);
- styles.py: the styles' default controls a model folder may list (`read_style_defaults`);
- infill.py: `infill`, which regenerates bars A..B of a piece from one fill-in-the-middle prompt (prefix,
  suffix, then the middle), spliced back so every note outside the span is kept exactly.
"""

from midistral.controls.accompany import accompany, parse_bar_range
from midistral.controls.attributes import Steering
from midistral.controls.constraints import BarsConstraint, EveryBarConstraint, ProgramsConstraint, bars_token_budget, id_expansions
from midistral.controls.gaps import GaplessConstraint
from midistral.controls.onsets import OnsetConstraint
from midistral.controls.infill import (BarCount, InfillResult, check_infill_model, infill, infill_budget, infill_prompt,
                                       infill_report, splice)
from midistral.controls.styles import read_style_defaults, with_style_defaults
from midistral.controls.key import Key, KeyConstraint, parse_key
from midistral.controls.instruments import (GM_NAMES, SHORT_NAMES, known_programs, parse_program, parse_programs,
                                            program_name, unknown_instruments_note)

__all__ = ["BarCount", "BarsConstraint", "EveryBarConstraint", "GM_NAMES", "GaplessConstraint", "InfillResult",
           "Key", "KeyConstraint", "OnsetConstraint", "ProgramsConstraint", "SHORT_NAMES", "Steering", "accompany",
           "bars_token_budget", "check_infill_model", "id_expansions", "infill", "infill_budget", "infill_prompt",
           "infill_report", "known_programs", "parse_bar_range", "parse_key", "parse_program", "parse_programs",
           "program_name", "read_style_defaults", "splice", "unknown_instruments_note", "with_style_defaults"]
