"""Generation jobs: the model is loaded once and runs one job at a time, on one worker thread.

A press of Generate becomes a Job in a queue; the page polls it for its place in the queue, the tokens
generated so far and, once done, its variations. Each variation's MIDI file is written to the studio's
temporary folder when the job ends, its piano roll right after (the page shows the variation before),
and its audio the first time the page asks for it. The studio keeps the last few jobs and deletes the oldest's files.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import symusic

from midistral import music
from midistral.errors import MidistralError
from midistral.general_midi import program_name
from midistral.io import atomic_write_bytes
from midistral.sampler import Sampler, controls, rejection_reasons
from midistral.sampling import SAMPLING
from midistral.studio.edge import one_line
from midistral.studio.roll import Fresh, continuation, roll_data, span_ticks
from midistral.studio.settings import MODES, Request, parse_infill, shown_name
from midistral.tokenize import load_score

log = logging.getLogger("midistral.studio")
KEEP_JOBS = 12      # finished jobs whose files stay available
MAX_WAITING = 4     # jobs waiting behind the running one before Generate is refused
AUDIO_RATE = 32000  # Hz: enough for a General MIDI preview, a third less to render than 44.1 kHz
ROLL_WAIT = 300     # seconds a request for a piano roll waits for it to be drawn
INFILL_CONTEXT = 64  # ids of the piece the model sees around the bars it regenerates, at least


class Missing(MidistralError):
    """A job, variation or file the studio does not have (any more)."""


class AudioUnavailable(MidistralError):
    """No SoundFont or no fluidsynth on this machine: the page plays nothing but shows the rest."""


class QueueFull(MidistralError):
    """MAX_WAITING jobs already wait: try again in `retry_after` seconds."""

    retry_after = 10


class Stopped(Exception):
    """Raised from the progress callback when the studio stops: ends the running generation early."""


@dataclass
class Variation:
    folder: Path
    index: int
    quality: dict
    score: symusic.Score                # kept to render its audio on demand
    roll: dict                          # the page's piano roll (roll.py): notes in beats, bars, new notes
    audio_lock: threading.Lock = field(default_factory=threading.Lock)
    roll_ready: threading.Event = field(default_factory=threading.Event)

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.index}{suffix}"


@dataclass
class Job:
    id: str
    request: Request
    state: str = "queued"               # queued | running | done | failed
    step: int = 0                       # tokens generated so far (of `total`, an upper bound)
    total: int = 0
    error: str | None = None
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    seconds: float | None = None        # from start to the end of the job
    variations: list[Variation] = field(default_factory=list)


# the sampler's messages name its command-line options; the page names its own buttons
PAGE_WORDS = ((re.compile(r"--replace-track(?: -?\d+)?"), "Replace a track"),
              (re.compile(r"--add-track(?: -?\d+)?"), "Add a track"),
              (re.compile(r"\breplace-track:"), "Replace a track:"), (re.compile(r"\badd-track:"), "Add a track:"))


def page_text(text: str) -> str:
    """A sampler message as the page shows it: one bounded line, in the page's words."""
    for pattern, words in PAGE_WORDS:
        text = pattern.sub(words, text)
    return one_line(text)


def quality(sample) -> dict:
    """The quality line of one variation: instruments, bars, loops, out-of-key, silent prompt instruments."""
    score, m = sample.score, sample.metrics
    return {
        "instruments": [t.name for t in score.tracks if len(t.notes)],
        "bars": music.n_bars(score), "notes": score.note_num(), "seconds": round(score.to("second").end(), 1),
        "loops": round(m["loop_score"], 3), "out_of_key": round(m["out_of_key"], 3),
        "silent": round(m["silent_share"], 3), "warnings": rejection_reasons(m), "line": sample.line,
        "report": page_text(sample.report),
    }


def check_new_track(r: Request) -> None:
    """Add a track: the instrument must be new to the piece (rewriting one is Replace a track)."""
    playing = {music.track_program(t) for t in load_score(r.prompt, r.prompt_name).tracks if len(t.notes)}
    if r.track_program in playing:
        name = program_name(r.track_program)
        raise MidistralError(f"{name} already plays in {shown_name(r.prompt_name)}: choose Replace a track "
                             "to write new notes for it, or another instrument")


