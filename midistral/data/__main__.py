"""python -m midistral.data prepare|stats --config CFG [section.key=value ...]"""

import argparse
import sys

from midistral.errors import MidistralError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m midistral.data", description=__doc__)
    ap.add_argument("command", choices=["prepare", "stats"])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_intermixed_args(argv)
    try:
        from midistral.config import load_config
        from midistral.data.prepare import prepare, prepared_dir

        cfg = load_config(args.config, args.overrides)
        if args.command == "prepare":
            prepare(cfg)
        else:
            from midistral.data.stats import stats

            folder = prepared_dir(cfg)
            if not (folder / "manifest.json").is_file():
                prepare(cfg)
            stats(folder)
    except MidistralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
