"""The reference ingestion server: the documented contract, in memory, on loopback.

`ReferenceServer` implements ``POST /api/v1/events/ingest`` exactly as documented
(``202``; ``400 Missing mandatory fields`` / ``Invalid event_family``; ``401 Missing or
invalid X-API-KEY``; ``403 Secret keys prohibited on public endpoints``; one event object
or an array) and ``POST /recommend`` (popularity over what it has ingested). Where the
documentation is silent it chooses, and says so here:

- a body over ``max_body_size`` bytes (default 1 MiB) gets ``413``, decided from
  ``Content-Length`` before the body is read, or as soon as the bound is passed while a
  chunked body streams in; a body that has not arrived ``client_timeout`` seconds after
  its headers gets ``408``;
- ``Content-Encoding: gzip`` (or ``deflate``) bodies are inflated, at most to
  ``max_body_size`` bytes (more: ``413``); a corrupt stream gets ``400 Malformed JSON``;
  other encodings get ``415``;
- a body that is not JSON (invalid UTF-8 in a string, nesting too deep for the decoder,
  truncated, ...), or not an event object or an array of them, gets
  ``400 Malformed JSON``; an event whose ``user_id``, ``event_family`` or ``event_name``
  is not a non-empty string gets ``400 Missing mandatory fields``; never a ``500``;
- one bad event rejects the whole array;
- errors are JSON ``{"error": "<message>"}``; ``202`` answers ``{"accepted": <n>}``;
- a request whose ``Idempotency-Key`` was already accepted is answered ``202`` again
  without storing its events twice, and counted in `ReferenceServer.duplicates`.

A `FaultPlan` makes it misbehave on purpose (statuses with ``Retry-After``, latency,
dropped connections, rejected events, a proxy's body limit), and `ReferenceServer.outage`
takes it down for a while (connections refused, or a proxy's ``502``/``503`` page), so a
client's tests run over real HTTP.

`MemorySpool` stands in for the engine's spool where the engine runs on virtual time
(the deterministic simulation in ``tests/sim.py``): a spool in a list, written inline.

Usage::

    async with ReferenceServer() as server:
        async with Tracker(server.api_key, endpoint=server.url) as tracker:
            tracker.track("usr_1", "view", item_id="prod_1")
        assert server.events[0]["item_id"] == "prod_1"
"""

from ._assertions import assert_tracked
from ._contract import DEFAULT_TEST_KEY, OutageKind, nginx_page
from ._doubles import MemorySpool
from ._faults import Fault, FaultPlan, Outage
from ._records import RequestRecord
from ._server import ReferenceServer

__all__ = [
    "DEFAULT_TEST_KEY",
    "Fault",
    "FaultPlan",
    "MemorySpool",
    "Outage",
    "OutageKind",
    "ReferenceServer",
    "RequestRecord",
    "assert_tracked",
    "nginx_page",
]
