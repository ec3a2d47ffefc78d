"""The studio against sample.py: time from pressing Generate to the variations on the page, against the
time sample.py needs for the same request; optionally a screenshot of the page with its results.

    python bench/studio.py --ckpt runs/chorales [--prompt song.mid] [--screenshot docs/studio.png]

Runs alternate (sample.py, studio, sample.py, ...) so that both see the same machine load. sample.py
is timed twice: its wall-clock time (what a user waits for: start, load, generate, write MIDI and
PNG), and its own "generated ... in X s" line (the generation alone). The studio's time is measured in
the browser from the click: to the variations shown (quality line, audio player, download), and to
their piano rolls drawn (in the page, from each variation's notes). Needs /usr/bin/chromium and Playwright.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", default=None, help="MIDI prompt (default: from nothing)")
    p.add_argument("--bars", type=int, default=4, help="the length, when the studio asks for bars")
    p.add_argument("--tokens", type=int, default=256, help="the length, when it asks for tokens (no controls)")
    p.add_argument("--variations", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--screenshot", default=None, help="write a PNG of the page after the last run")
    return p.parse_args()


def length_flags(args) -> list[str]:
    return ["--bars", str(args.bars)] if args.unit == "bars" else ["--max-new-tokens", str(args.tokens)]


def time_sample_py(args, out: Path) -> tuple[float, float]:
    cmd = [sys.executable, str(ROOT / "sample.py"), *([args.prompt] if args.prompt else []), "--ckpt", args.ckpt,
           "--out", str(out), "--num-samples", str(args.variations), *length_flags(args),
           "--seed", str(args.seed)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"sample.py failed: {r.stderr.strip().splitlines()[-1]}")
    generated = [float(m) for m in re.findall(r"generated .* in ([\d.]+)s", r.stderr)]
    return wall, sum(generated)


def start_studio(ckpt: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "midistral.studio", "--ckpt", ckpt, "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    url = re.search(r"http://\S+/", proc.stdout.readline())
    if url is None:
        proc.terminate()
        sys.exit("the studio printed no URL")
    return proc, url.group(0)


def press_generate(page, args) -> tuple[float, float]:
    """Seconds from the click to the variations on the page, and to their piano rolls loaded."""
    mode = "continue" if args.prompt else "generate"
    page.click(f"#mode-buttons button[data-mode={mode}]")
    if args.prompt:
        page.set_input_files("#prompt-file", args.prompt)
        page.wait_for_function("() => document.getElementById('prompt-info').textContent.includes('bars')")
    length = args.bars if args.unit == "bars" else args.tokens
    for selector, value in (("#variations", args.variations), ("#length", length), ("#seed", args.seed)):
        page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                              str(value))
    page.evaluate("document.getElementById('results').replaceChildren()")
    t0 = time.perf_counter()
    page.click("#generate")
    page.wait_for_function(f"() => document.querySelectorAll('#results .variation').length === {args.variations}",
                           polling=20)
    shown = time.perf_counter() - t0
    page.wait_for_function("() => [...document.querySelectorAll('#results canvas.roll')].every(c => "
                           "c.dataset.drawn === '1')", polling=20)
    return shown, time.perf_counter() - t0


def main() -> None:
    from playwright.sync_api import sync_playwright

    args = parse_args()
    if args.prompt:
        args.prompt = str(Path(args.prompt).resolve())
    proc, url = start_studio(args.ckpt)
    rows = []
    try:
        with sync_playwright() as p, tempfile.TemporaryDirectory() as tmp:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(1_800_000)
            page.goto(url)
            page.wait_for_selector("#mode-buttons button")
            args.unit = page.evaluate("fetch('/api/info').then(r => r.json()).then(i => i.length_unit)")
            print(f"length: {args.bars if args.unit == 'bars' else args.tokens} {args.unit}", flush=True)
            for i in range(args.repeats):
                wall, gen = time_sample_py(args, Path(tmp) / str(i))
                shown, rolls = press_generate(page, args)
                rows.append((wall, gen, shown, rolls))
                print(f"run {i}: sample.py {wall:.2f}s (generation {gen:.2f}s)  studio: variations shown "
                      f"{shown:.2f}s, piano rolls {rolls:.2f}s", flush=True)
            if args.screenshot:  # with the audio players loaded
                page.wait_for_function("() => [...document.querySelectorAll('#results audio')].every(a => a.duration > 0)")
                page.screenshot(path=args.screenshot, full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait()
    wall, gen, shown, rolls = (statistics.median(c) for c in zip(*rows))
    print(f"median of {len(rows)}: sample.py {wall:.2f}s (its generation {gen:.2f}s); studio: variations shown "
          f"{shown:.2f}s, piano rolls loaded {rolls:.2f}s. Ratios to sample.py: {shown / wall:.2f} (shown), "
          f"{rolls / wall:.2f} (rolls); to its generation alone: {shown / gen:.2f}, {rolls / gen:.2f}")

if __name__ == "__main__":
    main()
