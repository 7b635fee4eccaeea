"""The only module that imports aiohttp: one POST, its errors mapped in one place."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import platform
import re
import socket
import ssl as ssl_module
import time
from typing import TYPE_CHECKING, NamedTuple, Protocol

import aiohttp
import aiohttp.helpers
import msgspec
import yarl

from . import __about__
from ._retry import parse_retry_after

if TYPE_CHECKING:
    from ._event import Event

USER_AGENT = (
    f"lehnz-async/{__about__.__version__} python/{platform.python_version()} "
    f"aiohttp/{aiohttp.__version__}"
)


class Response(NamedTuple):
    """What the server answered to one POST."""

    #: HTTP status.
    status: int
    #: The server's error message (JSON ``error`` field or plain text), None on success.
    message: str | None
    #: Seconds asked for by ``Retry-After``, or None.
    retry_after: float | None


class TransportFailure(Exception):
    """No usable answer: a timeout, a refused or dropped connection (retryable); or,
    when ``permanent``, a failure that retrying cannot mend: a certificate that does not
    verify, an answer that is not HTTP.

    ``reached`` is False when the request certainly never reached the server (the
    connection could not be made), and ``hint`` names the likely mistake in the
    configuration when the failure looks like one (a host name that does not resolve,
    TLS spoken to a plain HTTP port).
    """

    def __init__(
        self, message: str, permanent: bool = False, reached: bool = True, hint: str = ""
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.reached = reached
        self.hint = hint


#: Bytes of an error body read at most; the rest is never read (a proxy's 10 MB page).
MAX_ERROR_BODY = 64 * 1024
#: Bytes of a /recommend answer read at most.
MAX_ANSWER = 1024 * 1024
#: Characters of a server's message kept for errors and logs.
MAX_MESSAGE = 200
_TAGS = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def error_message(body: bytes) -> str | None:
    """The server's message in an error body, as one short line; never raises.

    The ``error`` field of a JSON object if there is one, else the body as text with any
    HTML tags taken out. Whatever the bytes (invalid UTF-8, a 10 MB page, 100,000-deep
    JSON), the result is at most ``MAX_MESSAGE`` printable characters on one line.
    """
    if not body:
        return None
    body = body[:MAX_ERROR_BODY]
    text: str | None = None
    if body[:1] == b"{":
        try:
            data = msgspec.json.decode(body)
        except Exception:  # DecodeError, RecursionError on deep nesting, ...
            data = None
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            text = data["error"]
    if text is None:
        text = _TAGS.sub(" ", body[: MAX_MESSAGE * 8].decode("utf-8", "replace"))
    text = _SPACE.sub(" ", "".join(c if c.isprintable() else " " for c in text)).strip()
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "\u2026"
    return text or None


def read_answer(status: int, payload: bytes, retry_after: str | None) -> Response:
    """The `Response` to an ingest POST that was answered ``status`` with ``payload``."""
    if 200 <= status < 300:
        return Response(status, None, None)
    if 300 <= status < 400:
        message = f"unexpected redirect (check the endpoint URL): {error_message(payload)}"
    else:
        message = error_message(payload) or ""
    return Response(status, message, parse_retry_after(retry_after, time.time()))


class BatchTransport(Protocol):
    """Where the sender hands encoded batches: HTTP (`Transport`) or memory (capture)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def forget_session(self) -> None: ...

    async def post(self, body: bytes, idempotency_key: str) -> Response: ...

    async def call(self, url: str, body: bytes) -> tuple[int, bytes]: ...


class CaptureTransport:
    """Keeps batches in memory instead of sending them (``Tracker(capture=True)``).

    Everything else runs for real: validation, batching, encoding; ``events`` holds what
    the server would have received, decoded back from the exact bytes.
    """

    def __init__(self) -> None:
        from ._event import Event

        self._decoder = msgspec.json.Decoder(list[Event])
        self.events: list[Event] = []
        self.keys: list[str] = []

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def forget_session(self) -> None:
        pass

    async def post(self, body: bytes, idempotency_key: str) -> Response:
        self.events.extend(self._decoder.decode(body))
        self.keys.append(idempotency_key)
        return Response(202, None, None)

    async def call(self, url: str, body: bytes) -> tuple[int, bytes]:
        raise TransportFailure("a capture tracker sends no requests")


def env_proxy(url: str) -> str | None:
    """The proxy ``HTTP_PROXY``/``HTTPS_PROXY`` name for ``url``, unless ``NO_PROXY``
    exempts its host: aiohttp's own reading of the environment (``trust_env``)."""
    try:
        proxy, _ = aiohttp.helpers.get_env_proxy_for_url(yarl.URL(url))
    except LookupError:
        return None
    return str(proxy)


