"""What both HTTP servers (the coordinator and the edge runtime) set on uvicorn: a ceiling on
a request's head (request line and headers) and a deadline to finish sending it.

uvicorn's fast parser (httptools) keeps a request's headers in memory however large they
grow and waits for them as long as they trickle; one unauthenticated client could hold
hundreds of megabytes, or a connection, that way. ``serve`` answers 431 past
``MAX_HEAD_BYTES`` and 408 when a head is not complete ``HEAD_SECONDS`` after its first
byte, then closes the connection. uvicorn is imported only when a server starts (this
package otherwise needs numpy only).
"""

from __future__ import annotations

MAX_HEAD_BYTES = 64 * 1024     # request line and headers (the coordinator's longest real header is ~1 KB)
HEAD_SECONDS = 10.0            # from a request's first byte to its last header
IDLE_SECONDS = 5.0             # from a connection's opening to its first byte (uvicorn times only after a response)
BACKLOG = 256                  # the listen queue, and the sockets asyncio accepts in one go
SPARE_FILES = BACKLOG + 128    # descriptors kept free of connections: one accept batch (accepted before
                               # any of their connection_made runs), the database, logs and weights files


def bounded_protocol(max_head: int = MAX_HEAD_BYTES, head_seconds: float = HEAD_SECONDS,
                     idle_seconds: float = IDLE_SECONDS, max_open: int | None = None):
    """uvicorn's httptools protocol with the bounds (a class to pass as ``http=``): a head of at
    most ``max_head`` bytes, complete within ``head_seconds`` of its first byte, and a first
    byte within ``idle_seconds`` of the connection's opening (else it is closed unanswered).
    With ``max_open``, a connection opened past that many closes the oldest one that has sent
    nothing yet, so silent sockets can never fill the process's file table."""
    silent: dict = {}   # connections that have sent no byte yet, oldest first
    import asyncio

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _in_head, _head_bytes, _head_timer, _idle_timer = False, 0, None, None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._idle_timer = asyncio.get_running_loop().call_later(idle_seconds, self._idle_timeout)
            silent[self] = None
            while max_open is not None and len(self.connections) > max_open and silent:
                next(iter(silent))._idle_timeout()

        def _not_silent(self) -> None:
            silent.pop(self, None)
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None

        def _idle_timeout(self) -> None:
            self._not_silent()
            if not self.transport.is_closing():
                self.transport.close()   # it sent nothing: nothing to answer

        def _refuse(self, status: bytes, msg: str) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            body = msg.encode()
            self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
            self.transport.close()

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                self._refuse(b"408 Request Timeout", f"request head not complete within {head_seconds:g} s")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0
            self._head_timer = asyncio.get_running_loop().call_later(head_seconds, self._head_timeout)

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if self._idle_timer is not None:
                self._not_silent()
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():   # no end of the head yet: count it
                self._head_bytes += len(data)
                if self._head_bytes > max_head:
                    self._refuse(b"431 Request Header Fields Too Large", f"request head over {max_head} bytes")

        def connection_lost(self, exc: Exception | None) -> None:
            self._not_silent()
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return BoundedHttpToolsProtocol


def serve(app, host: str, port: int, log_level: str = "warning", **kwargs) -> None:
    """``uvicorn.run`` with the head bounds (``bounded_protocol``) on Python's own event loop.

    Not uvloop: with 1,000 connections each sending its next request as soon as it is
    answered (wrk -c 1000, 2 cores), uvloop answered 1% of requests after 4 to 8 seconds
    (p99 5.1 s for a one-line ASGI app) while asyncio's loop served every connection in
    turn (p99 0.12 s) at 95% of uvloop's throughput. benchmarks/coordinator_load.py
    measures the coordinator under that load. No proxy headers: a client's address is its
    socket's (X-Forwarded-For from a local process would otherwise pick it, and the
    coordinator limits wrong enrolment secrets per address)."""
    import uvicorn
    most = connection_limit()
    kwargs.setdefault("limit_concurrency", most + 1)   # 503 past ``most`` (silent ones are closed first)
    # asyncio accepts up to ``backlog`` sockets in one go before any of their connection_made
    # runs; at the file limit it stops accepting for a whole second (EMFILE)
    kwargs.setdefault("backlog", BACKLOG)
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=bounded_protocol(max_open=most),
                loop="asyncio", proxy_headers=False, **kwargs)


def connection_limit(spare: int = SPARE_FILES) -> int:
    """Raise this process's soft limit on open files to its hard limit, and return how many
    connections to serve at once below it: uvicorn answers 503 past that number instead of
    failing to accept (which stops every request, /health included, while the table is full)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:   # no limit to raise; count as if 65,536
        return 65536 - spare
    want = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))   # the hard limit stays as it was
            soft = want
        except (ValueError, OSError):
            pass
    return max(16, int(soft) - spare)
