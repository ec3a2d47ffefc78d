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
SHARED_MIDI = ROOT.parent / "shared" / "midi"  # more real files, where a checkout has them beside it


@functools.cache
def shared_midi_dir(sub: str = "dev") -> Path:
    """One folder with every real MIDI file of `sub` ("dev" or "broken"): tests/data/<sub>, plus
    ../shared/midi/<sub> where present (then a session-wide temporary folder of copies, deduplicated by content)."""
    extra = SHARED_MIDI / sub
    if not extra.is_dir():
        return TEST_MIDI / sub
    union = Path(tempfile.mkdtemp(prefix=f"midistral-test-midi-{sub}-"))
    atexit.register(shutil.rmtree, union, True)
    seen = set()
    for f in sorted(TEST_MIDI.joinpath(sub).glob("*.mid*")) + sorted(extra.glob("*.mid*")):
        digest = hashlib.sha256(f.read_bytes()).digest()
        if digest not in seen:
            seen.add(digest)
            assert not (union / f.name).exists(), f"two different files named {f.name} in tests/data and {extra}"
            shutil.copy(f, union / f.name)
    return union


@pytest.fixture(scope="session")
def dev_midi_files() -> list[Path]:
    return sorted(shared_midi_dir("dev").glob("*.mid*"))


@pytest.fixture(scope="session")
def broken_midi_files() -> list[Path]:
    return sorted(shared_midi_dir("broken").glob("*.mid*"))