@dataclasses.dataclass(frozen=True)
class Network:
    """How the tracker reaches the service: proxy, TLS, compression (see the README)."""

    #: An explicit proxy URL (``http://host:port``), or None.
    proxy: str | None = None
    #: Honour HTTP_PROXY, HTTPS_PROXY and NO_PROXY, as requests and httpx do (read when
    #: the session opens).
    trust_env: bool = True
    #: The TLS context; None is Python's default (verifying against the system CAs).
    ssl: ssl_module.SSLContext | None = None
    #: "gzip" to compress request bodies, or None.
    compression: str | None = None


class Transport:
    """POSTs encoded batches over one keep-alive `aiohttp.ClientSession`.

    The session is created on `open()` (inside the running loop) unless the user passed
    one, in which case it is used as it is and never closed here.
    """

    def __init__(
        self,
        endpoint: str,
        api_key: str,
        request_timeout: float,
        max_connections: int,
        session: aiohttp.ClientSession | None = None,
        network: Network | None = None,
    ) -> None:
        self._network = network = network or Network()
        self._proxy: str | None = network.proxy
        self._endpoint = endpoint
        self._headers = {
            "X-API-KEY": api_key,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._max_connections = max_connections
        self._session = session
        self._owns_session = session is None

    async def open(self) -> None:
        if self._session is None:
            network = self._network
            # The proxy is settled here, once: aiohttp's trust_env would read the
            # environment (and ~/.netrc) again for every request, which halved the
            # throughput of a drain in benchmarks/compare.py --quick.
            self._proxy = network.proxy
            if self._proxy is None and network.trust_env:
                self._proxy = env_proxy(self._endpoint)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections,
                    ssl=True if network.ssl is None else network.ssl,
                ),
            )

    def forget_session(self) -> None:
        """Drop a session bound to a loop that is gone (or to the parent of a fork)."""
        if self._owns_session:
            self._session = None

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str], limit: int = MAX_ERROR_BODY
    ) -> tuple[int, bytes, str | None]:
        """POST; the status, at most ``limit`` bytes of the body, and the Retry-After
        header. Maps aiohttp's errors, once."""
        assert self._session is not None, "Transport.open() was not awaited"
        try:
            async with self._session.post(
                url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
                proxy=self._proxy,
            ) as resp:
                payload = await _read_at_most(resp, limit)
                return resp.status, payload, resp.headers.get("Retry-After")
        except asyncio.TimeoutError as exc:
            raise TransportFailure(f"no answer within {self._timeout.total} s") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise TransportFailure(
                f"the TLS certificate of {url} does not verify: {exc}", permanent=True
            ) from exc
        except aiohttp.ClientHttpProxyError as exc:  # a proxy's answer: maybe passing
            raise TransportFailure(f"the proxy answered {exc.status}: {exc.message}") from exc
        except aiohttp.ClientResponseError as exc:  # the parser's: not an HTTP answer
            raise TransportFailure(
                f"{url} did not answer in HTTP: {type(exc).__name__}: {exc}", permanent=True
            ) from exc
        except (aiohttp.ClientConnectorSSLError, aiohttp.ClientSSLError) as exc:
            raise TransportFailure(
                f"TLS handshake with {url} failed: {exc}",
                reached=False,
                hint="the server does not speak TLS there: use http://, or the right port"
                if url.startswith("https:")
                else "",
            ) from exc
        except aiohttp.ClientConnectorError as exc:  # never connected: nothing was sent
            hint = ""
            if isinstance(exc.os_error, socket.gaierror):
                hint = f"the host name {exc.host!r} does not resolve: check the endpoint URL"
            raise TransportFailure(
                f"{type(exc).__name__}: {exc}", reached=False, hint=hint
            ) from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise TransportFailure(
                f"{type(exc).__name__}: {exc}",
                hint="the connection was closed unanswered: if the server speaks TLS, use https://"
                if url.startswith("http:")
                else "",
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportFailure(f"{type(exc).__name__}: {exc}") from exc

    async def call(self, url: str, body: bytes) -> tuple[int, bytes]:
        """POST a JSON body to another endpoint of the service (``/recommend``).

        Raises:
            TransportFailure: no HTTP answer.
        """
        status, payload, _ = await self._post(url, body, self._headers, MAX_ANSWER)
        return status, payload

    async def post(self, body: bytes, idempotency_key: str) -> Response:
        """POST one encoded batch to the ingestion endpoint.

        Raises:
            TransportFailure: no HTTP answer (timeout, connection refused or dropped).
        """
        headers = {**self._headers, "Idempotency-Key": idempotency_key}
        if self._network.compression == "gzip":
            headers["Content-Encoding"] = "gzip"
            body = gzip.compress(body, compresslevel=1, mtime=0)
        return read_answer(*await self._post(self._endpoint, body, headers))


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of a response body."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if resp.content.at_eof():  # all of it read: no second read to learn so
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
