"""The studio in a real browser: `python -m midistral.studio` started on a tiny random checkpoint built
here, its page driven by Playwright in the system's headless Chromium. Oracles: the prompt file's own
notes, sample.py's file for the same request, symusic / the stdlib `wave` reader, and the HTTP status
codes of the API.

Playwright cannot download its own browser here, so the system package's Chromium is used; without
/usr/bin/chromium the browser tests are skipped with that reason."""

import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
import symusic

from conftest import ROOT
from midistral import music

CHROMIUM = Path("/usr/bin/chromium")


def audio_missing() -> str | None:
    """Why the machine cannot render audio (a system package absent, named with its install command), else None."""
    import shutil

    from midistral.errors import MidistralError

    if shutil.which("fluidsynth") is None:
        return "fluidsynth is absent (apt-get install fluidsynth): audio cannot be rendered"
    try:
        music.find_soundfont()
    except MidistralError:
        return "no General MIDI SoundFont (apt-get install fluid-soundfont-gm): audio cannot be rendered"
    return None


needs_audio = pytest.mark.skipif(audio_missing() is not None, reason=audio_missing() or "")
TIMEOUT_MS = 240_000  # a generation on a busy 2-core machine
SETTINGS = dict(temperature=0.8, top_k=20, no_repeat_ngram=4, seed=7)
LENGTH = {"bars": 2, "tokens": 48}  # the page asks for bars when the sampler has the controls, else tokens


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def prompt(tmp_path_factory):
    """4 bars of 4/4 at 90 bpm: a piano melody over a bass line."""
    s = symusic.Score(480)
    s.tempos.append(symusic.Tempo(0, 90.0))
    s.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    piano, bass = symusic.Track("x", 0, False), symusic.Track("y", 33, False)
    for beat in range(16):
        piano.notes.append(symusic.Note(beat * 480, 480, 60 + [0, 2, 4, 5, 7, 5, 4, 2][beat % 8], 80))
        if beat % 2 == 0:
            bass.notes.append(symusic.Note(beat * 480, 960, 36 + [0, 7, 5, 7][beat // 2 % 4], 70))
    s.tracks.extend([piano, bass])
    path = tmp_path_factory.mktemp("prompt") / "tune.mid"
    s.dump_midi(path)
    return path


SERVER_LOG = []  # the studio's terminal output (its stderr file), shown when the page reports an error
SERVER_PID = []


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """The studio as a user starts it, on a free port; its URL."""
    log = tmp_path_factory.mktemp("studio") / "stderr.txt"
    SERVER_LOG[:] = [log]
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "midistral.studio", "--ckpt", str(ckpt), "--port", "0"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    SERVER_PID[:] = [proc.pid]
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, f"no URL printed: {line!r} {log.read_text()}"
        yield url.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def info(server):
    with urllib.request.urlopen(server + "api/info") as r:
        return json.load(r)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium): the studio's browser tests need it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    # the page must work with no network: every request that does not go to the studio is refused and noted
    outside = []

    def refuse(route):
        outside.append(route.request.url)
        route.abort()

    context.route(re.compile(r"^(?!http://127\.0\.0\.1:).*"), refuse)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server)
    page.wait_for_selector("#mode-buttons button")
    yield page
    context.close()
    assert outside == [], f"the page asked the internet for {outside}"


def set_value(page, selector, value):
    """Set a form control (range inputs included) as a user would, firing its input event."""
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          str(value))


def symusic_notes(path_or_score):
    s = path_or_score if isinstance(path_or_score, symusic.Score) else symusic.Score(str(path_or_score))
    s = s.resample(480)
    return sorted((n.time, n.pitch, n.duration, t.program, t.is_drum) for t in s.tracks for n in t.notes)


def wait_for_variations(page, n):
    page.wait_for_function(f"() => document.querySelectorAll('#results .variation').length === {n} || "
                           "!document.getElementById('error').hidden")
    assert page.is_hidden("#error"), page.text_content("#error") + "\n" + SERVER_LOG[0].read_text()[-3000:]


