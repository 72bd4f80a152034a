"""``python -m gateway``: serve the gateway with uvicorn.

Flags are the fields of :class:`switchyard.settings.GatewaySettings` (``--port``,
``--controller-address``, ``--model``, ``--api-keys``, ...; unambiguous prefixes such as
``--controller`` work too). ``--engines host:port,...`` routes to a fixed list of engines
instead of following the controller.
"""

from __future__ import annotations

import argparse
import sys

import uvicorn

from gateway.app import create_app
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
    # uvloop and httptools: the event loop and HTTP parser written in C (uvicorn[standard]).
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main()
