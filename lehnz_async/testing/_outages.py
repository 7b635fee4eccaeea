"""`ReferenceServer`'s outages: the server down for a while, by refused connections or
a proxy's 502/503 page, on the loop's clock."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from aiohttp import web

from ._contract import _OUTAGE_KINDS, OutageKind
from ._faults import Outage

logger = logging.getLogger("lehnz_async.testing")


class Outages:
    """The outage half of `ReferenceServer` (a mixin: the server holds the state)."""

    outages: list[Outage]
    ssl_context: Any
    _runner: web.AppRunner | None
    _sites: list[web.BaseSite]
    _held: list[tuple[Any, socket.socket | None]]
    _outage: Outage | None
    _outage_lock: asyncio.Lock
    _restore_at: asyncio.TimerHandle | None
    _restoring: set[asyncio.Task[None]]
    _handlers: set[asyncio.Task[Any]]
    _backlog: int

    def _notify(self) -> None:
        raise NotImplementedError

    @property
    def is_down(self) -> bool:
        """Whether an outage is in progress."""
        return self._outage is not None

    async def outage(self, kind: OutageKind, seconds: float | None = None) -> None:
        """Take the server down now; return at once, with the outage in effect.

        Args:
            kind: ``"refuse"``: as if the process went away: stop listening, close every
                open connection, and end the requests in progress unanswered and
                unprocessed (recorded with status 0); connection attempts are refused at
                TCP level until the server listens again, on the same port. ``"502"`` or
                ``"503"``: answer every request (ingest and recommend) with nginx's
                HTML ``502 Bad Gateway`` or ``503 Service Temporarily Unavailable`` page,
                like a proxy whose upstream is down.
            seconds: How long it lasts, on the loop's clock (``loop.time()``, so virtual
                time moves it too); the server comes back by itself. None: until
                `restore()`.

        An outage started while another lasts replaces it (the first one ends now).
        Requests answered during an outage are in `requests` as usual; refused
        connections never reach the server and are not recorded. Each outage is in
        `outages` as ``(kind, start, end)``. To wait for the end of a timed outage:
        ``await server.wait_for(lambda: not server.is_down)``.

        Raises:
            ValueError: an unknown ``kind``, or a negative ``seconds``.
            RuntimeError: the server is not started.
        """
        if kind not in _OUTAGE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(_OUTAGE_KINDS)}, not {kind!r}")
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"seconds must be >= 0 or None, not {seconds!r}")
        if self._runner is None:
            raise RuntimeError("the server is not started")
        loop = asyncio.get_running_loop()
        async with self._outage_lock:
            previous = self._outage
            await self._end_outage(record=False)
            if kind == "refuse":
                await self._stop_listening()
            outage = Outage(kind, loop.time(), None)
            if previous is not None:  # it ends when this one begins
                self._outage = previous
                self._end_outage_record(outage.start)
            self._outage = outage
            self.outages.append(outage)
            if seconds is not None:
                self._restore_at = loop.call_at(outage.start + seconds, self._auto_restore, outage)
        logger.info("outage (%s) for %s", kind, "ever" if seconds is None else f"{seconds} s")
        self._notify()

    async def restore(self) -> None:
        """End the outage in progress, if any: listen again (same port) and answer normally.

        Raises:
            OSError: the port was taken by another process while connections were refused.
        """
        async with self._outage_lock:
            await self._end_outage()
        self._notify()

    def _auto_restore(self, outage: Outage) -> None:
        """The timer of a timed outage: back now (a 502/503 outage at once; a refused port
        accepts connections at once, and they are served once the server is attached)."""
        self._restore_at = None
        if self._outage is not outage:
            return
        if outage.kind != "refuse":
            self._end_outage_record()
            logger.info("outage (%s) over", outage.kind)
            self._notify()
            return
        for _, sock in self._held:
            if sock is not None:
                sock.listen(self._backlog)
        task = asyncio.get_running_loop().create_task(self._restore_if(outage))
        self._restoring.add(task)
        task.add_done_callback(self._restoring.discard)

    async def _restore_if(self, outage: Outage) -> None:
        async with self._outage_lock:
            if self._outage is outage:  # not replaced or restored meanwhile
                await self._end_outage()
        self._notify()

    async def _end_outage(self, record: bool = True) -> None:
        """Under the lock: undo the outage in progress, if any (and ``record`` its end)."""
        if self._restore_at is not None:
            self._restore_at.cancel()
            self._restore_at = None
        outage = self._outage
        if outage is None:
            return
        if outage.kind == "refuse":
            await self._listen_again()
        if record:
            self._end_outage_record()
        else:
            self._outage = None
        logger.info("outage (%s) over", outage.kind)

    def _end_outage_record(self, end: float | None = None) -> None:
        assert self._outage is not None
        if end is None:
            end = asyncio.get_running_loop().time()
        index = len(self.outages) - 1 - self.outages[::-1].index(self._outage)
        self.outages[index] = self._outage._replace(end=end)
        self._outage = None

    async def _stop_listening(self) -> None:
        """Close the listening sockets, keep the port bound (not listening), and cut
        every open connection, as if the server process had gone away."""
        runner = self._runner
        assert runner is not None
        addresses = list(runner.addresses)
        for site in self._sites:
            await site.stop()
        self._sites = []
        for address in addresses:
            try:
                self._held.append((address, _hold_port(address)))
            except OSError:  # taken at once by someone else: try again at restore
                self._held.append((address, None))
        if runner.server is not None:
            for connection in runner.server.connections:
                connection.force_close()
        for task in self._handlers:  # requests in progress end unanswered (status 0)
            task.cancel()

    async def _listen_again(self) -> None:
        runner = self._runner
        assert runner is not None
        while self._held:
            address, sock = self._held[0]
            site = web.SockSite(
                runner,
                sock or _hold_port(address),
                backlog=self._backlog,
                ssl_context=self.ssl_context,  # back as it was: HTTPS stays HTTPS
            )
            await site.start()  # asyncio calls listen() on the socket
            self._sites.append(site)
            del self._held[0]

    def _release_port(self) -> None:
        for _, sock in self._held:
            if sock is not None:
                sock.close()
        self._held = []


def _hold_port(address: Any) -> socket.socket:
    """A socket bound to ``address`` (a sockname), not listening: connection attempts to
    it are refused, and no one else can take the port meanwhile."""
    family = socket.AF_INET6 if len(address) == 4 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == "posix":  # as asyncio does: rebind despite TIME_WAIT connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
