"""python -m midistral.data prepare|stats --config CFG [section.key=value ...]"""

import sys

from midistral.config import load_config
from midistral.data.prepare import prepare
from midistral.data.stats import stats
from midistral.errors import ArgumentParser, MidistralError


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m midistral.data", description=__doc__)
    ap.add_argument("command", choices=["prepare", "stats"])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="section.key=value, anywhere on the line")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        folder = prepare(cfg)  # reuses a folder prepared with the same config
        if args.command == "stats":
            stats(folder)
    except MidistralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