def test_continue_two_variations_play_and_download(page, info, prompt, ckpt, tmp_path):
    page.click("#mode-buttons button[data-mode=continue]")
    page.set_input_files("#prompt-file", str(prompt))
    page.wait_for_function("() => document.getElementById('prompt-info').textContent.includes('4 bars')")
    assert "Acoustic Grand Piano" in page.text_content("#prompt-info")
    set_value(page, "#variations", 2)
    for key, value in SETTINGS.items():
        set_value(page, f"#{key}", value)
    unit = info["length_unit"]
    set_value(page, "#length", LENGTH[unit])
    page.click("#generate")
    page.wait_for_selector("#progress-box:not([hidden])")
    wait_for_variations(page, 2)
    cards = page.query_selector_all("#results .variation")
    for card in cards:
        page.wait_for_function("c => c.dataset.drawn === '1' && c.width > 0", arg=card.query_selector("canvas.roll"))
        assert "loops" in card.text_content() and "out-of-key" in card.text_content()
        if audio_missing() is None:  # the audio element loads the server's rendering and plays it
            card.eval_on_selector("audio", "a => a.play()")
            page.wait_for_function("a => a.duration > 0 && a.currentTime > 0", arg=card.query_selector("audio"))
    downloads = []
    for k, card in enumerate(cards):
        with page.expect_download() as d:
            card.query_selector("a.download").click()
        downloads.append(tmp_path / f"{k}.mid")
        d.value.save_as(downloads[-1])
        assert d.value.suggested_filename == f"tune-continue-{k + 1}.mid"

    # each download starts with the prompt's notes exactly (the continuation may add notes from the
    # prompt's last onset on)
    want = symusic_notes(prompt)
    last = want[-1][0]
    for path in downloads:
        got = symusic_notes(path)
        assert [n for n in got if n[0] < last] == [n for n in want if n[0] < last] and set(want) <= set(got)
    # the same request through sample.py gives the same two files
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), str(prompt), "--ckpt", str(ckpt), "--out", str(out),
                        "--num-samples", "2", "--bars" if unit == "bars" else "--max-new-tokens", str(LENGTH[unit]),
                        "--temperature", str(SETTINGS["temperature"]), "--top-k", str(SETTINGS["top_k"]),
                        "--no-repeat-ngram", str(SETTINGS["no_repeat_ngram"]), "--seed", str(SETTINGS["seed"])],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    for k, path in enumerate(downloads):
        assert symusic_notes(out / f"tune_{k}.mid") == symusic_notes(path)


def test_generate_from_nothing_with_chosen_instruments(page, info, tmp_path):
    steer = info["instruments_steer"]
    assert page.is_visible("#instruments-box") == steer  # hidden when the sampler cannot steer instruments
    if steer:
        for name in ("Drums", "Electric Bass (finger) (33)"):
            page.select_option("#instrument-select", label=name)
            page.click("#add-instrument")
        assert page.text_content("#chips").count("×") == 2
    set_value(page, "#variations", 1)
    set_value(page, "#length", 3 if info["length_unit"] == "bars" else 64)
    set_value(page, "#seed", 3)
    page.click("#generate")
    wait_for_variations(page, 1)
    assert "seed 3" in page.text_content("#status")
    with page.expect_download() as d:
        page.click("#results a.download")
    d.value.save_as(tmp_path / "new.mid")
    score = symusic.Score(str(tmp_path / "new.mid"))
    if steer:
        assert {-1 if t.is_drum else t.program for t in score.tracks if len(t.notes)} <= {-1, 33}
    if info["length_unit"] == "bars":  # 3 bars of 4/4 (the default meter): every note starts before bar 4
        assert max(n.time for t in score.tracks for n in t.notes) < 3 * 4 * score.tpq


def test_add_a_track_keeps_the_piece(page, info, prompt, tmp_path):
    if "add" not in info["modes"]:  # a sampler without the accompaniment: the page offers what it has
        assert page.query_selector("#mode-buttons button[data-mode=add]") is None
        assert page.query_selector_all("#mode-buttons button[data-mode=continue]")
        return
    page.click("#mode-buttons button[data-mode=replace]")
    page.set_input_files("#prompt-file", str(prompt))
    page.wait_for_function("() => document.getElementById('prompt-info').textContent.includes('4 bars')")
    # a track to replace is one the piece has
    assert page.eval_on_selector_all("#track-program option", "os => os.map(o => o.value)") == ["0", "33"]
    page.click("#mode-buttons button[data-mode=add]")
    assert page.input_value("#track-program") == "33"  # a new track defaults to a bass line, not the drums
    assert page.is_hidden("#length-row")  # the length is the piece's: no slider for it
    page.select_option("#track-program", "48")  # String Ensemble 1
    set_value(page, "#variations", 1)
    page.click("#generate")
    wait_for_variations(page, 1)
    # the sampler's line about the new track (its notes, or why it is silent) is on the page
    assert "new track:" in page.text_content("#results .report")
    assert "--" not in page.text_content("#results .report")
    page.click("#mode-buttons button[data-mode=generate]")
    assert page.is_visible("#length-row")
    with page.expect_download() as d:
        page.click("#results a.download")
    d.value.save_as(tmp_path / "added.mid")
    got = symusic_notes(tmp_path / "added.mid")
    assert [n for n in got if n[3] != 48] == symusic_notes(prompt)  # the piece's notes, unchanged
    assert {n[3] for n in got} <= {0, 33, 48}


