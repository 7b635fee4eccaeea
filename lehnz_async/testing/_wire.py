"""What `ReferenceServer` does on the wire before the contract decides: faults
(latency, injected statuses, dropped connections), the proxy in front during an outage,
and reading a body within its bounds and the client's time."""

from __future__ import annotations

import asyncio
from typing import NoReturn

from aiohttp import web

from ._contract import _error, _nginx_response, _too_large
from ._faults import FaultPlan, Outage
from ._records import RequestRecord


class Wire:
    """The wire half of `ReferenceServer` (a mixin: the server holds the state)."""

    faults: FaultPlan
    client_timeout: float | None
    _outage: Outage | None

    def _process(self, request: web.Request, record: RequestRecord) -> web.Response:
        raise NotImplementedError

    async def _answer(self, request: web.Request, record: RequestRecord) -> web.Response:
        plan = self.faults
        if self._outage is not None and self._outage.kind == "refuse":
            _abort(request)  # a connection opened before the outage
        body = await self._read_body(request)
        if isinstance(body, web.Response):  # too large
            if body.content_type == "text/html" or body.status == 408:  # no latency for these
                return body
            if plan.latency:
                await asyncio.sleep(plan.latency)
            return body
        record.body = body
        refused = self._front(request)
        if refused is not None:
            return refused
        if plan.latency:
            await asyncio.sleep(plan.latency)
        fault = plan.next_fault()
        if fault is None:
            return self._process(request, record)
        if fault.process:
            response = self._process(request, record)
        elif fault.body is not None:
            response = web.Response(status=fault.status, body=fault.body, content_type="text/html")
        else:
            response = _error(
                fault.status, fault.message or f"injected {fault.status}", fault.plain_text
            )
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.drop_connection:
            _abort(request)
        if fault.retry_after is not None and not fault.process:
            response.headers["Retry-After"] = fault.retry_after
        return response

    def _front(self, request: web.Request) -> web.Response | None:
        """What stands in front of the server during an outage, once it read the body:
        nothing (the connection is cut), or a proxy's 502/503 page."""
        outage = self._outage
        if outage is None:
            return None
        if outage.kind == "refuse":
            _abort(request)
        return _nginx_response(int(outage.kind))

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        """The body, or the 413 answer: the proxy's HTML page over ``proxy_body_limit``,
        the server's JSON error over ``max_body_size``; decided from ``Content-Length``
        before reading when there is one, else as soon as the bound is passed."""
        plan = self.faults
        proxy, limit = plan.proxy_body_limit, plan.max_body_size
        length = request.content_length
        if length is not None:
            if proxy is not None and length > proxy:
                return _nginx_response(413)
            if length > limit:
                return _too_large(limit)
        bound = limit if proxy is None else min(limit, proxy)
        chunks: list[bytes] = []
        size = 0
        read = request.content.readany
        timeout = self.client_timeout
        deadline = 0.0 if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            if timeout is None:
                chunk = await read()
            else:
                try:
                    remaining = deadline - asyncio.get_running_loop().time()
                    chunk = await asyncio.wait_for(read(), max(remaining, 0.0))
                except asyncio.TimeoutError:  # answer, then cut off: no more is awaited
                    response = _error(408, f"Request Timeout: no body within {timeout} s")
                    response.force_close()
                    await response.prepare(request)
                    await response.write_eof()
                    if request.transport is not None and request.transport.can_write_eof():
                        request.transport.write_eof()
                    return response
            if not chunk:
                break
            size += len(chunk)
            if size > bound:  # the rest is read and discarded by aiohttp, then closed
                if proxy is not None and size > proxy:
                    return _nginx_response(413)
                return _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)


def _abort(request: web.BaseRequest) -> NoReturn:
    """Reset the request's connection and end its handler without an answer."""
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError  # aiohttp ends the handler quietly
