"""Tokenizer speed, ours vs MidiTok 3.1, in one process; checks identical tokens.

    python bench/tokenizer.py [--dir tests/data/dev] [--dir MORE ...] [--repeat 3]

Also times symusic's parse alone (MIDI bytes -> Score), the floor under both encoders.

(Not bench/tokenize.py: run as a script, that name would shadow the standard-library tokenize module.)
"""

import argparse
import time
import warnings
from pathlib import Path

warnings.simplefilter("ignore")

import miditok  # noqa: E402
import symusic  # noqa: E402

from midistral.errors import MidiError  # noqa: E402
from midistral.tokenize import DEFAULT_PARAMS, REMI, REMIConfig  # noqa: E402


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", action="append", help="a folder of MIDI files (repeatable); default tests/data/dev")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dirs = args.dir or [str(Path(__file__).resolve().parents[1] / "tests" / "data" / "dev")]
    files = sorted(f for d in dirs for f in Path(d).glob("*.mid*"))
    ours, mt = REMI(REMIConfig(**DEFAULT_PARAMS)), miditok.REMI(miditok.TokenizerConfig(**DEFAULT_PARAMS))
    files = [f for f in files if _ok(ours, f)]
    t_mt, seqs_mt = best(lambda: [mt.encode(f) for f in files], args.repeat)
    t_us, ids_us = best(lambda: [ours.encode(f) for f in files], args.repeat)
    same = all(s.tokens == ours.tokens(f) for s, f in zip(seqs_mt, files))
    n_tok = sum(len(i) for i in ids_us)
    data = [f.read_bytes() for f in files]
    t_parse, _ = best(lambda: [symusic.Score.from_midi(b) for b in data], args.repeat)
    d_mt, _ = best(lambda: [mt.decode(s) for s in seqs_mt], args.repeat)
    d_us, _ = best(lambda: [ours.decode(i) for i in ids_us], args.repeat)
    print(f"{len(files)} files, {n_tok:,} tokens; identical tokens: {same}")
    print(f"encode  MidiTok {len(files) / t_mt:8.1f} files/s {n_tok / t_mt:12,.0f} tok/s | ours {len(files) / t_us:8.1f} files/s "
          f"{n_tok / t_us:12,.0f} tok/s | x{t_mt / t_us:.1f}")
    print(f"symusic parse alone {len(files) / t_parse:8.1f} files/s | x{t_mt / t_parse:.1f} MidiTok's encode")
    print(f"decode  MidiTok {len(files) / d_mt:8.1f} files/s {n_tok / d_mt:12,.0f} tok/s | ours {len(files) / d_us:8.1f} files/s "
          f"{n_tok / d_us:12,.0f} tok/s | x{d_mt / d_us:.1f}")


def _ok(tok, f):
    try:
        tok.encode(f)
        return True
    except MidiError:  # the one file without notes
        return False


if __name__ == "__main__":
    main()
