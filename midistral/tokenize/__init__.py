"""REMIPlus tokenizer: remi.py (vocabulary, encode, decode), family.py (token families), preprocess.py
(a Score made ready for the encoder), decode.py (ids back to a Score), clock.py (the bar clock), midi_io.py
(reading MIDI), config.py, bpe.py (the BPE model), training.py (BPE training), parallel.py (many files at
once), miditok_json.py (MidiTok's JSON files) and grammar.py (what may come next: the constraint for sampling).

    tok = REMI(REMIConfig(**TOKENIZER_PARAMS))
    tok.tokens("song.mid")   # ['Bar_None', 'TimeSig_4/4', 'Position_0', 'Tempo_121.29', ...]
    ids = tok.encode("song.mid"); score = tok.decode(ids)
"""

from midistral.tokenize.config import CHORD_MAPS, DEFAULT_PARAMS, REPORT_PARAMS, REMIConfig
from midistral.general_midi import GM_NAMES
from midistral.tokenize.midi_io import load_score
from midistral.tokenize.remi import REMI

__all__ = ["REMI", "REMIConfig", "REPORT_PARAMS", "DEFAULT_PARAMS", "load_score", "GM_NAMES", "CHORD_MAPS"]
