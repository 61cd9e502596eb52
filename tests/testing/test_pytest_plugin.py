"""The opt-in pytest plugin, run on a tiny project in a pytest subprocess (pytester): its fixtures serve the
project's application in process and in a ``geventtcp serve`` subprocess, and a crashed server fails the test."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]
pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

#: The tiny project's application.
APP = textwrap.dedent('''
    import os

    from geventtcp import Registry
    from geventtcp.errors import NotFound

    registry = Registry()

    @registry.handler(1)
    def whoami(request):
        return {"pid": os.getpid(), "patched": __import__("gevent.monkey").monkey.is_module_patched("socket")}

    @registry.handler(2)
    def lookup(request):
        raise NotFound("no such order", details={"id": request.params["id"]})

    @registry.handler(3)
    def die(request):
        os._exit(1)
''')

CONFTEST = 'pytest_plugins = ["geventtcp.testing.pytest_plugin"]\n'


def _project(pytester: pytest.Pytester, tests: str, ini: str = "geventtcp_app = svc\n") -> None:
    pytester.makepyfile(svc=APP)
    pytester.makeconftest(CONFTEST)
    pytester.makeini(f"[pytest]\n{ini}")
    pytester.makepyfile(test_svc=textwrap.dedent(tests))


def test_the_fixtures_serve_the_app_in_process_and_in_a_patched_subprocess(pytester: pytest.Pytester) -> None:
    _project(pytester, '''
        import os

        import pytest
        from geventtcp.errors import NotFound

        def test_in_process(geventtcp_testclient):
            assert geventtcp_testclient.call(1)["pid"] == os.getpid()
            with pytest.raises(NotFound) as exc:
                geventtcp_testclient.call(2, {"id": 7})
            assert exc.value.details == {"id": 7}

        def test_subprocess(geventtcp_server, geventtcp_client):
            reply = geventtcp_client.call(1)
            assert reply["patched"] is True and reply["pid"] not in (os.getpid(), geventtcp_server.pid)
            assert geventtcp_server.address.startswith("127.0.0.1:")
            with pytest.raises(NotFound):
                geventtcp_client.call(2, {"id": 1})

        @pytest.mark.geventtcp(workers=2, args=["--handler-timeout", "3"])
        def test_two_workers(geventtcp_server):
            stats = geventtcp_server.client.stats()
            assert len(stats["workers"]) == 2
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_a_worker_that_crashes_fails_the_test_at_teardown(pytester: pytest.Pytester) -> None:
    _project(pytester, '''
        import pytest
        from geventtcp.errors import MaybeExecuted

        def test_crash(geventtcp_client):
            with pytest.raises(MaybeExecuted):
                geventtcp_client.call(3)
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ServerFailed*Worker (pid:*) exited with code 1 while the test ran*"])


def test_an_app_that_cannot_start_fails_with_its_log(pytester: pytest.Pytester) -> None:
    _project(pytester, '''
        import pytest

        @pytest.mark.geventtcp(app="no_such_module")
        def test_start(geventtcp_client):
            pass

        def test_unconfigured(geventtcp_testclient):
            pass
    ''', ini="")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*ServerFailed*exited with status 3 before serving*",
                                 "*No module named 'no_such_module'*"])
    result.stdout.fnmatch_lines(["*no geventtcp application: set geventtcp_app*"])
