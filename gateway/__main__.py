"""``python -m gateway``: serve the gateway with uvicorn.

Flags are the fields of :class:`switchyard.settings.GatewaySettings` (``--port``,
``--controller-address``, ``--model``, ``--api-keys``, ...; unambiguous prefixes such as
``--controller`` work too). ``--engines host:port,...`` routes to a fixed list of engines
instead of following the controller.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

# Set before the tokenizer library first reads it. Left on, the Rust tokenizer hands even a
# one-prompt encode to its thread pool, and the hop to another thread doubled the time to
# encode a 64-word prompt on a busy two-core host; the gateway runs many requests at once
# rather than one prompt on many cores. An operator's own setting wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import uvicorn

from gateway.app import create_app
from gateway.http_protocol import GatewayHttpProtocol
from gateway.route_sources import StaticRoutes
from switchyard.log import setup_logging
from switchyard.settings import GatewaySettings, load_settings


def main(argv: list[str] | None = None) -> None:
    engines_parser = argparse.ArgumentParser(add_help=False)
    engines_parser.add_argument("--engines", default="", help="comma-separated engine addresses")
    known, rest = engines_parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    settings = load_settings(GatewaySettings, rest, prog="python -m gateway")
    setup_logging("gateway", settings.log_level)
    addresses = [address.strip() for address in known.engines.split(",") if address.strip()]
    app = create_app(settings, routes_source=StaticRoutes(addresses) if addresses else None)
    # What start-up built (the tokenizer, the libraries, the app's schemas: ~400,000 objects)
    # lives as long as the process. Frozen, the collector no longer walks it: untouched, a
    # full collection paused the event loop for up to a few hundred ms on a busy host.
    gc.collect()
    gc.freeze()
    # uvloop and httptools: the event loop and HTTP parser written in C (uvicorn[standard]);
    # the protocol writes a response's head and first body together (gateway/http_protocol.py).
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=GatewayHttpProtocol,
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main()
