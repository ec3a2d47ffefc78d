"""Start the studio: a local web page to generate, hear, look at and download music.

    python -m midistral.studio                                 # the shipped default model; open the printed address
    python -m midistral.studio --ckpt runs/chorales            # a model of your own
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from midistral.errors import ArgumentParser, MidistralError
from midistral.sampler import Sampler
from midistral.studio.app import create_app
from midistral.studio.edge import TimedH11Protocol
from midistral.studio.jobs import Studio


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m midistral.studio", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None, help="run folder (best/, else last/) or checkpoint folder "
                                                "(default: the shipped model, models/default)")
    p.add_argument("--port", type=int, default=8765, help="0 = any free port")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; other than 127.0.0.1 lets other machines use the studio")
    p.add_argument("--device", default="cpu")
    p.add_argument("--soundfont", default=None,
                   help="General MIDI .sf2 for the audio (default: $MIDISTRAL_SOUNDFONT, else the system's)")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port} is not a port number (0..65535)")
    return args


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that a busy port is a one-line error and --port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MidistralError(f"{host}:{port}: cannot listen there ({e.strerror}); choose another --port") from None
    sock.listen(64)
    return sock


class Stop(Exception):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the studio stops the same clean way."""


def stop(signum, frame):
    raise Stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sock = listen(args.host, args.port)
        sampler = Sampler.load(args.ckpt, device=args.device, log=lambda msg: print(msg, file=sys.stderr))
        # the page names the model as the user did
        studio = Studio(sampler, args.soundfont, name=args.ckpt or "the shipped default (models/default)")
    except MidistralError as e:
        print(f"error: {e}", file=sys.stderr)
        if args.ckpt is not None and not Path(args.ckpt).exists():
            print("note: the studio needs a trained model; `python train.py --config configs/chorales.toml` "
                  "makes runs/chorales in about 10 minutes", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    print(f"midistral studio: model {sampler.ckpt}; open {url} in a browser (Ctrl-C stops it)", flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"note: listening on {host}: other machines that reach it can use the studio", file=sys.stderr)
    if studio.audio_problem:
        print(f"note: no audio in the page: {studio.audio_problem}", file=sys.stderr)
    # TimedH11Protocol: slow clients are cut off (edge.READ_TIMEOUT); a request still running 10 s after
    # Ctrl-C is cancelled; a second Ctrl-C quits at once
    config = uvicorn.Config(create_app(studio, args.host), log_level="warning", http=TimedH11Protocol,
                            timeout_keep_alive=5, timeout_graceful_shutdown=10)
    # uvicorn raises the signal it caught again once it has stopped: both end here, without a traceback
    signal.signal(signal.SIGTERM, stop)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except (KeyboardInterrupt, Stop):
        pass
    try:
        studio.close()
    except (KeyboardInterrupt, Stop):  # asked twice: do not wait for the generation
        studio.close(wait=False)
        print("midistral studio: stopped without waiting for the running generation", file=sys.stderr, flush=True)
        os._exit(1)
    print("midistral studio: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
