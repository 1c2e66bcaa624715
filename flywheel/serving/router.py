"""The stable endpoint in front of deployed versions (`flywheel router`, started by deploy).

A TCP proxy: each new connection goes to the backend named in the route file, which deploy
rewrites atomically when a new version has passed its health and smoke checks. Connections
already open stay with the backend they started on, so the old version drains its in-flight
requests before deploy stops it. Being a byte pipe, it passes streamed responses through as they
come. (The kubernetes target needs none of this: its Service plays this part.)
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
CHUNK = 64 * 1024


class Route:
    """The current backend, re-read only when the route file changes."""

    def __init__(self, path: Path):
        self.path = path
        self._seen: int | None = None
        self._backend: tuple[str, int] | None = None

    def backend(self) -> tuple[str, int] | None:
        try:
            changed = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        if changed != self._seen:
            target = json.loads(self.path.read_text())["backend"]
            host, _, port = target.rpartition(":")
            self._backend, self._seen = (host, int(port)), changed
        return self._backend


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        # Half-close: the other direction may still be sending (a response after the request).
        if writer.can_write_eof() and not writer.is_closing():
            try:
                writer.write_eof()
            except (OSError, RuntimeError):
                pass


async def _unavailable(writer: asyncio.StreamWriter, reason: str) -> None:
    body = json.dumps({"error": {"message": reason, "type": "unavailable", "code": 503}}).encode()
    writer.write(UNAVAILABLE % (len(body), body))
    await writer.drain()
    writer.close()


async def _connect(route: Route, client_reader, client_writer) -> None:
    backend = route.backend()
    if backend is None:
        await _unavailable(client_writer, "no version is deployed (flywheel deploy)")
        return
    try:
        backend_reader, backend_writer = await asyncio.open_connection(*backend)
    except OSError as error:
        await _unavailable(
            client_writer,
            f"the deployed version at {backend[0]}:{backend[1]} does not answer ({error.strerror or error})",
        )
        return
    await asyncio.gather(_pipe(client_reader, backend_writer), _pipe(backend_reader, client_writer))
    for writer in (backend_writer, client_writer):
        writer.close()


async def _serve(host: str, port: int, route_file: Path) -> None:
    route = Route(route_file)
    server = await asyncio.start_server(lambda r, w: _connect(route, r, w), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"flywheel router: http://{host}:{port} -> backend named in {route_file}", flush=True)
    async with server:
        await stop.wait()


def run(host: str, port: int, route_file: Path) -> int:
    try:
        asyncio.run(_serve(host, port, route_file))
    except OSError as error:
        print(f"flywheel router: cannot listen on {host}:{port}: {error.strerror or error}", flush=True)
        return 2
    return 0
