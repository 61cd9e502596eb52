"""Client TLS (verification on by default, client certificates) and AUTH, in the gevent and threads worlds."""

import gevent
import pytest

from geventtcp.client.client import Client
from geventtcp.errors import ConnectError, Unauthenticated
from geventtcp.tls import client_context
from tests.support import client_app
from tests.support.certs import make_pki
from tests.support.servers import addr, serve


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("client-pki")))


def test_tls_verified_in_greenlets_and_threads(pki):
    with serve(client_app.registry, certfile=pki.server_cert, keyfile=pki.server_key) as server:
        with Client(addr(server), timeout=5, ssl_context=client_context(ca_certs=pki.ca)) as client:
            jobs = [gevent.spawn(client.call, 1, {"g": i}) for i in range(30)]
            gevent.joinall(jobs, raise_error=True)
            assert [j.value for j in jobs] == [{"g": i} for i in range(30)]

            def in_thread(k):  # a real thread: stdlib TLS socket, reads and writes from several threads
                return [client.call(2, {"t": k, "i": i, "seconds": 0.001 * (i % 2)}) for i in range(20)]

            pool = gevent.get_hub().threadpool
            threads = [pool.spawn(in_thread, k) for k in range(4)]
            for k, t in enumerate(threads):
                assert t.get(timeout=20) == [{"t": k, "i": i, "seconds": 0.001 * (i % 2)} for i in range(20)]
            assert {"threads"} < set(client.describe())
        assert server.stats.tls_failures == 0


def test_server_certificate_is_verified_by_default(pki):
    with serve(client_app.registry, certfile=pki.server_cert, keyfile=pki.server_key) as server:
        with Client(addr(server), timeout=5, retries=0, ssl_context=client_context()) as client:
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                client.call(1)
        with Client(addr(server), timeout=5, retries=0, ssl_context=client_context(ca_certs=pki.ca),
                    server_hostname="db.example.org") as client:
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                client.call(1)


def test_client_certificate_for_mutual_tls(pki):
    settings = dict(certfile=pki.server_cert, keyfile=pki.server_key, ca_certs=pki.ca, tls_require_client_cert=True)
    with serve(client_app.registry, **settings) as server:
        ctx = client_context(ca_certs=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key)
        with Client(addr(server), timeout=5, ssl_context=ctx) as client:
            assert client.call(1, {"m": "tls"}) == {"m": "tls"}


def test_auth_token_is_sent_first_on_every_connection():
    with serve(client_app.registry, auth_token="s3cret") as server:
        with Client(addr(server), timeout=5, retries=0) as client, pytest.raises(Unauthenticated):
            client.call(1)
        with Client(addr(server), timeout=5, retries=0, auth_token="wrong") as client, pytest.raises(Unauthenticated):
            client.call(1)
        with Client(addr(server), timeout=5, auth_token="s3cret", pool_size=3) as client:
            jobs = [gevent.spawn(client.call, 2, {"seconds": 0.05, "i": i}) for i in range(30)]
            gevent.joinall(jobs, raise_error=True)
            assert server.stats.connections_total >= 4  # several new connections, each authenticated
            assert client.call(1, {"ok": True}) == {"ok": True}


TRICKLING_TLS_REPLY = r"""
import sys
import gevent
from geventtcp.client.client import Client
from geventtcp.tls import client_context
from tests.support import client_app
from tests.support.faults import FaultProxy
from tests.support.servers import addr, serve

ca, cert, key = sys.argv[1:4]
with serve(client_app.registry, certfile=cert, keyfile=key) as server:
    proxy = FaultProxy(addr(server))
    with Client(proxy.address, timeout=5, ssl_context=client_context(ca_certs=ca), pool_size=2, multiplex=1) as client:
        gevent.joinall([gevent.spawn(client.call, 2, {"seconds": 0.05}) for _ in range(2)], raise_error=True)
        client.send(2, {"seconds": 0.3, "pad": "x" * 4000})  # nobody waits: checkouts poll for its reply
        gevent.sleep(0.1)  # the request reached the server whole
        proxy.slice, proxy.slice_delay = 64, 0.2  # the reply's TLS record arrives in pieces
        gevent.sleep(0.6)  # part of it is in the socket
        calls = [gevent.spawn(client.call, 1, {"n": n}, timeout=2) for n in range(2)]
        gevent.joinall(calls, timeout=10)
        print("finished", sum(call.ready() for call in calls), flush=True)
    proxy.close()
"""


@pytest.mark.subprocess
def test_a_checkout_polling_a_partial_tls_record_never_freezes_the_hub(pki):
    """Review (rv-client): a checkout polls a connection's replies nobody waits for (``send()``'s)
    under the pool's lock, a real lock. With gevent and TLS, that poll read with gevent's SSL read
    bounded by a zero timer, which, on part of a TLS record, waits for the rest: a greenlet switch
    with the lock held. The next greenlet to check out blocked the thread on the lock, so the hub
    (and every greenlet and timer with it) stood still for good. Now the poll never waits."""
    import subprocess

    from tests.support.system import ROOT, env, python_cmd

    try:
        out = subprocess.run([*python_cmd("-c", TRICKLING_TLS_REPLY), pki.ca, pki.server_cert, pki.server_key],
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the client's process froze (a checkout switched greenlets holding the pool's lock)")
    assert "finished 2" in out.stdout, out.stdout + out.stderr[-2000:]
