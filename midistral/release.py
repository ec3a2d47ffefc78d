"""Ship a trained run as a self-contained model folder: the shipped default (models/default) is made this way.

    python -m midistral.release runs/music21 [--out midistral/models/default] [--dtype fp16]

The folder holds what sampling needs and nothing of training: model.safetensors (fp16 by default: half the
bytes, and every decode precision is made from it as from fp32, so sampling loses nothing measurable),
config.json, tokenizer.json, and manifest.json: the programs of the training split (the instruments the
model knows, for the unknown-instrument note), its styles, and where the weights came from (run, step,
validation loss, the config). MODEL_CARD.md beside them is written by hand from the measurements. The folder
is staged and swapped in whole; a MODEL_CARD.md already there is kept, and so are the styles' default
controls of the manifest there ("style_defaults", chosen by measurement for the model: docs/sampling.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from midistral.checkpoint import DEFAULT_MODEL, load_model_and_tokenizer, resolve_checkpoint, save_checkpoint
from midistral.controls.instruments import data_folder, known_programs
from midistral.errors import ArgumentParser, MidistralError
from midistral.io import atomic_write_json

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CARD = "MODEL_CARD.md"


def release(run: str | Path, out: str | Path = DEFAULT_MODEL, dtype: str = "fp16") -> Path:
    """Write the model folder `out` from the run (or checkpoint) folder `run`; returns `out`."""
    ckpt = resolve_checkpoint(run)
    model, tok = load_model_and_tokenizer(ckpt)
    programs = known_programs(run, tok)
    if programs is None:
        raise MidistralError(f"{run}: its prepared data (manifest.json) is not here: the instruments it knows "
                             "cannot be listed")
    origin = {"run": str(run), "checkpoint": ckpt.name, "dtype": dtype}
    for name in ("best.json",):
        if (ckpt / name).is_file():
            origin.update(json.loads((ckpt / name).read_text()))
    cfg_file = Path(run) / "last" / "train_config.json"
    data_manifest = json.loads((data_folder(Path(run)) / "manifest.json").read_text())
    counts = data_manifest.get("programs") or {str(p): 1 for p in programs}  # program -> training files
    manifest = {"programs": {str(p): int(counts.get(str(p), 1)) for p in sorted(programs)},
                "styles": list(tok.extra.styles) if tok.extra is not None else [],
                "origin": origin,
                "train_config": json.loads(cfg_file.read_text()) if cfg_file.is_file() else None}
    out = Path(out)
    card = (out / CARD).read_bytes() if (out / CARD).is_file() else None
    try:  # the styles' default controls were chosen for the model by measurement: a new release keeps them
        manifest["style_defaults"] = json.loads((out / "manifest.json").read_text())["style_defaults"]
    except (OSError, ValueError, KeyError, TypeError):
        pass

    def extra(d: Path) -> None:
        atomic_write_json(d / "manifest.json", manifest)
        if card is not None:
            (d / CARD).write_bytes(card)

    save_checkpoint(out, model.to(DTYPES[dtype]), tok, extra=extra)
    return out


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m midistral.release", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run folder (best/, else last/) or checkpoint folder")
    p.add_argument("--out", default=str(DEFAULT_MODEL), help="the model folder to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="how the weights are stored")
    args = p.parse_args(argv)
    try:
        out = release(args.run, args.out, args.dtype)
    except MidistralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MB ({', '.join(sorted(f.name for f in out.iterdir()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
