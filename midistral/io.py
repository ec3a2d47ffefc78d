"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

A crash (or Ctrl-C) mid-write leaves the previous file intact, never a half-written one.
Every file midistral writes (configs, tokenizers, checkpoints, metrics snapshots, MIDI, PNG) goes
through here. Also the run-folder lock (`RunLock`): one training per folder.

Nothing here imports torch at import time (the tokenizer writes through this module and must stay
torch-free); `save_tensors` imports safetensors' torch half when it is called.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from midistral.errors import CheckpointError, MidistralError


def fix_mode(path: str | os.PathLike, full: int = 0o666) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the permissions open() would: `full` minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, full & ~umask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
        fix_mode(tmp)  # after the writer: some (safetensors) replace the file and keep mkstemp's 0600
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temps(folder: str | os.PathLike) -> None:
    """Remove the temporary files and staging folders (.NAME.*.tmp) a killed writer left in `folder`.
    Call it only while holding the folder's lock: a live writer's temporaries look the same."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a dict of torch tensors as safetensors, atomically."""
    from safetensors.torch import save_file  # here, not at the top: importing torch costs about a second

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_tokenizer_json(path: Path) -> dict:
    """A tokenizer file's JSON object, or a CheckpointError naming the file and what is wrong."""
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such tokenizer file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a JSON tokenizer file ({e.__class__.__name__})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a tokenizer file (expected a JSON object)")
    return d


class RunLock:
    """An exclusive lock on a folder while a process writes to it (`with RunLock(run): ...`).

    The lock is an flock on FOLDER/.lock, which the kernel releases when the process dies, even by kill -9:
    a lock left by a killed run is simply taken over. The file names the holder (host and pid) for the
    message a second process gets. With `wait=True` the second process waits instead of being refused.
    """
    def __init__(self, folder: str | os.PathLike, wait: bool = False, what: str = "a training"):
        self.folder, self.wait, self.what = Path(folder), wait, what
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise MidistralError(f"{self.folder}: cannot create the folder's lock ({e.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(self.fd)
                raise MidistralError(f"{self.folder}: cannot lock the folder ({e.strerror})") from None
            if not self.wait:
                os.close(self.fd)
                raise CheckpointError(f"{self.folder}: locked by {self.what} still running ({holder}); "
                                      "wait for it to finish or use another out_dir") from None
            print(f"note: {self.folder} is locked by {self.what} ({holder}); waiting for it", file=sys.stderr)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing releases the flock; the file stays (removing it would race a waiter)
