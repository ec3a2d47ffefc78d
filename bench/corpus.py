"""The music21 corpus in the conversion cache: how much is converted, pieces and base tokens per style, the
skip report by kind, and the conversion's pace (from the records' times). Reads the cache only: it converts
nothing, so it can run while `python -m midistral.data prepare --config configs/music21.toml` does.

    python bench/corpus.py [--cache DIR] [--tokens]
"""

import argparse
import time
from pathlib import Path

from midistral.config import load_config
from midistral.data.music21_corpus import STYLES, _cached_record, default_cache_dir, list_sources, style_of
from midistral.data.prepare import _quiet_config, skip_summary
from midistral.errors import MidistralError
from midistral.tokenize import REMI


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=str(default_cache_dir()))
    ap.add_argument("--tokens", action="store_true", help="also count base tokens (configs/music21.toml's tokenizer)")
    args = ap.parse_args()
    cache = Path(args.cache)
    sources, skipped = list_sources()
    rows = {s: {"sources": 0, "converted": 0, "pieces": 0, "tokens": 0, "files": []} for s in STYLES}
    times = []
    for rel in sources:
        row = rows[style_of(rel)]
        row["sources"] += 1
        rec = _cached_record(cache, rel)
        if rec is None:
            continue
        row["converted"] += 1
        row["pieces"] += len(rec["pieces"])
        row["files"] += [cache / p["midi"] for p in rec["pieces"]]
        skipped += rec["skipped"]
        times.append((cache / (rel + ".json")).stat().st_mtime)
    if args.tokens:
        tok = REMI(_quiet_config(load_config(Path(__file__).parents[1] / "configs" / "music21.toml").tokenizer_params))
        t0 = time.perf_counter()
        n = 0
        for row in rows.values():
            for f in row["files"]:
                try:
                    row["tokens"] += sum(len(b) for b in tok.base_ids_by_bar(f))
                    n += 1
                except MidistralError:
                    continue
        print(f"tokenized {n} pieces in {time.perf_counter() - t0:.0f} s")
    print("| style | source files | converted | pieces | base tokens |")
    print("|---|---|---|---|---|")
    for style, r in rows.items():
        print(f"| {style} | {r['sources']} | {r['converted']} | {r['pieces']} | {r['tokens'] if args.tokens else '-'} |")
    if len(times) > 1:
        print(f"last {len(times)} records written over {(max(times) - min(times)) / 60:.1f} min")
    for kind, n in skip_summary(skipped):
        print(f"skipped {n}: {kind}")


if __name__ == "__main__":
    main()
