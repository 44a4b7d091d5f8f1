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


def bounded_protocol(max_head: int = MAX_HEAD_BYTES, head_seconds: float = HEAD_SECONDS):
    """uvicorn's httptools protocol with the two bounds (a class to pass as ``http=``)."""
    import asyncio

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _in_head, _head_bytes, _head_timer = False, 0, None

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
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():   # no end of the head yet: count it
                self._head_bytes += len(data)
                if self._head_bytes > max_head:
                    self._refuse(b"431 Request Header Fields Too Large", f"request head over {max_head} bytes")

        def connection_lost(self, exc: Exception | None) -> None:
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
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=bounded_protocol(), loop="asyncio",
                proxy_headers=False, **kwargs)
