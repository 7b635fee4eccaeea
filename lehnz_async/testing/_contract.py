"""The ingestion contract, once: the paths, the key rules, how a body is inflated,
decoded and validated, and the answers it gets. The reference server, the benchmarks'
sink and the simulation's model of the server all use these."""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from typing import Any, Literal

import msgspec
from aiohttp import web

DEFAULT_TEST_KEY = "lehnz_pk_test"
INGEST_PATH = "/api/v1/events/ingest"
RECOMMEND_PATH = "/recommend"
DEFAULT_MAX_BODY_SIZE = 1024 * 1024
DEFAULT_BACKLOG = 1024
#: Content-Encoding -> zlib's wbits for it.
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

FAMILIES = frozenset({"exposure", "engagement", "conversion", "system"})
_PUBLISHABLE = re.compile(r"lehnz_pk_[A-Za-z0-9_\-]+")

#: How `ReferenceServer.outage` takes the server down: ``"refuse"`` stops listening
#: (connection attempts are refused at TCP level), ``"502"`` and ``"503"`` answer every
#: request with a proxy's HTML error page.
OutageKind = Literal["refuse", "502", "503"]
_OUTAGE_KINDS = ("refuse", "502", "503")
_REASONS = {
    413: "Request Entity Too Large",
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
}


def nginx_page(status: int) -> bytes:
    """The HTML error page nginx sends for ``status`` (413, 502 or 503), byte for byte."""
    title = f"{status} {_REASONS[status]}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


def _nginx_response(status: int) -> web.Response:
    return web.Response(
        status=status, reason=_REASONS[status], body=nginx_page(status), content_type="text/html"
    )


_JSON = msgspec.json.Decoder()
# what a body that is not JSON raises: msgspec.DecodeError (a ValueError only from msgspec
# 0.23 on), ValueError on invalid UTF-8, RecursionError on deep nesting
_UNDECODABLE = (msgspec.DecodeError, ValueError, RecursionError)


_MANDATORY = ("user_id", "event_family", "event_name")


def _decode_events(body: bytes) -> list[dict[str, Any]] | str:
    """The events of a body, or the message of the 400 it gets."""
    try:
        data = _JSON.decode(body)
    except _UNDECODABLE:
        return "Malformed JSON"
    events = data if isinstance(data, list) else [data]
    for event in events:
        if not isinstance(event, dict):
            return "Malformed JSON"
        for field in _MANDATORY:
            value = event.get(field)
            if not value or not isinstance(value, str):
                return "Missing mandatory fields"
        if event["event_family"] not in FAMILIES:
            return "Invalid event_family"
    return events


def _inflate(request: web.BaseRequest, body: bytes, limit: int) -> bytes | web.Response:
    """The body with its ``Content-Encoding`` undone, at most ``limit`` bytes; or the
    answer: ``413`` over the limit, ``400 Malformed JSON`` for a corrupt stream, ``415``
    for an encoding other than gzip or deflate."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    wbits = _ENCODINGS.get(encoding)
    if wbits is None:
        return _error(415, f"Unsupported Content-Encoding: {encoding[:40]}")
    parts: list[bytes] = []
    size = 0
    try:
        while True:  # one stream, or several gzip members one after the other
            inflater = zlib.decompressobj(wbits)
            data = body
            while True:
                part = inflater.decompress(data, limit - size + 1)
                size += len(part)
                if size > limit:
                    return _too_large(limit)
                parts.append(part)
                data = inflater.unconsumed_tail
                if not data:
                    break
            if not inflater.eof:
                return _error(400, "Malformed JSON")  # truncated
            body = inflater.unused_data
            if not body:
                break
            if wbits != _ENCODINGS["gzip"]:
                return _error(400, "Malformed JSON")  # bytes after the stream
    except zlib.error:
        return _error(400, "Malformed JSON")
    return b"".join(parts)


def _too_large(limit: int) -> web.Response:
    return _error(413, f"Payload Too Large: the limit is {limit} bytes")


def _error(status: int, message: str, plain_text: bool = False) -> web.Response:
    if plain_text:
        return web.Response(status=status, text=message)
    return web.json_response({"error": message}, status=status)


def check_key(
    headers: Mapping[str, str], api_keys: set[str] | None, revoked: set[str]
) -> web.Response | None:
    """The answer a request's ``X-API-KEY`` gets, or None if the key is accepted:
    ``403`` for a secret key, ``401`` for a missing, malformed, unknown or revoked one
    (``api_keys`` None accepts any well-formed publishable key)."""
    key = headers.get("X-API-KEY", "")
    if key.startswith("lehnz_sk_"):
        return _error(403, "Secret keys prohibited on public endpoints")
    valid = key in api_keys if api_keys is not None else bool(_PUBLISHABLE.fullmatch(key))
    if not valid or key in revoked:
        return _error(401, "Missing or invalid X-API-KEY")
    return None
