"""The lines that describe a sample: its summary (bars, notes, tokens, failure modes), what it added, and why
a sample is rejected. midistral.sampler and the studio show them."""

from __future__ import annotations

import symusic

from midistral import music
from midistral.metrics import copying_reasons
from midistral.sampling import RejectionLimits


THRESHOLDS = {"silent_share": "max_silent_share", "loop_score": "max_loop_score", "out_of_key": "max_out_of_key"}
LABELS = {"silent_share": "silent", "loop_score": "loops", "out_of_key": "out-of-key"}


def rejection_reasons(metrics: dict[str, float], limits: RejectionLimits | None = None) -> list[str]:
    """Why a sample with these failure-mode metrics is rejected ([] = kept), e.g. ['loops 83% > 50%']."""
    limits = limits or RejectionLimits()
    return [f"{LABELS[key]} {metrics[key]:.0%} > {getattr(limits, limit):.0%}"
            for key, limit in THRESHOLDS.items() if metrics[key] > getattr(limits, limit)
            ] + copying_reasons(metrics, limits.max_copied_run)


def continuation_report(score: symusic.Score, start_tick: int, metrics: dict, limits: dict | None = None,
                        rejected=()) -> str:
    """New notes per instrument, the failure modes over their thresholds and the rejected tries, one line."""
    counts = music.new_notes_per_track(score, start_tick)
    warn = [f"{name} silent" for name, n in counts if n == 0]
    warn += [r for r in rejection_reasons(metrics, limits) if not r.startswith("silent")]
    if rejected:
        gave_up = "; no try passed, kept the last" if rejection_reasons(metrics, limits) else ""
        warn.append(f"rejected {' | '.join(rejected)}{gave_up}")
    line = "continuation: " + (", ".join(f"{name} {n}" for name, n in counts) or "no tracks")
    return line + (f"  [{'; '.join(warn)}]" if warn else "")


def accompaniment_report(score: symusic.Score, new_track: int, metrics: dict, limits: dict | None = None,
                         rejected=()) -> str:
    """The new track's notes, its failure modes over their thresholds and the rejected tries, one line."""
    track = score.tracks[new_track]
    warn = rejection_reasons(metrics, limits)
    if rejected:
        gave_up = "; no try passed, kept the last" if warn else ""
        warn.append(f"rejected {' | '.join(rejected)}{gave_up}")
    line = f"new track: {track.name} {len(track.notes)} notes"
    if not track.notes:  # the usual cause: the model never saw this instrument in its training data
        warn.append("the model wrote no note for this instrument: was it in its training data? "
                    "--replace-track with one of the piece's instruments works with any model")
    return line + (f"  [{'; '.join(warn)}]" if warn else "")


def summary_line(score: symusic.Score, n_tokens: int, ended: bool, skipped: int, metrics: dict) -> str:
    """bars, notes, instruments, length, tokens, skipped tokens and the failure modes, on one line."""
    instruments = ", ".join(t.name for t in score.tracks) or "none"
    modes = "  ".join(f"{LABELS[k]} {metrics[k]:.0%}" for k in THRESHOLDS)
    return (f"bars {music.n_bars(score)}  notes {score.note_num()}  instruments [{instruments}]  "
            f"{score.to('second').end():.1f}s  tokens {n_tokens}{' (ended with EOS)' if ended else ''}  "
            f"skipped {skipped}  {modes}")
