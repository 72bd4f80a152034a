"""Choosing a stack's ports: TIME_WAIT does not block a port, a listener does; explicit flags
fail naming the flag, taken defaults fall back to a free port and say so."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from switchyard.ports import PortTaken, choose_port, port_is_free

HOST = "127.0.0.1"


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def port_in_time_wait() -> int:
    """A port whose server side closed a connection first, so that it lingers in TIME_WAIT.
    The server sets SO_REUSEADDR, as the services' servers (uvicorn, gRPC) do."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((HOST, 0))
    server.listen()
    port = int(server.getsockname()[1])
    client = socket.create_connection((HOST, port))
    accepted, _ = server.accept()
    accepted.close()  # the server closes first: its end goes to TIME_WAIT
    client.recv(1)
    client.close()
    server.close()
    return port


def test_a_port_in_time_wait_is_free() -> None:
    port = port_in_time_wait()
    # Without SO_REUSEADDR the port is refused (what the old check did) ...
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain:
        with pytest.raises(OSError) as refused:
            plain.bind((HOST, port))
        assert refused.value.errno == errno.EADDRINUSE
    # ... but a server binds it, and so the check says free.
    assert port_is_free(HOST, port)


def test_a_listening_port_is_taken(listener: int) -> None:
    assert not port_is_free(HOST, listener)


def test_an_explicit_port_that_is_taken_fails_naming_the_flag(listener: int) -> None:
    with pytest.raises(PortTaken, match=f"--controller-port {listener}"):
        choose_port(HOST, "the controller", "--controller-port", listener, 50051)


def test_a_taken_default_falls_back_to_a_free_port_and_says_so(listener: int) -> None:
    choice = choose_port(HOST, "the controller", "--controller-port", None, listener)
    assert choice.port != listener and port_is_free(HOST, choice.port)
    assert f"port {listener} for the controller is taken; using {choice.port}" in choice.note
    assert "--controller-port" in choice.note


def test_a_free_default_is_kept_without_a_note(listener: int) -> None:
    free = port_in_time_wait()
    assert choose_port(HOST, "the KV service", "--kv-port", None, free).port == free
    assert choose_port(HOST, "the KV service", "--kv-port", None, free).note == ""


def test_a_port_without_fallback_fails_naming_the_flag(listener: int) -> None:
    with pytest.raises(PortTaken, match="choose another with --port"):
        choose_port(HOST, "the gateway", "--port", None, listener, fallback=False)


def test_a_port_chosen_for_another_service_counts_as_taken() -> None:
    free = port_in_time_wait()
    choice = choose_port(HOST, "the controller", "--controller-port", None, free, avoid={free})
    assert choice.port != free and choice.note
    with pytest.raises(PortTaken, match="--kv-port"):
        choose_port(HOST, "the KV service", "--kv-port", free, 50060, avoid={free})
