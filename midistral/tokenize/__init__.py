"""REMIPlus tokenizer (remi.py: vocabulary and token grammar), its config, and BPE (bpe.py).

    tok = REMI(REMIConfig(**TOKENIZER_PARAMS))
    tok.tokens("song.mid")   # ['Bar_None', 'TimeSig_4/4', 'Position_0', 'Tempo_121.29', ...]
    ids = tok.encode("song.mid"); score = tok.decode(ids)
"""

from midistral.tokenize.config import CHORD_MAPS, DEFAULT_PARAMS, REPORT_PARAMS, REMIConfig
from midistral.tokenize.remi import GM_NAMES, REMI, load_score

__all__ = ["REMI", "REMIConfig", "REPORT_PARAMS", "DEFAULT_PARAMS", "load_score", "GM_NAMES", "CHORD_MAPS"]
