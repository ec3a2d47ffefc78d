"""The studio's web app (FastAPI): the page, its static files and a small JSON API.

    GET  /                              the page (static/index.html; no asset from the internet)
    GET  /api/info                      model, modes, limits, instruments, whether audio works
    POST /api/inspect                   an uploaded MIDI file's instruments and bars, or why it is unusable
    POST /api/generate                  form fields + optional MIDI file -> {"job": id}; queued
    GET  /api/jobs/{id}                 state, place in the queue, progress, the variations once done
    POST /api/jobs/{id}/{k}/infill      form fields first, last, tracks + settings -> {"job": id}: regenerate
                                        bars first..last of variation k (Sampler.infill); queued
    GET  /api/jobs/{id}/{k}/roll        variation k's notes, bars and new notes as JSON (the page draws the roll)
    GET  /api/jobs/{id}/{k}/roll.png    piano roll of variation k as a picture (a download)
    GET  /api/jobs/{id}/{k}/audio.wav   variation k played with a General MIDI SoundFont (rendered once)
    GET  /api/jobs/{id}/{k}/midi        variation k as a MIDI file (a download)

    GET  /favicon.ico, /favicon.svg     the page's icon

A user's mistake answers 400 (413 for a too large upload, 429 when the queue is full) with
{"error": "<one line>"}; the page shows that line. edge.py refuses, before the app reads anything, requests
from other origins or for other hosts and bodies past the upload cap.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from midistral.errors import MidistralError
from midistral.studio.edge import EdgeGuard, one_line
from midistral.studio.jobs import AudioUnavailable, Job, Missing, QueueFull, Studio, Variation
from midistral.studio.settings import (BOUNDS, MAX_UPLOAD_BYTES, UploadTooLarge, describe_prompt, instruments,
                                       parse_request, read_prompt)

STATIC = Path(__file__).parent / "static"
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the other fields, beside the file itself


FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
           b'fill="#2f6f5e"/><path d="M6 12.5V4l6-1.5v8" stroke="#fff" stroke-width="1.4" fill="none"/>'
           b'<circle cx="4.7" cy="12.5" r="1.8" fill="#fff"/><circle cx="10.7" cy="10.5" r="1.8" fill="#fff"/></svg>')


async def read_form(request: Request):
    """The posted form and its file (bytes, name). The body's size is bounded by EdgeGuard as it streams in."""
    form = await request.form(max_files=1, max_fields=32)
    upload = form.get("prompt")
    if upload is None or isinstance(upload, str) or not upload.filename:
        return form, None, ""
    return form, await upload.read(), upload.filename


def job_status(studio: Studio, job: Job) -> dict:
    base = f"/api/jobs/{job.id}"
    variations = [{**v.quality, "roll": f"{base}/{v.index}/roll", "png": f"{base}/{v.index}/roll.png",
                   "audio": f"{base}/{v.index}/audio.wav", "midi": f"{base}/{v.index}/midi",
                   "infill": f"{base}/{v.index}/infill"} for v in job.variations]
    r = job.request
    return {"id": job.id, "state": job.state, "queue": studio.place_in_queue(job), "step": job.step,
            "total": job.total, "seconds": job.seconds, "error": job.error, "seed": r.seed,
            "mode": r.mode, "span": r.span, "tracks": r.tracks, "source": r.source, "variations": variations}


def find_job(studio: Studio, job_id: str) -> Job:
    job = studio.job(job_id)
    if job is None:
        raise Missing("this generation is no longer kept; press Generate again")
    return job


def find_variation(studio: Studio, job_id: str, k: int) -> Variation:
    job = find_job(studio, job_id)
    if not 0 <= k < len(job.variations):
        raise Missing(f"variation {k + 1} does not exist")
    return job.variations[k]


# the HTTP status of each kind of mistake; any other MidistralError is a 400
STATUS = ((UploadTooLarge, 413), (Missing, 404), (QueueFull, 429), (AudioUnavailable, 503))


def create_app(studio: Studio, bind_host: str = "127.0.0.1") -> FastAPI:
    """The app; `bind_host` is the address the server listens on (requests must name it or localhost)."""
    app = FastAPI(title="midistral studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(EdgeGuard, bind_host=bind_host, max_body=MAX_UPLOAD_BYTES + FORM_OVERHEAD)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(MidistralError)
    def user_mistake(request: Request, e: MidistralError) -> JSONResponse:
        status = next((s for cls, s in STATUS if isinstance(e, cls)), 400)
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, QueueFull) else None
        return JSONResponse({"error": one_line(str(e))}, status_code=status, headers=headers)

    @app.get("/favicon.ico")
    @app.get("/favicon.svg")
    def favicon():
        return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/info")
    def info():
        bounds = {k: {"label": label, "min": lo, "max": hi, "default": default}
                  for k, (label, lo, hi, default) in BOUNDS.items()}
        return {**studio.info(), "bounds": bounds, "max_upload_mb": MAX_UPLOAD_BYTES // 2**20,
                "instruments": instruments()}

    @app.post("/api/inspect")
    async def inspect(request: Request):
        _, data, name = await read_form(request)
        if data is None:
            raise MidistralError("no file was sent")
        return describe_prompt(await run_in_threadpool(read_prompt, data, name), name)

    @app.post("/api/generate")
    async def generate(request: Request):
        form, data, name = await read_form(request)
        # reading the prompt takes a moment for a large file: off the event loop
        req = await run_in_threadpool(parse_request, form, data, name, studio.modes, studio.length_in_bars,
                                      studio.sampler.styles)
        return JSONResponse(job_status(studio, studio.submit(req)), status_code=202)

    @app.get("/api/jobs/{job_id}")
    def status(job_id: str):
        return job_status(studio, find_job(studio, job_id))

    @app.post("/api/jobs/{job_id}/{k}/infill")
    async def infill(job_id: str, k: int, request: Request):
        form, _, _ = await read_form(request)
        job, v = find_job(studio, job_id), find_variation(studio, job_id, k)
        req = await run_in_threadpool(studio.infill_request, job, v, form)  # reads the variation's file
        return JSONResponse(job_status(studio, studio.submit(req)), status_code=202)

    @app.get("/api/jobs/{job_id}/{k}/roll")
    def roll_json(job_id: str, k: int):
        return find_variation(studio, job_id, k).roll

    @app.get("/api/jobs/{job_id}/{k}/roll.png")
    def roll(job_id: str, k: int):
        return FileResponse(studio.piano_roll(find_variation(studio, job_id, k)), media_type="image/png")

    @app.get("/api/jobs/{job_id}/{k}/audio.wav")
    def audio(job_id: str, k: int):
        return FileResponse(studio.audio(find_variation(studio, job_id, k)), media_type="audio/wav")

    @app.get("/api/jobs/{job_id}/{k}/midi")
    def midi(job_id: str, k: int):
        r = find_job(studio, job_id).request
        return FileResponse(find_variation(studio, job_id, k).path(".mid"), media_type="audio/midi",
                            filename=f"{r.stem}-{r.mode}-{k + 1}.mid")

    return app
