"""Choosing the ports a local stack listens on.

A port counts as free when a socket with ``SO_REUSEADDR`` can bind it, as the services' own
servers do (uvicorn and gRPC set it): a socket of a stack that just stopped, lingering in
TIME_WAIT, does not block it, while a process listening on it does.

A port the user gave explicitly must be free, or the stack refuses to start and names the flag;
a default port that is taken is replaced by one the OS picks, and the choice is reported.
"""

from __future__ import annotations

import socket
from collections.abc import Collection
from dataclasses import dataclass


class PortTaken(Exception):
    """A port the user asked for (or one the stack cannot do without) is in use."""


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def any_free_port(host: str) -> int:
    """A port the OS considers free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class PortChoice:
    port: int
    note: str = ""  # set when the default was taken and another port was chosen


def choose_port(
    host: str,
    what: str,
    flag: str,
    given: int | None,
    default: int,
    *,
    fallback: bool = True,
    avoid: Collection[int] = (),
) -> PortChoice:
    """The port for ``what`` (e.g. "the controller"): ``given`` when the user passed ``flag``,
    which must be free; else ``default`` when free; else (``fallback``) a free one, with a note
    saying so. Raises :class:`PortTaken` naming the flag otherwise. ``avoid`` holds ports
    already chosen for other services (free now, but not for long): they count as taken."""
    if given is not None:
        if given in avoid or not port_is_free(host, given):
            raise PortTaken(f"port {given} for {what} ({flag} {given}) is taken; choose another")
        return PortChoice(given)
    if default not in avoid and port_is_free(host, default):
        return PortChoice(default)
    if not fallback:
        raise PortTaken(f"port {default} for {what} is taken; choose another with {flag}")
    port = any_free_port(host)
    while port in avoid:
        port = any_free_port(host)
    return PortChoice(port, f"port {default} for {what} is taken; using {port} ({flag} sets it)")
