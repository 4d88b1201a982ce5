"""How `ticketing up` claims its port (before any embedded part picks a free one) and keeps
its embedded servers going."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from tests.support import eventually
from ticketing.platform import up
from ticketing.platform.embedded import (
    EmbeddedRedis,
    joining_socket,
    listening_socket,
    port_answers,
)


@pytest.fixture(autouse=True)
def _in_process_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """run_up in this process: its data under tmp_path, and pytest's logging left as it is."""
    monkeypatch.setenv("TICKETING_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(up, "configure_logging", lambda **_: None)


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_a_port_in_use_is_refused_with_a_clear_message_on_ipv4_and_ipv6(
    family: int, host: str
) -> None:
    with socket.socket(family) as taken:
        taken.bind((host, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(up.ListenError, match=f"port {port} on .* already in use"):
            up.run_up(host=host, port=port)
    with listening_socket(host, port) as sock:  # free again once its holder closed it
        assert sock.getsockname()[1] == port
        assert sock.get_inheritable()  # request workers serve on this very socket


def test_a_shared_port_is_refused_when_in_use_and_spreads_connections_over_its_sockets() -> None:
    """`ticketing up --workers N`: each request worker listens on a socket of its own on the
    port. A port anyone holds is still refused; while the workers' sockets listen, nobody
    else can take the port; and the kernel spreads new connections over the sockets."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            listening_socket("127.0.0.1", taken.getsockname()[1], shared=True)
    with listening_socket("127.0.0.1", 0, shared=True) as first, joining_socket(first) as other:
        port = first.getsockname()[1]
        assert other.getsockname()[1] == port
        with pytest.raises(up.ListenError, match="already in use"):
            up.run_up(host="127.0.0.1", port=port)  # a second `ticketing up`
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        try:
            assert _accepted(first) and _accepted(other)  # 32 to 0: odds of 2 in 4 billion
        finally:
            for client in clients:
                client.close()


def _accepted(sock: socket.socket) -> int:
    sock.setblocking(False)
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def test_an_address_that_cannot_be_listened_on_is_named() -> None:
    with pytest.raises(up.ListenError, match=r"cannot listen on 192\.0\.2\.1:"):
        up.run_up(host="192.0.2.1", port=0)  # TEST-NET-1: never an address of this machine


def test_the_port_is_held_before_any_embedded_server_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An embedded server binds a free port of its own; it must never be the gateway's."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen: list[BaseException] = []

    def start_infrastructure(*_: Any) -> dict[str, Any]:
        with socket.socket() as other, pytest.raises(OSError) as refused:
            other.bind(("127.0.0.1", port))
        seen.append(refused.value)
        raise KeyboardInterrupt  # stop run_up here: the rest is the e2e tests' business

    monkeypatch.setattr(up, "_start_infrastructure", start_infrastructure)
    with pytest.raises(KeyboardInterrupt):
        up.run_up(host="127.0.0.1", port=port)
    assert len(seen) == 1
    with listening_socket("127.0.0.1", port):  # and given back when run_up unwinds
        pass


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),  # listening on IPv6 need not take IPv4 too
        ("::1", "http://[::1]:8000"),
        ("localhost", "http://localhost:8000"),
    ],
)
def test_the_gateway_is_reached_from_this_machine_on_the_family_it_listens_on(
    host: str, local: str
) -> None:
    assert up._local_url(host, 8000) == local


async def test_a_kept_server_that_dies_is_started_again_until_stopped(tmp_path: Any) -> None:
    server = EmbeddedRedis(tmp_path / "valkey")
    server.start(keep_running=True)
    try:
        first = server.process
        assert first is not None
        first.kill()
        await eventually(lambda: server.restarts == 1 and port_answers(server.host, server.port))
        assert server.process is not None and server.process.pid != first.pid
    finally:
        server.stop()
    assert server.process is None and not port_answers(server.host, server.port)
    assert not [t for t in threading.enumerate() if t.name == "watch-valkey-server"]