def fresh_notes(sample, r: Request) -> Fresh:
    """Which notes of `sample` the model wrote, for the page's roll."""
    if r.mode == "infill":
        start, end = span_ticks(sample.score, *r.span)
        return Fresh(start, end, programs=tuple(r.tracks) if r.tracks else None, bars=r.span)
    if sample.new_track is not None:
        return Fresh(track=sample.new_track)
    if r.prompt and sample.start_tick:
        return continuation(load_score(r.prompt, r.prompt_name), sample.score.ticks_per_quarter, sample.start_tick)
    return Fresh(sample.start_tick)


class Studio:
    """A Sampler behind a one-thread queue, with the jobs' files in a temporary folder."""

    def __init__(self, sampler: Sampler, soundfont: str | None = None, name: str = ""):
        self.sampler, self.name = sampler, name
        self.audio_problem = None
        try:
            self.soundfont = music.find_soundfont(soundfont)
            if shutil.which("fluidsynth") is None:
                raise MidistralError("fluidsynth not found: install the fluidsynth package to hear the results")
        except MidistralError as e:
            self.soundfont, self.audio_problem = None, str(e)
        # instruments, length in bars and accompaniment need the controls; without them the page
        # offers Generate and Continue with a length in tokens
        self.has_controls = controls is not None
        self.length_in_bars = self.has_controls
        self.modes = ["generate", "continue"] + (["add", "replace"] if hasattr(controls, "accompany") else [])
        try:  # Regenerate bars needs a model trained with the fill-in-the-middle tokens
            controls.check_infill_model(sampler.tok)
            self.infill_problem = None
        except MidistralError as e:
            self.infill_problem = str(e)
        # the most bars one Regenerate writes: their token budget and some of the piece must fit the context
        self.infill_max_bars = max((k for k in range(1, 65) if controls.infill_budget(k) + k + 4 + INFILL_CONTEXT
                                    <= sampler.context), default=0)
        self.folder = Path(tempfile.mkdtemp(prefix="midistral-studio-"))
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.jobs_lock = threading.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="studio-generate")
        self.stopping = threading.Event()
        # importing matplotlib and drawing a first figure takes seconds: done now, not after the first Generate
        self.worker.submit(music.piano_roll_png, symusic.Score(480), "")

    def info(self) -> dict:
        return {"model": self.name, "modes": {m: MODES[m] for m in self.modes},
                "length_unit": "bars" if self.length_in_bars else "tokens", "instruments_steer": self.has_controls,
                "audio": self.soundfont.name if self.soundfont else None, "audio_problem": self.audio_problem,
                "defaults": {"temperature": SAMPLING.temperature, "top_k": SAMPLING.top_k,
                             "no_repeat_ngram": SAMPLING.no_repeat_ngram_size},
                "context": self.sampler.context, "styles": self.sampler.styles,
                "infill": self.infill_problem is None and self.infill_max_bars > 0,
                "infill_max_bars": self.infill_max_bars}

    def infill_request(self, job: Job, v: Variation, form) -> Request:
        """Regenerate bars of variation `v` of `job`: the form checked against the variation's bars and
        instruments (settings.parse_infill); the variation's MIDI file is the piece."""
        if self.infill_problem is not None:
            raise MidistralError(f"Regenerate bars: {self.infill_problem}")
        if self.infill_max_bars == 0:
            raise MidistralError(f"Regenerate bars: this model's context ({self.sampler.context} tokens) is too "
                                 "short to regenerate a bar")
        try:
            data = v.path(".mid").read_bytes()
        except FileNotFoundError:
            raise Missing("this generation is no longer kept; press Generate again") from None
        r = job.request
        source = f"variation {v.index + 1}" + (f" of {shown_name(r.prompt_name)}" if r.prompt_name else "")
        return parse_infill(form, load_score(data, source), data, r.prompt_name, source, self.infill_max_bars,
                            self.sampler.styles)

    def close(self, wait: bool = True) -> None:
        """Stop: queued jobs are dropped, the running one ends at its next token (an added track at its next
        variation) and is waited for (unless not `wait`), then the temporary folder is deleted."""
        self.stopping.set()
        with self.jobs_lock:
            running = any(j.state == "running" for j in self.jobs.values())
            for j in self.jobs.values():
                for v in j.variations:
                    v.roll_ready.set()  # requests waiting for a piano roll answer now
        if running:
            log.info("stopping the running generation")
        self.worker.shutdown(wait=wait, cancel_futures=True)
        shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------
    # The queue

    def submit(self, request: Request) -> Job:
        with self.jobs_lock:
            waiting = sum(j.state == "queued" for j in self.jobs.values())
            if waiting >= MAX_WAITING:
                raise QueueFull(f"{waiting} generations are already waiting; try again when one is done")
            job = Job(secrets.token_hex(8), request)
            self.jobs[job.id] = job
            self._forget_old_jobs()
        self.worker.submit(self._run, job)
        return job

    def job(self, job_id: str) -> Job | None:
        with self.jobs_lock:
            return self.jobs.get(job_id)

    def place_in_queue(self, job: Job) -> int:
        """How many jobs run or wait before this one (0 once it runs)."""
        if job.state != "queued":
            return 0
        with self.jobs_lock:
            return sum(j.state in ("queued", "running") and j.created < job.created for j in self.jobs.values())

    def _forget_old_jobs(self) -> None:
        finished = [j for j in self.jobs.values() if j.state in ("done", "failed")]
        for j in finished[:max(len(finished) - KEEP_JOBS, 0)]:
            del self.jobs[j.id]
            shutil.rmtree(self.folder / j.id, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------
    # Running a job (on the worker thread: one at a time)

    def _run(self, job: Job) -> None:
        job.state, job.started = "running", time.monotonic()
        samples = []
        try:
            samples = self._sample(job)
            folder = self.folder / job.id
            folder.mkdir()
            job.variations = [self._save_midi(folder, k, s, job.request) for k, s in enumerate(samples)]
            job.state = "done"
        except MidistralError as e:
            job.error, job.state = page_text(str(e)), "failed"
        except Stopped:
            job.error, job.state = "the studio was stopped", "failed"
            return
        except Exception:  # our bug: the page says so, the terminal keeps the traceback
            if self.stopping.is_set():  # the studio stopped under the job (its folder is gone): not a bug
                job.error, job.state = "the studio was stopped", "failed"
                return
            log.exception("generation %s failed", job.id)
            job.error, job.state = "internal error: the studio's terminal shows what went wrong", "failed"
        job.seconds = time.monotonic() - job.started
        # the page shows the variations now; their piano rolls follow, drawn on this thread because
        # matplotlib is not thread-safe
        self._draw_rolls(job, samples)

    def _sample(self, job: Job) -> list:
        r = job.request

        def progress(step: int, total: int) -> None:
            if self.stopping.is_set():
                raise Stopped()
            job.step, job.total = step, total

        common = dict(num_samples=r.variations, seed=r.seed, on_progress=progress)
        if r.mode == "infill":
            return self.sampler.infill(r.prompt, r.span, r.tracks, r.sampling, style=r.style, prompt_name=r.source,
                                       **r.attributes, **common)
        if r.mode == "add":
            check_new_track(r)
        if r.mode in ("add", "replace"):
            return self.sampler.accompany(r.prompt, r.track_program, r.sampling, replace=r.mode == "replace",
                                          prompt_name=r.prompt_name, **r.attributes, **common)
        steer = dict(bars=r.bars, programs=r.programs, **r.attributes) if self.has_controls else {}
        return self.sampler.sample(r.prompt, r.sampling, prompt_name=r.prompt_name or None, style=r.style, **steer,
                                   **common)

    def _save_midi(self, folder: Path, k: int, sample, r: Request) -> Variation:
        v = Variation(folder, k, quality(sample), sample.score, roll_data(sample.score, fresh_notes(sample, r)))
        atomic_write_bytes(v.path(".mid"), sample.midi_bytes())
        return v

    def _draw_rolls(self, job: Job, samples: list) -> None:
        name = job.request.prompt_name
        for v, sample in zip(job.variations, samples):
            if self.stopping.is_set():
                v.roll_ready.set()
                continue
            try:
                title = f"Variation {v.index + 1}" + (f" of {name}" if name else "")
                atomic_write_bytes(v.path(".png"), sample.piano_roll_png(title))
            except Exception:
                log.exception("piano roll of %s/%d failed", job.id, v.index)
            finally:
                v.roll_ready.set()

    def piano_roll(self, v: Variation) -> Path:
        """The variation's piano roll, once drawn."""
        if not v.roll_ready.wait(ROLL_WAIT) or not v.path(".png").is_file():
            raise Missing(f"the piano roll of variation {v.index + 1} could not be drawn")
        return v.path(".png")

    # ------------------------------------------------------------------------------------------------
    # Audio, on demand (request threads; one render per variation)

    def audio(self, v: Variation) -> Path:
        if self.soundfont is None:
            raise AudioUnavailable(self.audio_problem)
        with v.audio_lock:
            wav = v.path(".wav")
            if not wav.is_file():
                atomic_write_bytes(wav, music.render_wav(v.score, self.soundfont, sample_rate=AUDIO_RATE))
            return wav