def test_non_midi_upload_shows_a_message(page, tmp_path):
    page.click("#mode-buttons button[data-mode=continue]")
    page.click("#generate")
    assert "Choose a MIDI file" in page.text_content("#error")
    fake = tmp_path / "notes.mid"
    fake.write_text("these are not notes")
    page.set_input_files("#prompt-file", str(fake))
    page.wait_for_selector("#error:not([hidden])")
    page.wait_for_function("() => document.getElementById('error').textContent.includes('not a MIDI file')")
    assert "notes.mid" in page.text_content("#error")
    assert page.query_selector_all("#results .variation") == []


def test_api_refuses_bad_requests(browser, server, info, prompt):
    api = browser.new_context().request
    big = api.post(server + "api/inspect", multipart={
        "prompt": {"name": "big.mid", "mimeType": "audio/midi", "buffer": b"MThd" + bytes(6 * 2**20)}})
    assert big.status == 413 and "at most 5 MB" in big.json()["error"]
    broken = api.post(server + "api/inspect", multipart={
        "prompt": {"name": "cut.mid", "mimeType": "audio/midi", "buffer": prompt.read_bytes()[:60]}})
    assert broken.status == 400 and broken.json()["error"].startswith("not a readable MIDI file: cut.mid")
    unit = info["length_unit"]  # bars, or tokens when the sampler has no controls
    low, too_long = info["bounds"][unit]["min"], info["bounds"][unit]["max"] + 1
    for field, value, words in (("temperature", "5", "between 0.0 and 2.0"), ("variations", "100", "between 1 and 8"),
                                (unit, "many", "not an integer"), (unit, str(too_long), f"between {low} and"),
                                ("programs", "0,200", "not an instrument number"), ("mode", "remix", "not available")):
        r = api.post(server + "api/generate", multipart={field: value})
        assert r.status == 400 and words in r.json()["error"], (field, r.text())
    assert api.get(server + "api/jobs/0000").status == 404
    info = api.get(server + "api/info").json()
    assert {"generate", "continue"} <= set(info["modes"]) and len(info["instruments"]) == 129


@needs_audio
def test_render_wav_plays_the_notes():
    """Two notes, the second at 2 s: the WAV (read by the stdlib) is silent between them and sounds at both."""
    s = symusic.Score(480)
    s.tempos.append(symusic.Tempo(0, 120.0))
    t = symusic.Track("p", 0, False)
    t.notes.extend([symusic.Note(0, 240, 60, 100), symusic.Note(1920, 240, 67, 100)])  # at 0 s and 2 s
    s.tracks.append(t)
    with wave.open(io.BytesIO(music.render_wav(s, sample_rate=16000))) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 16000)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).reshape(-1, 2).astype(np.float64)
    rms = [np.sqrt(np.mean(pcm[int(a * 16000):int(b * 16000)] ** 2)) for a, b in ((0, 0.2), (1.6, 1.95), (2, 2.2))]
    assert len(pcm) / 16000 > 2.2
    assert rms[0] > 20 * rms[1] and rms[2] > 20 * rms[1]


def test_render_wav_names_a_missing_soundfont(tmp_path):
    from midistral.errors import MidistralError

    with pytest.raises(MidistralError, match="no-such.sf2: no such SoundFont"):
        music.render_wav(symusic.Score(480), soundfont=tmp_path / "no-such.sf2")


# ----------------------------------------------------------------------------------------------------
# The HTTP edge: each refusal found by probing the studio as an attacker would (bench/studio_probe.py
# replays them all and times them). Requests are made with the standard library so that nothing corrects them.


