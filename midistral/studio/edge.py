"""The studio's HTTP edge: what a request must be before the app reads it, and how slow clients are cut off.

The studio runs on the user's machine, so a web page in the same browser could otherwise drive it: every
request's Host must name this machine (a DNS-rebinding page sends its own name), and a request that
changes state (POST) must come from the studio's own page (Origin, Sec-Fetch-Site) as a multipart form.
Bodies are counted as they arrive, whatever Content-Length says, and refused past the cap; a client that
stops sending for READ_TIMEOUT seconds is disconnected. Every response forbids framing and foreign
content. Browsers always send Origin on a POST; a client without it (curl, scripts) is not a web page.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from urllib.parse import urlsplit

import h11
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("midistral.studio")
READ_TIMEOUT = 15.0      # seconds a client may send nothing while it owes headers or body
MAX_ERROR_CHARS = 300    # an error line is cut here: never an echo of a long input
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; media-src 'self'; "
                                  b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
]
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
DRAIN_BYTES = 32 * 2**20  # a refused body is read (and dropped) up to this size before the answer


class BodyTooLarge(Exception):
    """The body passed the cap while it streamed in."""


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """The first line of `text`, cut to `limit` characters."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"


def allowed_hosts(bind_host: str) -> set[str]:
    """Host names (lower case, no port) a request may name: the local ones and the bound address; with a
    wildcard address, this machine's own names too. IP literals are always allowed (no rebinding by IP)."""
    names = {"localhost", bind_host.lower().strip("[]")}
    if bind_host in ("0.0.0.0", "::", ""):
        hostname = socket.gethostname().lower()
        names |= {hostname, hostname + ".local", socket.getfqdn().lower()}
    return names


def host_name(host: str) -> str:
    """'Example.org:8765' -> 'example.org'; '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def refusal(method: str, headers: dict[str, str], hosts: set[str]) -> tuple[int, str] | None:
    """(status, reason) when the request must not reach the app, else None."""
    host = headers.get("host", "")
    name = host_name(host)
    if not name or not (name in hosts or is_ip(name)):
        return 403, "this studio answers requests for localhost only (the Host header names another machine)"
    if method not in STATE_CHANGING:
        return None
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if origin == "null" or parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
            return 403, "the studio accepts changes from its own page only (cross-origin request refused)"
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return 403, "the studio accepts changes from its own page only (cross-site request refused)"
    if not headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return 415, "send the request as a multipart form, as the studio's page does"
    return None


async def drain(receive, limit: int) -> None:
    """Read and drop up to `limit` more bytes of the request body: a client that sends its whole body
    before reading the answer then reads the refusal, instead of a connection reset. Memory stays flat."""
    while limit > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        limit -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class EdgeGuard:
    """ASGI middleware: Host / Origin / content-type checks, a streamed body cap, security headers, and
    a client that went away is not an error."""

    def __init__(self, app, bind_host: str = "127.0.0.1", max_body: int = 2**20):
        self.app, self.hosts, self.max_body = app, allowed_hosts(bind_host), max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        async def answer(status: int, reason: str):
            body = json.dumps({"error": one_line(reason)}).encode()
            await send_with_headers({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})
            await send_with_headers({"type": "http.response.body", "body": body})

        refused = refusal(scope["method"], headers, self.hosts)
        length = headers.get("content-length", "0")
        if refused is None and not length.isdigit():
            refused = 400, "the request's Content-Length is not a number"
        elif refused is None and int(length) > self.max_body:
            refused = 413, self.too_large()
        if refused is not None:
            log.info("refused %s %s (%d): %s", scope["method"], scope["path"], *refused)
            if length.isdigit() and int(length) <= DRAIN_BYTES:
                await drain(receive, DRAIN_BYTES)
            return await answer(*refused)

        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, counted_receive, send_with_headers)
        except BodyTooLarge:
            if not started:
                log.info("refused %s %s (413): the body passed %d bytes", scope["method"], scope["path"], self.max_body)
                await drain(receive, DRAIN_BYTES - received)
                await answer(413, self.too_large())
        except ClientDisconnect:  # the client went away mid-upload: nobody to answer
            pass

    def too_large(self) -> str:
        return f"the upload is too large: a prompt may have at most {self.max_body // 2**20} MB"


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a read timeout: a connection that owes the server request headers
    or body and sends nothing for READ_TIMEOUT seconds is closed (the app then sees a disconnect). At
    shutdown, a connection still uploading is closed at once instead of waited for."""

    read_timeout = READ_TIMEOUT

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._stall_timer = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._arm()
        super().data_received(data)

    def connection_lost(self, exc) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        self._stall_timer = self.loop.call_later(self.read_timeout, self._stalled)

    def _owes_data(self) -> bool:
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    def _stalled(self) -> None:
        if self._owes_data() and not self.transport.is_closing():
            self.transport.close()
        elif not self.transport.is_closing():
            self._arm()  # the app is answering: check again later

    def shutdown(self) -> None:
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.transport.close()
        else:
            super().shutdown()
