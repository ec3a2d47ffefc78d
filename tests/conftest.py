import atexit
import functools
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Triton kernels run under the interpreter on CPU tensors; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py and sample.py live at the root, beside the package
TEST_MIDI = ROOT / "tests" / "data"  # the corpus every clone has (licences in tests/data/NOTICE)
# More real files, optional: a folder named by MIDISTRAL_TEST_MIDI with dev/, broken/ and MANIFEST.tsv laid out as
# tests/data is. The tests never require it.
SHARED_MIDI = Path(os.environ["MIDISTRAL_TEST_MIDI"]) if os.environ.get("MIDISTRAL_TEST_MIDI") else None


@functools.cache
def _merged_midi_dir() -> Path:
    """tests/data and $MIDISTRAL_TEST_MIDI merged into a session-wide temporary folder (copies, deduplicated by content)."""
    root = Path(tempfile.mkdtemp(prefix="midistral-test-midi-"))
    atexit.register(shutil.rmtree, root, True)
    for sub in ("dev", "broken"):
        (root / sub).mkdir()
        seen = set()
        for f in sorted(TEST_MIDI.joinpath(sub).glob("*.mid*")) + sorted(SHARED_MIDI.joinpath(sub).glob("*.mid*")):
            digest = hashlib.sha256(f.read_bytes()).digest()
            if digest not in seen:
                seen.add(digest)
                assert not (root / sub / f.name).exists(), f"two different files named {f.name}"
                shutil.copy(f, root / sub / f.name)
    # the statistics of every file (MANIFEST.tsv: tracks, notes, meters, drums, ...) that tests pick files by
    shared_rows = SHARED_MIDI.joinpath("MANIFEST.tsv").read_text().splitlines(True)
    own_rows = TEST_MIDI.joinpath("MANIFEST.tsv").read_text().splitlines(True)
    rows = dict.fromkeys(shared_rows[1:] + own_rows[1:])
    root.joinpath("MANIFEST.tsv").write_text("".join([own_rows[0], *rows]))
    return root


def shared_midi_dir(sub: str = "dev") -> Path:
    """The folder of real MIDI files of `sub` ("dev" or "broken"): tests/data/<sub> on a fresh clone; with
    MIDISTRAL_TEST_MIDI naming a folder, tests/data and that folder merged ("dev" and "broken" stay siblings)."""
    return _merged_midi_dir() / sub if SHARED_MIDI is not None and SHARED_MIDI.is_dir() else TEST_MIDI / sub


@pytest.fixture(scope="session")
def dev_midi_files() -> list[Path]:
    return sorted(shared_midi_dir("dev").glob("*.mid*"))


@pytest.fixture(scope="session")
def broken_midi_files() -> list[Path]:
    return sorted(shared_midi_dir("broken").glob("*.mid*"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder (best/) with a random tiny model and the default tokenizer: what sample.py, the sampler and
    the studio load in their tests."""
    import torch

    from midistral.checkpoint import save_checkpoint
    from midistral.model import ModelConfig, Transformer
    from midistral.tokenize import REMI

    torch.manual_seed(0)
    tok = REMI()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                      max_position_embeddings=256)
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(d / "best", Transformer(cfg), tok)
    return d


def score_of(tracks, ts=(4, 4), tpq=480):
    """A Score from {(program, is_drum): [(time, duration, pitch), ...]}."""
    import symusic

    s = symusic.Score(tpq)
    s.time_signatures.append(symusic.TimeSignature(0, *ts))
    for (program, is_drum), notes in tracks.items():
        t = symusic.Track("", program, is_drum)
        for time, dur, pitch in notes:
            t.notes.append(symusic.Note(time, dur, pitch, 80))
        s.tracks.append(t)
    return s


@pytest.fixture(scope="session")
def extra_tok(dev_midi_files):
    """BPE (1000, on 16 real files) and the extra tokens (fill-in-the-middle, style, attribute controls), as a
    trained default has; shared, so never change it in a test."""
    from midistral.tokenize import REMI
    from midistral.tokenize.extra import ExtraVocab

    t = REMI()
    t.train_bpe(dev_midi_files[:16], 1000, workers=1)
    t.extra = ExtraVocab(len(t), styles=["bach"])
    return t