def http(server, method, path, body=None, headers=None, timeout=60):
    """(status, headers, JSON body or None) for one request on a new connection."""
    import http.client

    port = int(server.rstrip("/").rsplit(":", 1)[1])
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        try:
            payload = json.loads(data)
        except ValueError:
            payload = None
        return r.status, {k.lower(): v for k, v in r.getheaders()}, payload
    finally:
        c.close()


def form(fields, file=None):
    """A multipart body and its content type, as the page's FormData sends them."""
    boundary = "b0undary7e5t"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    if file:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"; filename="{file[0]}"\r\n'
                     "Content-Type: audio/midi\r\n\r\n".encode() + file[1] + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def server_rss_mb(server_pid):
    status = Path(f"/proc/{server_pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


@pytest.fixture(scope="module")
def hostile():
    """The probe's MIDI files (bench/studio_probe.py), each parsed by symusic but unusable."""
    sys.path.insert(0, str(ROOT / "bench"))
    import studio_probe

    return studio_probe


def test_hostile_files_get_a_one_line_400_and_the_studio_keeps_answering(server, hostile):
    for name, data in hostile.FILES.items():
        if name.startswith("tpq 32767"):  # large but bounded: described
            status, _, info = http(server, "POST", "/api/inspect", *form({}, ("big-tpq.mid", data)))
            assert status == 200 and info["bars"] == 1025, info  # 2^27 ticks: 4096.1 quarter notes
            continue
        status, _, answer = http(server, "POST", "/api/inspect", *form({}, ("probe.mid", data)))
        assert status == 400 and answer["error"].startswith(("probe.mid: ", "not a readable MIDI file: probe.mid")), \
            (name, answer)
        assert "\n" not in answer["error"] and "MiniMidi" not in answer["error"]
        assert http(server, "GET", "/api/info")[0] == 200
    # tpq 0 is refused by inspect and by generate alike (it used to pass inspect and fail as a job)
    status, _, answer = http(server, "POST", "/api/generate", *form({"mode": "continue"},
                                                                     ("zero.mid", hostile.FILES["tpq 0"])))
    assert status == 400 and "0 ticks per quarter note" in answer["error"]


def test_upload_cap_counts_streamed_bytes_whatever_the_headers_say(server, hostile):
    """200 MB sent chunked (with and without a false Content-Length): 413 after a few MB, the server's
    memory flat; a declared Content-Length over the cap: 413 before the body is read."""
    pid = SERVER_PID[0]
    studio = hostile.Studio.at(server)
    before = server_rss_mb(pid)
    for false_length in (False, True):
        status, sent = hostile.chunked_upload(studio, 200 * 2**20, false_length)
        assert status == 413, sent
        assert server_rss_mb(pid) - before < 40
    status, _ = hostile.raw(studio, f"POST /api/inspect HTTP/1.1\r\nHost: {studio.host}\r\nContent-Length: 1000000000\r\n"
                                    "Content-Type: multipart/form-data; boundary=x\r\n\r\n".encode())
    assert status == 413


def test_other_origins_and_foreign_hosts_are_refused(server):
    body, headers = form({"mode": "generate", "temperature": "7"})
    own = server.rstrip("/")
    for extra in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": own.replace("127.0.0.1", "localhost")},
                  {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                  {"Host": "evil.example:" + own.rsplit(":", 1)[1]}):
        status, _, answer = http(server, "POST", "/api/generate", body, {**headers, **extra})
        assert status == 403 and answer["error"], extra
    for ctype in ("application/x-www-form-urlencoded", "text/plain"):
        status, _, _ = http(server, "POST", "/api/generate", b"mode=generate", {"Content-Type": ctype})
        assert status in (403, 415)
        status, _, _ = http(server, "POST", "/api/generate", b"mode=generate",
                            {"Content-Type": ctype, "Origin": "http://evil.example"})
        assert status == 403
    assert http(server, "GET", "/api/info", headers={"Host": "rebound.example"})[0] == 403
    assert http(server, "GET", "/", headers={"Host": "rebound.example:80"})[0] == 403
    # the studio's own page, by any local name: reaches the form check (temperature 7 is out of range)
    for host in (own.split("//")[1], own.split("//")[1].replace("127.0.0.1", "localhost")):
        status, _, answer = http(server, "POST", "/api/generate", body, {
            **headers, "Host": host, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"})
        assert status == 400 and "Temperature" in answer["error"]


def test_every_answer_forbids_framing_and_the_favicon_is_served(server):
    for path in ("/", "/api/info", "/static/studio.js", "/api/jobs/0000"):
        _, headers, _ = http(server, "GET", path)
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
    status, headers, _ = http(server, "GET", "/favicon.ico")
    assert status == 200 and headers["content-type"].startswith("image/svg+xml")


def test_error_text_is_one_bounded_line(server):
    body, headers = form({"mode": "generate", "temperature": "9" * 5000})
    status, _, answer = http(server, "POST", "/api/generate", body, headers)
    assert status == 400 and len(answer["error"]) <= 300 and "Temperature" in answer["error"]
    long_name = "n" * 3000 + ".mid"
    status, _, answer = http(server, "POST", "/api/inspect", *form({}, (long_name, b"not midi")))
    assert status == 400 and len(answer["error"]) <= 300


def test_stalled_and_aborted_connections_are_closed_without_tracebacks(server, hostile):
    """Connections that stop in their headers or in their body are closed after the read timeout; an
    upload whose client leaves half-way is dropped in silence (it logged a 65-line ClientDisconnect)."""
    studio = hostile.Studio.at(server)
    assert hostile.aborted_upload(studio)[0] == 0
    status, note = hostile.stalled(studio, 4, b"GET / HTTP/1.1\r\nHost: x")  # returns once all are closed
    assert "4 of 4 closed" in note
    hostile.stalled(studio, 2, (f"POST /api/inspect HTTP/1.1\r\nHost: {studio.host}\r\nContent-Length: 100000\r\n"
                                "Content-Type: multipart/form-data; boundary=x\r\n\r\n--x").encode())
    assert http(server, "GET", "/api/info")[0] == 200
    assert "Traceback" not in SERVER_LOG[0].read_text()


def test_adding_an_instrument_the_piece_has_names_the_page_s_choice(server, prompt):
    """The sampler's message named a command-line flag (--replace-track); the page names its own button."""
    body, headers = form({"mode": "add", "track_program": "0", "variations": "1"}, ("tune.mid", prompt.read_bytes()))
    status, _, job = http(server, "POST", "/api/generate", body, headers)
    assert status == 202
    while job["state"] in ("queued", "running"):
        time.sleep(0.1)
        job = http(server, "GET", f"/api/jobs/{job['id']}")[2]
    assert job["state"] == "failed" and "--" not in job["error"]
    assert "Acoustic Grand Piano already plays in tune.mid: choose Replace a track" in job["error"]


def test_full_queue_answers_429_with_retry_after(server):
    body, headers = form({"mode": "generate", "variations": "1", "bars": "1", "tokens": "16", "seed": "1"})
    answers = [http(server, "POST", "/api/generate", body, headers) for _ in range(8)]
    statuses = [a[0] for a in answers]
    assert set(statuses) == {202, 429}, statuses
    refused = answers[statuses.index(429)]
    assert int(refused[1]["retry-after"]) > 0 and "already waiting" in refused[2]["error"]


def test_ctrl_c_during_a_generation_stops_cleanly(ckpt, tmp_path):
    """SIGINT while a job runs: the job is stopped, the temporary folder deleted, exit 0, no traceback
    (a FileNotFoundError was logged when the folder went away under the running job)."""
    import signal

    env = {**__import__("os").environ, "TMPDIR": str(tmp_path)}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "midistral.studio", "--ckpt", str(ckpt), "--port", "0"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+/", proc.stdout.readline()).group(0)
        body, headers = form({"mode": "generate", "variations": "8", "bars": "64", "tokens": "2048"})
        status, _, job = http(url, "POST", "/api/generate", body, headers)
        assert status == 202
        while http(url, "GET", f"/api/jobs/{job['id']}")[2]["state"] != "running":
            time.sleep(0.1)
        assert [p.name.startswith("midistral-studio-") for p in tmp_path.iterdir() if p.is_dir()] == [True]
        # an upload that stalls half-way must not hold the stop up (it blocked Ctrl-C)
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(f"POST /api/inspect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 100000\r\n"
                        "Content-Type: multipart/form-data; boundary=x\r\n\r\n--x".encode())
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    stalled.close()
    assert "Traceback" not in log.read_text() and "stopped" in log.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
