"""`agent.transport.direct_target`: IP literals are dialled directly, everything else as given.

The TLS side (the server's certificate is still checked against the address as written) is in
tests/integration/test_tls.py."""

from __future__ import annotations

import grpc
import pytest

from agent.transport import direct_target, make_channel


@pytest.mark.parametrize("target, expected", [
    ("127.0.0.1:7070", "ipv4:127.0.0.1:7070"),
    ("10.20.30.40:1", "ipv4:10.20.30.40:1"),
    ("[::1]:7070", "ipv6:[::1]:7070"),
    ("[fd00::5]:443", "ipv6:[fd00::5]:443"),
])
def test_ip_literals_become_address_uris(target: str, expected: str) -> None:
    assert direct_target(target) == expected


@pytest.mark.parametrize("target", [
    "localhost:7070", "fleet.example:7070",  # names: resolved by gRPC
    "dns:///fleet.example:7070", "ipv4:1.2.3.4:5", "unix:/run/fw.sock",  # schemes kept
    "1.2.3.4", "[::1]", "1.2.3.4:", ":7070", "1.2.3.4:x",  # no port: gRPC's own error
    "256.1.1.1:3", "1.2.3:4", "[fe80::1%eth0]:1",  # not plain literals
])
def test_other_targets_are_left_alone(target: str) -> None:
    assert direct_target(target) == target


def test_a_direct_channel_reaches_a_server_on_the_literal_address() -> None:
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    handler = grpc.method_handlers_generic_handler("t.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req[::-1])})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with make_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary("/t.Echo/Call")(b"abc", timeout=10) == b"cba"
    finally:
        server.stop(0)
