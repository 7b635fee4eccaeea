"""Options of the tracker: `Config`, which declares each option once, the ``DEFAULT_*``
constants and their validation.

Every default lives here and nowhere else: `Tracker.__init__`'s signature names these
constants, and its docstring and the README's options table mirror `Config`
(``tests/test_api.py`` holds all three to it). All durations are float seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import ssl as ssl_module
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._exceptions import ConfigurationError

if TYPE_CHECKING:
    import aiohttp

    from ._event import Event
    from ._exceptions import DeliveryError
    from ._retry import RetryPolicy

#: The documented ingestion URL.
DEFAULT_INGEST_URL = "https://ingestion.lehnz.com/api/v1/events/ingest"
#: Environment variable read when no key is passed.
API_KEY_ENV = "LEHNZ_API_KEY"
#: Environment variable read when no endpoint is passed.
ENDPOINT_ENV = "LEHNZ_ENDPOINT"

DEFAULT_MAX_BATCH_SIZE = 500
DEFAULT_MAX_BATCH_BYTES = 512 * 1024  # half of nginx's default 1 MiB client_max_body_size
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_MAX_CONCURRENT_REQUESTS = 4
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_MAX_QUEUE_SIZE = 1_000_000  # a guard; the byte budget is the usual bound
# 128 MiB: 5 minutes at 500 events/s of ~400-byte events is 60 MB, with room to spare;
# 12,000 events with 10 KB contexts
DEFAULT_MAX_BUFFER_BYTES = 128 * 1024 * 1024
DEFAULT_MAX_SPOOL_BYTES = 1024 * 1024 * 1024  # disk is cheaper than memory
DEFAULT_MAX_EVENT_AGE: float | None = None  # off: see the README (Outages)
DEFAULT_OUTAGE_GRACE = 2.0  # a passing blip is retried; two seconds of failures is an outage
DEFAULT_PROBE_MAX_DELAY = 10.0  # at most 10 s between the end of an outage and noticing it
# a minute of nothing delivered while events wait: well past a request's timeout and a
# batch's retries, so a slow server is not taken for a stalled sender
DEFAULT_STALL_TIMEOUT: float | None = 60.0
DEFAULT_RECOMMEND_CONNECTIONS = 4  # the recommender's own pool, apart from the uploads'
# RetryPolicy's defaults
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_MAX_RETRY_TIME = 60.0
DEFAULT_RETRY_BASE_DELAY = 0.1
DEFAULT_RETRY_MAX_DELAY = 10.0
DEFAULT_CLOSE_TIMEOUT = 10.0  # below the usual 30 s a platform gives a stopping process
DEFAULT_EXIT_TIMEOUT = 5.0
DEFAULT_OVERFLOW = "drop_newest"
DEFAULT_ATTRIBUTION_MAX_USERS = 10_000

#: Request body encodings the tracker can send.
COMPRESSIONS = ("gzip",)

#: What track() does when max_queue_size events are waiting.
OVERFLOW_POLICIES = ("drop_newest", "drop_oldest")

#: The key a capture tracker uses when none is given (it never reaches a server).
CAPTURE_API_KEY = "lehnz_pk_capture"
PUBLISHABLE_PREFIX = "lehnz_pk_"
SECRET_PREFIX = "lehnz_sk_"
_KEY_CHARS = re.compile(r"[A-Za-z0-9_\-]+")

OnError = Callable[["DeliveryError"], object]


def resolve_api_key(api_key: str | None, option: str = "api_key") -> str:
    """Return a usable publishable key or raise `ConfigurationError` saying why not;
    ``option`` is how the caller passes it (``--api-key`` on the command line)."""
    source = option  # where the key came from, named in every message about it
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV)
        source = f"the {API_KEY_ENV} environment variable"
        if not api_key:
            how = f"{option}='lehnz_pk_...'" if option.isidentifier() else f"{option} lehnz_pk_..."
            raise ConfigurationError(
                f"no API key: pass {how} or set {API_KEY_ENV} to your publishable key"
            )
    if not isinstance(api_key, str):
        raise ConfigurationError(f"{option} must be a str, not {type(api_key).__name__}")
    if api_key.startswith(SECRET_PREFIX):
        raise ConfigurationError(
            f"{source} holds a secret key (lehnz_sk_...), which is refused: the "
            "ingestion endpoint answers "
            "403 'Secret keys prohibited on public endpoints'; use your publishable "
            "key (lehnz_pk_...) instead"
        )
    if (
        not api_key.startswith(PUBLISHABLE_PREFIX)
        or len(api_key) == len(PUBLISHABLE_PREFIX)
        or not _KEY_CHARS.fullmatch(api_key)
    ):
        raise ConfigurationError(
            f"{source} is not a well-formed publishable key: it must start with "
            "'lehnz_pk_' and contain only letters, digits, '_' and '-' "
            "(check for stray whitespace or quotes)"
        )
    return api_key


def resolve_endpoint(endpoint: str | None) -> str:
    """The endpoint given, else ``$LEHNZ_ENDPOINT``, else the documented URL."""
    if endpoint is None:
        return os.environ.get(ENDPOINT_ENV) or DEFAULT_INGEST_URL
    return endpoint


def positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive int, got {value!r}")


def positive_float(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Every option of `Tracker()`, declared once: its name, type and default.

    The fields are the options, in the order of `Tracker.__init__`'s signature, each
    with the default the signature shows: a ``DEFAULT_*`` constant of this module, or
    None, True or False. What each means is written once too, in `Tracker`'s docstring
    (Args), which the API reference is built from. `Tracker()` passes every argument
    here as given; `__post_init__` checks each (`ConfigurationError` naming the option)
    and resolves what None stands for where it stands for something: ``api_key`` (the
    key in ``$LEHNZ_API_KEY``, or a placeholder with ``capture``), ``endpoint``
    (``$LEHNZ_ENDPOINT``, else `DEFAULT_INGEST_URL`) and ``retry`` (``RetryPolicy()``);
    a path-like ``spool_path`` becomes a str. Those fields are typed as resolved.
    """

    # None: resolved in __post_init__, so these three are typed as the engine reads them
    api_key: str = None  # type: ignore[assignment]
    endpoint: str = None  # type: ignore[assignment]
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    on_error: OnError | None = None
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES
    retry: RetryPolicy = None  # type: ignore[assignment]
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT
    exit_timeout: float = DEFAULT_EXIT_TIMEOUT
    overflow: str = DEFAULT_OVERFLOW
    spool_path: str | None = None
    max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES
    max_event_age: float | None = DEFAULT_MAX_EVENT_AGE
    outage_grace: float | None = DEFAULT_OUTAGE_GRACE
    probe_max_delay: float = DEFAULT_PROBE_MAX_DELAY
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT
    session: aiohttp.ClientSession | None = None
    proxy: str | None = None
    trust_env: bool = True
    ssl: ssl_module.SSLContext | None = None
    compression: str | None = None
    before_send: Callable[[Event], Event | None] | None = None
    capture: bool = False
    recommend_endpoint: str | None = None
    attribution_ttl: float | None = None
    attribution_max_users: int = DEFAULT_ATTRIBUTION_MAX_USERS

    def __post_init__(self) -> None:
        from ._retry import RetryPolicy

        resolve = functools.partial(object.__setattr__, self)  # frozen: only here
        api_key: str | None = self.api_key
        if api_key is None and self.capture and not os.environ.get(API_KEY_ENV):
            api_key = CAPTURE_API_KEY
        resolve("api_key", resolve_api_key(api_key))
        if self.retry is None:
            resolve("retry", RetryPolicy())
        resolve("endpoint", resolve_endpoint(self.endpoint))
        if self.spool_path is not None:
            resolve("spool_path", os.fspath(self.spool_path))
        if not isinstance(self.endpoint, str) or not self.endpoint.startswith(
            ("http://", "https://")
        ):
            raise ConfigurationError(
                f"endpoint must be an http:// or https:// URL, got {self.endpoint!r}"
            )
        for name in (
            "max_batch_size",
            "max_batch_bytes",
            "max_concurrent_requests",
            "max_queue_size",
            "max_buffer_bytes",
            "max_spool_bytes",
            "attribution_max_users",
        ):
            positive_int(name, getattr(self, name))
        for name in (
            "flush_interval",
            "request_timeout",
            "close_timeout",
            "exit_timeout",
            "probe_max_delay",
        ):
            positive_float(name, getattr(self, name))
        if self.max_queue_size < self.max_batch_size:
            raise ConfigurationError(
                f"max_queue_size ({self.max_queue_size}) must be at least "
                f"max_batch_size ({self.max_batch_size})"
            )
        # one full batch of 1 KB events, held twice (its events and its body)
        one_batch = 2 * min(self.max_batch_bytes, 1024 * self.max_batch_size)
        if self.max_buffer_bytes < one_batch:
            raise ConfigurationError(
                f"max_buffer_bytes ({self.max_buffer_bytes}) cannot hold one full batch: "
                f"a batch of max_batch_bytes ({self.max_batch_bytes}) (or max_batch_size "
                f"({self.max_batch_size}) events of 1 KB) takes {one_batch} bytes in memory "
                "(its events and its body); raise max_buffer_bytes or lower max_batch_bytes"
            )
        for name in ("attribution_ttl", "max_event_age", "outage_grace", "stall_timeout"):
            if getattr(self, name) is not None:
                positive_float(name, getattr(self, name))
        if self.overflow not in OVERFLOW_POLICIES:
            raise ConfigurationError(
                f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {self.overflow!r} "
                "(use `await tracker.atrack(...)` to wait for room instead)"
            )
        if self.proxy is not None and (
            not isinstance(self.proxy, str) or not self.proxy.startswith(("http://", "https://"))
        ):
            raise ConfigurationError(f"proxy must be an http:// URL or None, got {self.proxy!r}")
        if not isinstance(self.trust_env, bool):
            raise ConfigurationError(f"trust_env must be a bool, got {self.trust_env!r}")
        if self.ssl is not None and not isinstance(self.ssl, ssl_module.SSLContext):
            raise ConfigurationError(
                f"ssl must be an ssl.SSLContext or None, not {type(self.ssl).__name__}"
            )
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise ConfigurationError(
                f"compression must be None or one of {', '.join(COMPRESSIONS)}, "
                f"got {self.compression!r}"
            )
        if self.spool_path is not None and not self.spool_path:
            raise ConfigurationError("spool_path must be a file path or None")
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigurationError(
                f"retry must be a lehnz_async.RetryPolicy, not {type(self.retry).__name__}"
            )
        if self.before_send is not None and not callable(self.before_send):
            raise ConfigurationError("before_send must be a callable taking an Event")
        if self.on_error is not None and not callable(self.on_error):
            raise ConfigurationError("on_error must be a callable taking one DeliveryError")
