"""/metrics, /healthz and /readyz over a minimal read-only HTTP/1.1 server on the event loop.

GET and HEAD only; anything else is 405. Responses carry no configuration or secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)
MAX_REQUEST_BYTES = 8192


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        metrics: Callable[[], bytes],
        live: Callable[[], bool],
        ready: Callable[[], tuple[bool, str]],
    ) -> None:
        self.host, self.port = host, port
        self._metrics, self._live, self._ready = metrics, live, ready
        self._server: asyncio.Server | None = None

    @classmethod
    def of(
        cls,
        settings: WorkerSettings,
        metrics: Callable[[], bytes],
        live: Callable[[], bool],
        ready: Callable[[], tuple[bool, str]],
    ) -> HealthServer:
        return cls(settings.http_host, settings.http_port, metrics, live, ready)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("http endpoints listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, ctype, body = self._route(method, path.split("?", 1)[0])
            body_out = b"" if method == "HEAD" else body
            allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
            writer.write(
                (
                    f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\n{allow}Connection: close\r\n\r\n"
                ).encode("latin-1")
                + body_out
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path not in ("/metrics", "/healthz", "/readyz"):
            return 404, "text/plain", b"not found\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"read-only endpoint\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self._metrics()
        if path == "/healthz":
            ok = self._live()
            return (200 if ok else 503), "application/json", orjson.dumps({"live": ok})
        ready, reason = self._ready()
        return (
            (200 if ready else 503),
            "application/json",
            orjson.dumps({"ready": ready, "reason": reason}),
        )


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
