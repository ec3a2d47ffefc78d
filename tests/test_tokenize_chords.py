"""Chord detection (midistral.tokenize.chords) against a literal transcription of MidiTok 3.1's loop
(miditok.utils.detect_chords, as the tokenizer calls it), on random tracks: sorted and unsorted starts,
short and long notes, mixed meters. The tokens it leads to are checked against MidiTok itself in
tests/test_tokenize_remi.py."""

import numpy as np
import pytest

from midistral.tokenize import REMI
from midistral.tokenize.chords import detect_chords, quality_table


def reference(start, end, pitch, tpb, max_res, qualities):
    """The note-by-note loop, as MidiTok writes it."""
    n, count, previous, times, quals = len(start), 0, -1, [], []
    while count < n:
        s0 = start[count]
        if s0 == previous:
            count += 1
            continue
        half = tpb[count] // 2
        horizon = s0 + tpb[count] / max_res
        idx = [j for j in range(count, min(count + 10, n)) if start[j] <= horizon]
        if any(abs(end[j] - end[idx[0]]) > half for j in idx):
            count += len(idx)
            continue
        if end[count] - s0 <= half:
            idx = [j for j in idx if start[j] == s0]
        if 3 <= len(idx) <= 5:
            cmap = tuple(pitch[j] - pitch[idx[0]] for j in idx)
            if cmap[-1] <= 24 and cmap in qualities:
                times.append(min(start[j] for j in idx))
                quals.append(qualities[cmap])
        previous = max(start[j] for j in idx)
        count += len(idx)
    return times, quals


def random_track(rng, tok):
    """Groups of 1 to 6 notes per tick, mostly known chord shapes, with ragged starts and ends."""
    shapes = [q for q in tok.chord_qualities if len(q) <= 6]
    start, end, pitch, tpb, t = [], [], [], [], 0
    for _ in range(int(rng.integers(0, 120))):
        t += int(rng.choice([0, 1, 3, 6, 12, 24]))
        shape = list(shapes[rng.integers(len(shapes))])[:int(rng.integers(1, 7))] if rng.random() < 0.8 \
            else rng.integers(-5, 30, size=int(rng.integers(1, 7))).tolist()
        root, length, beat = int(rng.integers(30, 80)), int(rng.choice([1, 3, 6, 12, 24])), int(rng.choice([12, 12, 6]))
        for iv in shape:
            jitter = int(rng.random() < 0.1)
            start.append(t + jitter)
            end.append(t + jitter + length + int(rng.choice([0, 0, 0, 0, 2, 9])))
            pitch.append(root + iv)
            tpb.append(beat)
    args = [np.array(a, dtype=np.int64) for a in (start, end, pitch, tpb)]
    if rng.random() < 0.25:  # unsorted starts (a track as the file lists it)
        perm = rng.permutation(len(start))
        args = [a[perm] for a in args]
    return args


def test_random_tracks_find_chords():
    """The generator below makes tracks with chords in them (else the comparison would prove little)."""
    tok = REMI()
    rng = np.random.default_rng(0)
    assert sum(len(reference(*[a.tolist() for a in random_track(rng, tok)], tok.max_res, tok.chord_qualities)[0])
               for _ in range(20)) > 50


@pytest.mark.parametrize("seed", range(60))
def test_matches_the_note_by_note_loop(seed):
    tok = REMI()
    args = random_track(np.random.default_rng(seed), tok)
    want = reference(*[a.tolist() for a in args], tok.max_res, tok.chord_qualities)
    times, quals, track = detect_chords(*args, tok.max_res, quality_table(tok.chord_qualities))
    assert (times.tolist(), quals.tolist()) == want and not track.any()


@pytest.mark.parametrize("seed", range(10))
def test_tracks_in_one_pass_are_walked_each_on_its_own(seed):
    tok = REMI()
    rng = np.random.default_rng(100 + seed)
    tracks = [random_track(rng, tok) for _ in range(int(rng.integers(1, 6)))]
    want = [(t, q, k) for k, tr in enumerate(tracks)
            for t, q in zip(*reference(*[a.tolist() for a in tr], tok.max_res, tok.chord_qualities))]
    cols = [np.concatenate([tr[c] for tr in tracks]) for c in range(4)]
    track = np.repeat(np.arange(len(tracks)), [len(tr[0]) for tr in tracks])
    got = detect_chords(*cols, tok.max_res, quality_table(tok.chord_qualities), track)
    assert list(zip(*(a.tolist() for a in got))) == want
