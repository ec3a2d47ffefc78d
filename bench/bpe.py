"""BPE, ours vs MidiTok 3.1, in one process: training time, encode files/s (MIDI file -> BPE ids),
identical vocab/merges/ids, compression ratio.

    python bench/bpe.py [--vocab 5000] [--chorales 50] [--dir PATH (a folder of MIDI files; default: tests/data/dev)]
"""

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

warnings.simplefilter("ignore")

import miditok  # noqa: E402

from midistral.data.chorales import chorale_midis  # noqa: E402
from midistral.errors import MidiError  # noqa: E402
from midistral.tokenize import DEFAULT_PARAMS, REMI, REMIConfig  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "dev"))
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--chorales", type=int, default=50)
    args = ap.parse_args()
    ours = REMI(REMIConfig(**DEFAULT_PARAMS))
    files = [f for f in sorted(Path(args.dir).glob("*.mid*")) if _ok(ours, f)]
    chorales, _ = chorale_midis(Path(tempfile.gettempdir()) / "midistral-bench-chorales", args.chorales)
    train = files[::2] + chorales[: len(chorales) // 2]
    test = files[1::2] + chorales[len(chorales) // 2:]
    mt = miditok.REMI(miditok.TokenizerConfig(**DEFAULT_PARAMS))

    t = time.perf_counter()
    mt.train(vocab_size=args.vocab, model="BPE", files_paths=list(train))
    t_mt = time.perf_counter() - t
    t = time.perf_counter()
    ours.train_bpe(train, args.vocab)
    t_us = time.perf_counter() - t
    a, b = json.loads(mt._model.to_str())["model"], json.loads(ours.bpe.hf.to_str())["model"]
    print(f"train on {len(train)} files to {args.vocab}: MidiTok {t_mt:.2f}s, ours {t_us:.2f}s (x{t_mt / t_us:.1f}); "
          f"identical vocab {a['vocab'] == b['vocab']}, merges {a['merges'] == b['merges']}")

    t = time.perf_counter()
    ids_mt = [mt.encode(f).ids for f in test]
    e_mt = time.perf_counter() - t
    t = time.perf_counter()
    ids_us = [ours.encode(f) for f in test]
    e_us = time.perf_counter() - t
    t = time.perf_counter()
    many = ours.encode_many(test)
    e_many = time.perf_counter() - t
    same = all(x == y.tolist() for x, y in zip(ids_mt, ids_us)) and all(r.ids.tolist() == y.tolist() for r, y in zip(many, ids_us))
    base = sum(len(ours.encode_base(f)) for f in test)
    bpe_n = sum(len(i) for i in ids_us)
    print(f"encode {len(test)} files: MidiTok {len(test) / e_mt:.1f} files/s, ours {len(test) / e_us:.1f} files/s "
          f"(x{e_mt / e_us:.1f}), ours encode_many {len(test) / e_many:.1f} files/s (x{e_mt / e_many:.1f}); identical ids {same}")
    print(f"compression base/BPE: {base / bpe_n:.2f} (ours) {base / sum(len(i) for i in ids_mt):.2f} (MidiTok)")


def _ok(tok, f):
    try:
        tok.encode(f)
        return True
    except MidiError:
        return False


if __name__ == "__main__":
    main()
