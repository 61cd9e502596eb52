"""Issue 12, identity: ``request.identity`` tells a handler who called: the peer address, the subject
of the TLS client certificate the handshake verified, and whether the connection passed AUTH."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import gevent
import pytest
from gevent.event import Event

from geventtcp import Client, Identity, Registry, Server
from geventtcp.protocol import Request
from geventtcp.tls import client_context
from tests.support.certs import Pki, make_pki
from tests.support.rawconn import RawConn
from tests.support.servers import addr
from tests.support.system import wait_until

Serve = Callable[..., Server]
TOKEN = "identity-test-secret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def whoami(request: Request) -> Any:
    identity = request.identity
    return {
        "peer": list(identity.peer),
        "tls_subject": identity.tls_subject,
        "tls_issuer": identity.tls_cert and identity.tls_cert["issuer"],
        "authenticated": identity.authenticated,
    }


def registry() -> Registry:
    reg = Registry()
    reg.add(1, whoami)
    return reg


def test_plain_connection_peer_only(serve: Serve) -> None:
    server = serve(registry())
    with RawConn(server.address) as conn:
        data = conn.call(1, id=1)["data"]
        assert data == {"peer": list(conn.sock.getsockname()), "tls_subject": None, "tls_issuer": None,
                        "authenticated": False}


def test_authenticated_only_after_auth_with_a_token(serve: Serve) -> None:
    server = serve(registry(), auth_token=TOKEN)
    with Client(addr(server), timeout=5, auth_token=TOKEN) as client:
        assert client.call(1)["authenticated"] is True
    with RawConn(server.address) as conn:  # before AUTH the command cannot even run
        assert conn.call(1, id=1)["code"] == 401
        assert conn.call(-4, {"token": TOKEN}, id=2)["code"] == 0
        assert conn.call(1, id=3)["data"]["authenticated"] is True


def test_mutual_tls_gives_the_verified_client_subject(serve: Serve, pki: Pki) -> None:
    server = serve(registry(), certfile=pki.server_cert, keyfile=pki.server_key, ca_certs=pki.ca,
                   tls_require_client_cert=True, auth_token=TOKEN)
    ctx = client_context(ca_certs=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key)
    with Client(addr(server), timeout=5, ssl_context=ctx, server_hostname="localhost", auth_token=TOKEN) as client:
        data = client.call(1)
    assert data["tls_subject"] == {"commonName": "client-1"}
    assert data["tls_issuer"] == [[["commonName", "geventtcp test CA"]]]  # the whole certificate is there
    assert data["authenticated"] is True and data["peer"][0] == "127.0.0.1"


def test_tls_without_a_client_certificate_has_no_subject(serve: Serve, pki: Pki) -> None:
    server = serve(registry(), certfile=pki.server_cert, keyfile=pki.server_key, ca_certs=pki.ca)
    with RawConn.tls(server.address, client_context(ca_certs=pki.ca)) as conn:
        data = conn.call(1, id=1)["data"]
    assert data["tls_subject"] is None and data["tls_issuer"] is None and data["authenticated"] is False


def test_a_request_built_by_hand_has_its_address_as_peer() -> None:
    identity = Request(("10.0.0.1", 4242), b"", 1, {}, 0).identity
    assert identity == Identity(("10.0.0.1", 4242))
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.authenticated = True  # type: ignore[misc]


def test_behind_a_proxy_the_peer_is_the_real_client(serve: Serve) -> None:
    server = serve(registry(), proxy_protocol=True, protected_mode=False)  # the peer is not loopback
    with RawConn(server.address) as conn:
        conn.send(b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 8889\r\n")
        assert conn.call(1, id=1)["data"]["peer"] == ["203.0.113.7", 40001]


def test_identity_is_readable_after_the_tls_connection_closed(serve: Serve, pki: Pki, hub_errors: list[Any]) -> None:
    """Review round 3: ``request.identity`` was computed from the live TLS socket, so reading it once the
    connection had closed (an audit record written by a greenlet the handler started, a handler still
    running after its connection was aborted) raised AttributeError instead of saying who called."""
    seen: list[Any] = []
    closed = Event()

    def audit_later(request: Request) -> None:
        closed.wait()
        try:
            seen.append(request.identity)
        except Exception as exc:  # what the audit greenlet died of before the fix
            seen.append(exc)

    def handler(request: Request) -> Any:
        gevent.spawn(audit_later, request)
        return "ok"

    reg = Registry()
    reg.add(1, handler)
    server = serve(reg, certfile=pki.server_cert, keyfile=pki.server_key, ca_certs=pki.ca,
                   tls_require_client_cert=True)
    ctx = client_context(ca_certs=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key)
    with RawConn.tls(server.address, ctx) as conn:
        assert conn.call(1, id=1)["data"] == "ok"
    wait_until(lambda: not server.connections)
    closed.set()
    wait_until(lambda: seen)
    assert isinstance(seen[0], Identity), seen
    assert seen[0].tls_subject == {"commonName": "client-1"} and seen[0].peer[0] == "127.0.0.1"
    assert hub_errors == []
