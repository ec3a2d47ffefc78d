"""`python -m midistral.tokenize FILE...`: print each file's tokens, or a one-line error; exit 1 if any failed."""

import sys
import warnings

from midistral.errors import ArgumentParser, MidistralError
from midistral.tokenize import REMI, REMIConfig, REPORT_PARAMS


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m midistral.tokenize", description=__doc__)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--tokenizer", help="a tokenizer JSON (ours or MidiTok's); default: midistral's default config")
    ap.add_argument("--report-config", action="store_true", help="the reference setup's config (numbered Bar_<n> tokens)")
    ap.add_argument("--ids", action="store_true", help="print ids (BPE ids if trained) instead of token strings")
    args = ap.parse_args(argv)
    try:
        if args.tokenizer:
            tok = REMI.load(args.tokenizer)
        elif args.report_config:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tok = REMI(REMIConfig(**REPORT_PARAMS))
        else:
            tok = REMI()
    except MidistralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failed = 0
    for f in args.files:
        try:
            out = tok.encode(f).tolist() if args.ids else tok.tokens(f)
        except MidistralError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{f}\t{' '.join(map(str, out))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
