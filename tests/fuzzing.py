"""Byte mutations of MIDI files for the fuzz tests (tests/test_fuzz.py) and bench/fuzz.py.

Each mutated file gets one to three of: bit flips, random bytes, a truncation, an insertion, a deleted
span, a duplicated span, header damage (format, track count, division, a chunk length) and maximal
variable-length numbers (deltas of 2^28 ticks), data bytes changed to other data bytes. Half the cases mutate inside one track's events and then
mend the chunk lengths, so that the file still parses and the damage reaches the tokenizer instead of
stopping at the reader. All seeded: the same (data, seed) gives the same bytes.
"""

from __future__ import annotations

import random
import struct


def _flip(b: bytearray, r: random.Random) -> None:
    for _ in range(r.randint(1, 8)):
        i = r.randrange(len(b))
        b[i] ^= 1 << r.randrange(8)


def _random_bytes(b: bytearray, r: random.Random) -> None:
    for _ in range(r.randint(1, 16)):
        b[r.randrange(len(b))] = r.randrange(256)


def _truncate(b: bytearray, r: random.Random) -> None:
    del b[r.randrange(len(b)):]


def _insert(b: bytearray, r: random.Random) -> None:
    i = r.randrange(len(b) + 1)
    b[i:i] = bytes(r.randrange(256) for _ in range(r.randint(1, 64)))


def _delete(b: bytearray, r: random.Random) -> None:
    i = r.randrange(len(b))
    del b[i:i + r.randint(1, 256)]


def _duplicate(b: bytearray, r: random.Random) -> None:
    i = r.randrange(len(b))
    span = b[i:i + r.randint(1, 512)]
    j = r.randrange(len(b) + 1)
    b[j:j] = span


def _header(b: bytearray, r: random.Random) -> None:
    """Damage MThd's format / track count / division, or an MTrk length."""
    if len(b) < 14:
        return _random_bytes(b, r)
    field = r.choice(["format", "ntracks", "division", "mthd_len", "mtrk_len"])
    value = r.choice([0, 1, 2, 3, 0x7FFF, 0x8000, 0xFFFF, r.randrange(0x10000)])
    if field == "format":
        b[8:10] = struct.pack(">H", value)
    elif field == "ntracks":
        b[10:12] = struct.pack(">H", value)
    elif field == "division":
        b[12:14] = struct.pack(">H", value)
    elif field == "mthd_len":
        b[4:8] = struct.pack(">I", r.choice([0, 5, 7, 0xFFFFFFFF, r.randrange(2**32)]))
    else:
        at = b.find(b"MTrk", r.randrange(len(b)))
        at = at if at >= 0 else b.find(b"MTrk")
        if at >= 0 and at + 8 <= len(b):
            b[at + 4:at + 8] = struct.pack(">I", r.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, r.randrange(2**32)]))


def _huge_delta(b: bytearray, r: random.Random) -> None:
    i = r.randrange(14, len(b)) if len(b) > 14 else 0
    b[i:i] = b"\xff\xff\xff\x7f"


def _values(b: bytearray, r: random.Random) -> None:
    """Change data bytes (high bit clear) to other data bytes: pitches, velocities, deltas, meta values."""
    for _ in range(r.randint(1, 32)):
        i = r.randrange(len(b))
        if b[i] < 0x80:
            b[i] = r.randrange(0x80)


MUTATIONS = [_flip, _random_bytes, _truncate, _insert, _delete, _duplicate, _header, _huge_delta]


IN_TRACK = [_values, _values, _values, _flip, _random_bytes, _insert, _delete, _duplicate, _huge_delta]


def _chunks(data: bytes) -> list[tuple[bytes, bytearray]] | None:
    """[(type, body)] of a well-formed file, else None."""
    out, at = [], 0
    while at + 8 <= len(data):
        kind, (n,) = data[at:at + 4], struct.unpack(">I", data[at + 4:at + 8])
        if at + 8 + n > len(data):
            return None
        out.append((kind, bytearray(data[at + 8:at + 8 + n])))
        at += 8 + n
    return out if out and out[0][0] == b"MThd" and at == len(data) else None


def mutate(data: bytes, seed: int) -> bytes:
    """`data` with one to three seeded mutations (inside one track, lengths mended, half of the time)."""
    r = random.Random(seed)
    chunks = _chunks(data) if r.random() < 0.5 else None
    tracks = [i for i, (kind, body) in enumerate(chunks or []) if kind == b"MTrk" and len(body) > 8]
    if tracks:
        body = chunks[r.choice(tracks)][1]
        for _ in range(r.choice([1, 1, 2, 3])):
            if len(body) > 4:
                r.choice(IN_TRACK)(body, r)
        return b"".join(kind + struct.pack(">I", len(b)) + bytes(b) for kind, b in chunks)
    b = bytearray(data)
    for _ in range(r.choice([1, 1, 2, 3])):
        if not b:
            break
        r.choice(MUTATIONS)(b, r)
    return bytes(b)
