"""uvicorn's h11 protocol with a deadline on the request head, and error answers in our envelope.

Semantics: a connection has `header_timeout` seconds from its first byte (or from being opened) to
finish the request line and headers of each request; a client that dribbles them (slowloris) or
opens a connection and sends nothing is cut off. If it had sent part of a request it gets a 408,
else the connection just closes. The head is also bounded in size (h11's limit: beyond it, 431).
Idle time between keep-alive requests stays uvicorn's `timeout_keep_alive`; the body's deadline
is the edge middleware's (server/api/edge.py). Malformed requests get a 400, as uvicorn answers,
but in the OpenAI error envelope.

h11 rather than httptools: h11 bounds the head's size itself, and it is always installed with
uvicorn, so every installation parses requests the same way.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 16 * 1024  # request line + headers; h11's default, and what nginx allows per line


def _raw_error(status: int, reason: bytes, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection. Written to the socket directly: h11
    will not send a response before it has parsed a request."""
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} ".encode()
        + reason
        + b"\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n".encode()
        + b"connection: close\r\n\r\n"
    )
    return head + body


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0  # set per server by protocol_class()

    _head_deadline: asyncio.TimerHandle | None = None
    _in_head = True  # whether the bytes h11 last parsed were (part of) a request head

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._in_head = self.conn.their_state is h11.IDLE
        if self._in_head:
            self._arm()  # the first byte of a new request after a keep-alive pause
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        started, _ = self.conn.trailing_data
        if started:
            self.logger.warning("request head not received within %gs: closing", self.header_timeout)
            message = f"the request line and headers did not arrive within {self.header_timeout:g}s"
            self.transport.write(_raw_error(408, b"Request Timeout", message, "request_timeout"))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # h11 refused the request (a syntax error, or a head over MAX_HEAD_BYTES)
        if self._in_head and len(self.conn.trailing_data[0]) > MAX_HEAD_BYTES:
            response = _raw_error(
                431,
                b"Request Header Fields Too Large",
                f"the request line and headers exceed {MAX_HEAD_BYTES} bytes",
                "header_too_large",
            )
        else:
            response = _raw_error(400, b"Bad Request", "invalid HTTP request", "invalid_http_request")
        self._disarm()
        self.transport.write(response)
        self.transport.close()


def protocol_class(header_timeout: float) -> type[H11Protocol]:
    """The protocol class to hand uvicorn (`Config(http=...)`), with this server's head deadline;
    pair it with `h11_max_incomplete_event_size=MAX_HEAD_BYTES`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})
