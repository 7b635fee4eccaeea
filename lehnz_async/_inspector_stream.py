"""The inspector's live stream: server-sent events to each browser, bounded in bytes.

`Streams` serves ``GET /inspector/stream`` and broadcasts each message to every browser
connected. A browser that reads too slowly (more than `MAX_CLIENT_BYTES` waiting for it)
has its stream closed; it reconnects and reloads what it shows from the API, so a slow
reader never grows the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiohttp import web

logger = logging.getLogger("lehnz_async.testing")

#: Bytes of messages that may wait for one browser; past that its stream is closed (it
#: reconnects and reloads what it shows from the API).
MAX_CLIENT_BYTES = 4 * 1024 * 1024
#: Browsers (streams) served at once; more get 503.
MAX_CLIENTS = 64
#: Seconds between two keep-alive comments on an idle stream (which also find out that a
#: browser went away).
HEARTBEAT = 15.0


class _Client:
    """One browser's stream: the messages waiting for it, bounded in bytes."""

    __slots__ = ("closed", "frames", "overflowed", "remote", "size", "transport", "wake")

    def __init__(self, transport: asyncio.Transport | None, remote: str | None) -> None:
        self.transport = transport
        self.remote = remote
        self.frames: list[bytes] = []
        self.size = 0
        self.closed = False
        self.overflowed = False
        self.wake = asyncio.Event()

    def push(self, frame: bytes) -> None:
        if self.closed:
            return
        if self.size + len(frame) > MAX_CLIENT_BYTES:  # cut it off: a write may be stuck
            self.overflowed = True
            # logged here, when it stops counting, not when its handler next runs
            logger.warning(
                "inspector: the stream to %s fell %d bytes behind and was closed (it reconnects)",
                self.remote,
                MAX_CLIENT_BYTES,
            )
            self.close()
            if self.transport is not None:
                self.transport.abort()
            return
        self.frames.append(frame)
        self.size += len(frame)
        self.wake.set()

    def take(self) -> bytes:
        data = b"".join(self.frames)
        self.frames = []
        self.size = 0
        return data

    def close(self) -> None:
        self.closed = True
        self.frames = []
        self.size = 0
        self.wake.set()


class Streams:
    """The browsers connected to the stream.

    Args:
        changed: Called when a stream opens or closes (`ReferenceServer.notify`).
    """

    def __init__(self, changed: Callable[[], None]) -> None:
        self._clients: set[_Client] = set()
        self._changed = changed

    def __len__(self) -> int:
        return len(self._clients)

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """The handler of ``GET /inspector/stream``."""
        if len(self._clients) >= MAX_CLIENTS:
            return web.json_response(
                {"error": f"at most {MAX_CLIENTS} inspector streams at once"}, status=503
            )
        client = _Client(request.transport, request.remote)
        self._clients.add(client)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        logger.debug("inspector: stream opened for %s", request.remote)
        self._changed()
        try:
            await response.prepare(request)
            await response.write(b"retry: 1000\n: live\n\n")
            while True:
                if not client.frames and not client.closed:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(client.wake.wait(), HEARTBEAT)
                client.wake.clear()
                if client.closed:
                    break
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                await response.write(client.take() or b": ping\n\n")
        except ConnectionError:  # the browser went away mid-write
            pass
        finally:
            self._clients.discard(client)
            client.close()
            self._changed()
        if not client.overflowed:
            logger.debug("inspector: stream closed for %s", request.remote)
        return response

    def broadcast(self, kind: bytes, data: bytes) -> None:
        """Send ``data`` as a server-sent event of this ``kind`` to every browser."""
        if not self._clients:
            return
        frame = b"event: " + kind + b"\ndata: " + data + b"\n\n"
        for client in list(self._clients):
            client.push(frame)
            if client.closed:  # it fell too far behind: it no longer counts
                self._clients.discard(client)

    async def close(self, app: web.Application) -> None:
        """Close every stream (the app shuts down)."""
        for client in self._clients:
            client.close()
