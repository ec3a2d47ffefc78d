"""Hostile requests against a running studio: each one's status and time, /api/info's latency meanwhile,
the server's memory growth, and the tracebacks in its log.

    python bench/studio_probe.py                   # a tiny random checkpoint, built here
    python bench/studio_probe.py --ckpt runs/chorales

Starts `python -m midistral.studio` on 127.0.0.1 (a free port), sends every probe with the standard
library only (raw sockets where a client library would correct the request), and prints one table row
per probe: what was sent, the status, the seconds to the answer, the slowest /api/info answer while it
ran (polled every 0.1 s on another connection), the server's peak RSS growth over its RSS before the
probe, and whether the row met its goal: a 4xx within 10 s (stalled connections: closed by the server
within its read timeout; the two bounded requests: a 200), /api/info within 1 s, RSS growth under 40 MB.
Last, Ctrl-C (SIGINT) during a generation, and the count of tracebacks in the server's terminal output.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from midistral.studio.edge import READ_TIMEOUT  # noqa: E402
GOAL_SECONDS, GOAL_INFO_SECONDS, GOAL_RSS_MB = 10.0, 1.0, 40.0
SERVED = ("inspect: tpq 32767, a 2^27-tick note", "file name with $...$ (piano roll)")


def tiny_checkpoint(folder: Path) -> Path:
    """A random 2-layer model with the default tokenizer: the studio loads it in a second."""
    import torch

    from midistral.checkpoint import save_checkpoint
    from midistral.model import ModelConfig, Transformer
    from midistral.tokenize import REMI

    torch.manual_seed(0)
    tok = REMI()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=16, max_position_embeddings=256)
    save_checkpoint(folder / "best", Transformer(cfg), tok)
    return folder


def midi_file(tpq: int, events: bytes) -> bytes:
    """One-track standard MIDI file with the given track events (end of track appended)."""
    track = events + b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 1, 1, tpq) + b"MTrk" + struct.pack(">I", len(track)) + track


NOTE = b"\x00\x90\x3c\x40\x83\x60\x80\x3c\x40"  # middle C, one quarter note at tpq 480
FILES = {
    "the 37-byte file (tpq 1, a 2^28-tick note)": midi_file(1, b"\x00\x90\x3c\x40\xff\xff\xff\x7f\x80\x3c\x40"),
    "tpq 480, a 2^28-tick note": midi_file(480, b"\x00\x90\x3c\x40\xff\xff\xff\x7f\x80\x3c\x40"),
    "tpq 32767, a 2^27-tick note": midi_file(32767, b"\x00\x90\x3c\x40\xc0\x80\x80\x00\x80\x3c\x40"),
    "a tempo change at tick 2^28": midi_file(480, NOTE + b"\xff\xff\xff\x7f\xff\x51\x03\x07\xa1\x20"),
    "a meter change at tick 2^28": midi_file(480, NOTE + b"\xff\xff\xff\x7f\xff\x58\x04\x03\x02\x18\x08"),
    "tpq 0": midi_file(0, NOTE),
    "a cut file (header only)": midi_file(480, NOTE)[:20],
}


def multipart(fields: dict, file: tuple[str, bytes] | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    if file:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"; filename="{file[0]}"\r\n'
                     f'Content-Type: audio/midi\r\n\r\n'.encode() + file[1] + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Studio:
    """The server process, its log, its RSS and a connection for requests."""

    def __init__(self, ckpt: Path, log: Path, tmpdir: Path | None = None):
        self.log = log
        env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir else None  # its own temporary folder, to check
        with open(log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "midistral.studio", "--ckpt", str(ckpt), "--port", "0"],
                                         cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not m:
            sys.exit(f"the studio did not start: {line!r} {log.read_text()[-2000:]}")
        self.port = int(m.group(1))
        self.host = f"127.0.0.1:{self.port}"

    @classmethod
    def at(cls, url: str) -> "Studio":
        """A studio already running at `url` (http://127.0.0.1:PORT/), for requests only."""
        studio = cls.__new__(cls)
        studio.port = int(url.rstrip("/").rsplit(":", 1)[1])
        studio.host = f"127.0.0.1:{studio.port}"
        return studio

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> tuple[int, dict, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def post_form(self, path: str, fields: dict, file=None, headers: dict | None = None):
        body, ctype = multipart(fields, file)
        return self.request("POST", path, body, {"Content-Type": ctype, **(headers or {})})


class InfoWatch:
    """Polls /api/info every 0.1 s on its own connection; the slowest answer since the last reset."""

    def __init__(self, studio: Studio):
        self.studio, self.worst, self.failed = studio, 0.0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                status, _, _ = self.studio.request("GET", "/api/info", timeout=30)
                self.failed += status != 200
            except OSError:
                self.failed += 1
            self.worst = max(self.worst, time.perf_counter() - t0)
            time.sleep(0.1)

    def reset(self) -> None:
        self.worst, self.failed = 0.0, 0


def raw(studio: Studio, data: bytes, then_wait: float = 60) -> tuple[int, bytes]:
    """Send raw bytes on a new socket; the status of the answer (0: closed without one) and its body."""
    s = socket.create_connection(("127.0.0.1", studio.port))
    s.settimeout(then_wait)
    try:
        s.sendall(data)
    except OSError:
        pass
    return read_status(s)


def read_status(s: socket.socket) -> tuple[int, bytes]:
    got = b""
    try:
        while b"\r\n\r\n" not in got or len(got) < got.find(b"\r\n\r\n") + 4 + content_length(got):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    finally:
        s.close()
    m = re.match(rb"HTTP/1\.1 (\d+)", got)
    return (int(m.group(1)) if m else 0), got.partition(b"\r\n\r\n")[2]


def content_length(head: bytes) -> int:
    m = re.search(rb"content-length: *(\d+)", head, re.I)
    return int(m.group(1)) if m else 0


def chunked_upload(studio: Studio, total: int, false_length: bool) -> tuple[int, str]:
    """A chunked multipart upload of `total` bytes sent as fast as the server takes it."""
    boundary = uuid.uuid4().hex
    head = (f"POST /api/inspect HTTP/1.1\r\nHost: {studio.host}\r\nTransfer-Encoding: chunked\r\n"
            + ("Content-Length: 1000\r\n" if false_length else "")
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    part = (f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"; filename="big.mid"\r\n'
            "Content-Type: audio/midi\r\n\r\nMThd").encode()
    s = socket.create_connection(("127.0.0.1", studio.port))
    s.settimeout(60)
    sent = [0]

    def send():
        chunk = b"%x\r\n" % 65536 + bytes(65536) + b"\r\n"
        try:
            s.sendall(head + b"%x\r\n" % len(part) + part + b"\r\n")
            while sent[0] < total:
                s.sendall(chunk)
                sent[0] += 65536
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    status, _ = read_status(s)
    sender.join(30)
    return status, f"sent {sent[0] / 2**20:.0f} MB before the answer"


def stalled(studio: Studio, n: int, what: bytes) -> tuple[int, str]:
    """n connections that send `what` and then nothing: seconds until the server closed all of them."""
    socks = [socket.create_connection(("127.0.0.1", studio.port)) for _ in range(n)]
    for s in socks:
        s.sendall(what)
        s.settimeout(120)
    statuses = [read_status(s)[0] for s in socks]
    return (max(statuses) if any(statuses) else 0), f"{n} of {n} closed by the server"


def probes(studio: Studio, same_origin: dict) -> list[tuple[str, callable]]:
    form = lambda path, fields, file=None, headers=None: studio.post_form(path, fields, file, headers)[::2]  # noqa: E731
    rows = [(f"inspect: {name}", lambda data=data: form("/api/inspect", {}, ("probe.mid", data)))
            for name, data in FILES.items()]
    rows += [
        ("continue: tpq 0", lambda: form("/api/generate", {"mode": "continue"}, ("zero.mid", FILES["tpq 0"]))),
        ("chunked 200 MB upload", lambda: chunked_upload(studio, 200 * 2**20, false_length=False)),
        ("chunked 200 MB, Content-Length: 1000", lambda: chunked_upload(studio, 200 * 2**20, false_length=True)),
        ("Content-Length: 10^9", lambda: raw(studio, f"POST /api/inspect HTTP/1.1\r\nHost: {studio.host}\r\n"
                                                    "Content-Type: multipart/form-data; boundary=x\r\n"
                                                    "Content-Length: 1000000000\r\n\r\n".encode())),
        ("POST from Origin http://evil.example", lambda: form("/api/generate", {"mode": "generate"},
                                                              headers={"Origin": "http://evil.example"})),
        ("POST from Origin null", lambda: form("/api/generate", {"mode": "generate"}, headers={"Origin": "null"})),
        ("POST urlencoded, cross-site", lambda: studio.request("POST", "/api/generate", b"mode=generate", {
            "Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "cross-site"})[::2]),
        ("POST text/plain, no Origin", lambda: studio.request("POST", "/api/generate", b"mode=generate",
                                                              {"Content-Type": "text/plain"})[::2]),
        ("GET /api/info, Host: evil.example", lambda: studio.request("GET", "/api/info",
                                                                     headers={"Host": "evil.example"})[::2]),
        ("POST, Host: evil.example:port", lambda: form("/api/generate", {"mode": "generate"},
                                                       headers={"Host": f"evil.example:{studio.port}"})),
        ("temperature of 5,000 characters", lambda: long_echo(studio)),
        ("file name with $...$ (piano roll)", lambda: dollar_title(studio, same_origin)),
        ("burst of 10 generations", lambda: burst(studio)),
        ("GET /static/../../etc/passwd", lambda: raw(studio, f"GET /static/../../etc/passwd HTTP/1.1\r\n"
                                                             f"Host: {studio.host}\r\n\r\n".encode())),
        ("aborted upload (half a body, then closed)", lambda: aborted_upload(studio)),
        ("20 connections stalled in their headers", lambda: stalled(studio, 20, b"GET / HTTP/1.1\r\nHost: x")),
        ("5 uploads stalled in their body", lambda: stalled(studio, 5, (
            f"POST /api/inspect HTTP/1.1\r\nHost: {studio.host}\r\nContent-Length: 100000\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n\r\n--x").encode())),
    ]
    return rows


def long_echo(studio: Studio) -> tuple[int, str]:
    status, _, body = studio.post_form("/api/generate", {"mode": "generate", "temperature": "9" * 5000})
    return status, f"error of {len(json.loads(body)['error'])} characters"


def dollar_title(studio: Studio, same_origin: dict) -> tuple[int, str]:
    prompt = midi_file(480, NOTE * 4)
    status, _, body = studio.post_form("/api/generate", {"mode": "continue", "variations": "1", "bars": "1",
                                                         "tokens": "16"}, ("$x_\\frac{$.mid", prompt), same_origin)
    if status != 202:
        return status, body.decode()[:80]
    job = wait_job(studio, json.loads(body)["id"])
    status, _, _ = studio.request("GET", job["variations"][0]["roll"])
    return status, "the piano roll of the variation"


def wait_job(studio: Studio, job_id: str) -> dict:
    while True:
        job = json.loads(studio.request("GET", f"/api/jobs/{job_id}")[2])
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)


def burst(studio: Studio) -> tuple[int, str]:
    statuses, retry = [], set()
    for _ in range(10):
        status, headers, _ = studio.post_form("/api/generate", {"mode": "generate", "variations": "1", "bars": "1",
                                                                "tokens": "16"})
        statuses.append(status)
        retry.add(headers.get("retry-after"))
    refused = [s for s in statuses if s != 202]
    return max(refused or [202]), (f"{statuses.count(202)} accepted, {len(refused)} refused "
                                   f"{sorted(set(refused))}, Retry-After {sorted(r for r in retry if r)}")


def aborted_upload(studio: Studio) -> tuple[int, str]:
    s = socket.create_connection(("127.0.0.1", studio.port))
    s.sendall((f"POST /api/inspect HTTP/1.1\r\nHost: {studio.host}\r\nContent-Length: 100000\r\n"
               "Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\n").encode() + bytes(50000))
    time.sleep(0.5)
    s.close()
    time.sleep(0.5)
    return 0, "no answer expected: the client left"


def detail_of(result) -> tuple[int, str]:
    status, detail = result
    if isinstance(detail, bytes):
        try:
            detail = json.loads(detail)["error"]
        except (ValueError, KeyError, TypeError):
            detail = detail.decode("utf-8", "replace")
    return status, " ".join(str(detail).split())[:70]


def sigint_during_generation(ckpt: Path, log: Path) -> tuple[str, str]:
    """A second studio, Ctrl-C while it generates: its exit, the seconds to stop and its temporary folder."""
    tmp = log.parent / "sigint-tmp"
    tmp.mkdir()
    studio = Studio(ckpt, log, tmp)
    status, _, body = studio.post_form("/api/generate", {"mode": "generate", "variations": "8", "bars": "64",
                                                         "tokens": "2048"})
    while json.loads(studio.request("GET", f"/api/jobs/{json.loads(body)['id']}")[2])["state"] != "running":
        time.sleep(0.1)
    time.sleep(1.0)
    t0 = time.perf_counter()
    studio.proc.send_signal(signal.SIGINT)
    code = studio.proc.wait(60)
    left = list(tmp.glob("midistral-studio-*"))
    return f"exit {code}", f"stopped in {time.perf_counter() - t0:.1f} s; temporary folders left: {len(left)}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="run folder (default: a tiny random checkpoint built here)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="studio-probe-"))
    ckpt = Path(args.ckpt) if args.ckpt else tiny_checkpoint(work / "run")
    studio = Studio(ckpt, work / "studio.log")
    same_origin = {"Origin": f"http://{studio.host}", "Sec-Fetch-Site": "same-origin"}
    watch = InfoWatch(studio)
    time.sleep(1.0)
    rows, met = [], 0
    print(f"{'probe':52} {'status':>6} {'s':>6} {'info s':>7} {'RSS MB':>7}  goal  detail", flush=True)
    for name, probe in probes(studio, same_origin):
        rss0, peak = studio.rss_mb(), [0.0]
        sampling = threading.Event()

        def sample_rss():
            while not sampling.is_set():
                peak[0] = max(peak[0], studio.rss_mb())
                time.sleep(0.02)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        watch.reset()
        t0 = time.perf_counter()
        status, detail = detail_of(probe())
        seconds = time.perf_counter() - t0
        time.sleep(0.2)
        sampling.set()
        sampler.join()
        growth = max(peak[0], studio.rss_mb()) - rss0
        if name in SERVED:  # bounded requests: answered (the piano roll after its generation)
            answered = status == 200
        elif "stalled" in name or name.startswith("aborted"):  # closed by the server, no answer
            answered = status == 0 and (seconds < READ_TIMEOUT + 5 or name.startswith("aborted"))
        else:
            answered = 400 <= status < 500 and seconds < GOAL_SECONDS
        ok = answered and watch.worst < GOAL_INFO_SECONDS and growth < GOAL_RSS_MB and watch.failed == 0
        met += ok
        rows.append(name)
        print(f"{name:52} {status or 'closed':>6} {seconds:6.2f} {watch.worst:7.2f} {growth:7.1f}  {'yes' if ok else 'NO':4}  "
              f"{detail}", flush=True)
    watch.stop.set()
    studio.proc.send_signal(signal.SIGINT)
    studio.proc.wait(60)
    log = (work / "studio.log").read_text()
    sigint = sigint_during_generation(ckpt, work / "sigint.log")
    sigint_log = (work / "sigint.log").read_text()
    print(f"{'Ctrl-C during a generation':52} {sigint[0]:>6}  {sigint[1]}")
    tracebacks = log.count("Traceback") + sigint_log.count("Traceback")
    print(f"\n{met} of {len(rows)} probes met the goal; tracebacks in the server logs: {tracebacks}; "
          f"server exit after the probes: {studio.proc.returncode}")
    if tracebacks:
        print(log[-3000:] + sigint_log[-3000:])
    if met == len(rows) and not tracebacks:
        shutil.rmtree(work, ignore_errors=True)
        return 0
    print(f"the server logs are kept in {work}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
