"""The free-port check behind `ticketing up`'s "port in use" message."""

from __future__ import annotations

import socket

import pytest

from ticketing.platform.embedded import port_is_free


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_a_port_in_use_is_seen_as_busy_on_ipv4_and_ipv6(family: int, host: str) -> None:
    with socket.socket(family) as taken:
        taken.bind((host, 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert not port_is_free(host, port)
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        free = probe.getsockname()[1]
    assert port_is_free(host, free)
