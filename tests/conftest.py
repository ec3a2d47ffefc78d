import os
import sys

# Triton kernels run under the interpreter on CPU tensors; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py and sample.py live at the root, beside the package
SHARED_MIDI = ROOT.parent / "shared" / "midi"


def shared_midi_dir(sub: str = "dev") -> Path:
    """The folder of real MIDI files (../shared/midi/<sub>), or skip the test with a reason."""
    d = SHARED_MIDI / sub
    if not d.is_dir():
        pytest.skip(f"{d} is absent (a fresh clone without ../shared/midi): real-file tests skipped")
    return d


@pytest.fixture(scope="session")
def dev_midi_files() -> list[Path]:
    return sorted(shared_midi_dir("dev").glob("*.mid*"))


@pytest.fixture(scope="session")
def broken_midi_files() -> list[Path]:
    return sorted(shared_midi_dir("broken").glob("*.mid*"))
