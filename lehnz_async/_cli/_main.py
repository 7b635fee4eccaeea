"""The `lehnz-async` command: its parser, `run` and `main` (and `serve`, which is short)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..__about__ import __version__
from .._config import DEFAULT_INGEST_URL, ENDPOINT_ENV, resolve_api_key
from .._exceptions import (
    ConfigurationError,
)
from .._inspector import host_name
from ..testing import ReferenceServer
from ._demo import OUTAGE_SECONDS, _demo
from ._lines import CHECKPOINT_SUFFIX
from ._output import _err
from ._send import _Checkpoint, _raise_fd_limit, _send, _stale_checkpoint


async def _serve(
    host: str, port: int, keep: int, client_timeout: float, allow_hosts: Sequence[str] = ()
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still interrupts
            loop.add_signal_handler(signum, stop.set)
    _raise_fd_limit()
    server = ReferenceServer(
        host=host,
        port=port,
        log_requests=True,
        keep=keep,  # memory stays bounded however long it runs
        keep_bodies=False,
        client_timeout=client_timeout,
        allow_hosts=allow_hosts,
    )
    async with server:
        print(f"listening on {server.url}", flush=True)
        print(f"api key: {server.api_key} (any well-formed lehnz_pk_... key)", flush=True)
        print(f"inspector: {server.inspector.url} (your events live, in a browser)", flush=True)
        await stop.wait()
        logging.getLogger("lehnz_async.testing").info("stopping")
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


_DESCRIPTION = """\
Tools around the Lehnz ingestion API: try the tracker against an in-process server
(demo), send the events of a JSONL file to an endpoint (send), or run the reference
ingestion server with its event inspector for local development (serve)."""

_SEND_EPILOG = f"""\
Each line of FILE is one event object, as track() takes it (user_id, event_name, ...).
Lines that are not valid events are reported by number and skipped. The checkpoint
records what was delivered, so that --resume after an interruption or a failure sends
only the rest. Exit status: 0 all delivered, 1 some not delivered (the reason is
printed), 2 unusable options or file, 130 interrupted.
Environment: {ENDPOINT_ENV} (the endpoint), LEHNZ_API_KEY (the key)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lehnz-async", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lehnz-async {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="track generated events against an in-process server, with an outage halfway",
        description="Track realistic generated events through a Tracker against the\n"
        "reference server in this process; take the server down halfway through, and\n"
        "print what was delivered, failed and lost, and what one track() call costs.",
        formatter_class=_Help,
    )
    demo.add_argument(
        "--events", type=_positive_int, default=100_000, metavar="N", help="events to track"
    )
    demo.add_argument("--seed", type=int, default=7, help="seed of the generated events")
    demo.add_argument(
        "--outage",
        type=float,
        default=OUTAGE_SECONDS,
        metavar="SECONDS",
        help="the server refuses connections this long halfway through (0: never)",
    )
    send = commands.add_parser(
        "send",
        help="send the events of a JSONL file ('-': stdin) to an ingestion endpoint",
        description="Send the events of a JSONL file to a Lehnz ingestion endpoint, in\n"
        "batches, with the tracker's retries and outage handling.",
        epilog=_SEND_EPILOG,
        formatter_class=_Help,
    )
    send.add_argument("file", metavar="FILE", help="a JSONL file of events; '-' reads stdin")
    send.add_argument(
        "--endpoint",
        default=os.environ.get(ENDPOINT_ENV) or DEFAULT_INGEST_URL,
        metavar="URL",
        help=f"the ingestion URL (default: ${ENDPOINT_ENV} if set, else %(default)s)",
    )
    send.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="your publishable key, lehnz_pk_... (default: $LEHNZ_API_KEY)",
    )
    send.add_argument(
        "--close-timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="after the last line, how long delivery may go on before what is left is "
        "given up (and left for --resume)",
    )
    send.add_argument(
        "--checkpoint",
        metavar="PATH",
        help=f"where to record how far the import got (default: FILE{CHECKPOINT_SUFFIX}; "
        "none for stdin)",
    )
    restart = send.add_mutually_exclusive_group()
    restart.add_argument(
        "--resume",
        action="store_true",
        help="skip the lines a previous run delivered (or reported bad), per the checkpoint",
    )
    restart.add_argument(
        "--restart",
        action="store_true",
        help="send every line again although a checkpoint exists (without --resume or "
        "--restart, an existing checkpoint stops send before it sends anything)",
    )
    serve = commands.add_parser(
        "serve",
        help="run the reference ingestion server and its event inspector",
        description="Run the reference ingestion server (the documented contract, exactly)\n"
        "and its event inspector, for local development: point a tracker's endpoint\n"
        "at the printed URL and open the inspector in a browser.",
        formatter_class=_Help,
    )
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="the port (0: any free port)")
    serve.add_argument(
        "--keep",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="events, requests and Idempotency-Keys remembered",
    )
    serve.add_argument(
        "--client-timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="for a request's body, and between requests on a connection",
    )
    serve.add_argument(
        "--allow-host",
        action="append",
        default=[],
        type=_host_name,
        metavar="NAME",
        help="a host name the inspector also answers to, beside localhost, 127.0.0.1, [::1] "
        "and --host (repeatable; any other Host header gets 403, against DNS rebinding)",
    )
    return parser


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each option's default in its help (unless it has none, or the help says it),
    and descriptions and epilogs laid out as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _host_name(text: str) -> str:
    try:
        return host_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status.

    Args:
        argv: The arguments, without the program name; None reads ``sys.argv``.

    Returns:
        0 on success, 1 if events were bad or not delivered, 2 for a usage error.
    """
    args = _parser().parse_args(argv)
    # The CLI reports delivery problems itself (on_error, summary): the library's
    # warnings would repeat them. The server's request log is the point of `serve`.
    serving = args.command == "serve"
    logging.basicConfig(
        level=logging.INFO if serving else logging.ERROR,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return asyncio.run(_demo(args.events, args.seed, args.outage))
        if serving:
            return asyncio.run(
                _serve(args.host, args.port, args.keep, args.client_timeout, args.allow_host)
            )
        options = {
            "api_key": resolve_api_key(args.api_key, "--api-key"),
            "endpoint": args.endpoint,
            "close_timeout": args.close_timeout,
        }
        if args.file == "-":
            if args.resume and args.checkpoint is None:
                _err("lehnz-async: error: --resume needs --checkpoint PATH when reading stdin")
                return 2
            checkpoint = _Checkpoint(args.checkpoint, "-")
            if _stale_checkpoint(checkpoint, args):
                return 2
            return asyncio.run(
                _send(sys.stdin.buffer, options, args.close_timeout, checkpoint, args.resume)
            )
        with open(args.file, "rb") as source:
            checkpoint = _Checkpoint(
                args.checkpoint or args.file + CHECKPOINT_SUFFIX, os.path.abspath(args.file)
            )
            if _stale_checkpoint(checkpoint, args):
                return 2
            return asyncio.run(_send(source, options, args.close_timeout, checkpoint, args.resume))
    except (ConfigurationError, OSError) as exc:
        _err(f"lehnz-async: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _err("lehnz-async: interrupted")
        return 130


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``lehnz-async`` script: `run` the arguments and exit with its status.

    Args:
        argv: The arguments, without the program name; None reads ``sys.argv``.
    """
    sys.exit(run(argv))
