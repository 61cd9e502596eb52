"""A one-process server for tests.support.client_app (``python -m tests.support.client_app_server PORT``),
so that a test can kill or restart exactly the process that holds the client's connections."""

from gevent import monkey

monkey.patch_all()

import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from geventtcp import Server  # noqa: E402
from tests.support.client_app import registry  # noqa: E402


def main() -> None:
    server = Server(registry, bind=f"127.0.0.1:{sys.argv[1]}", graceful_timeout=10)
    server.start()
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(server.stop))
    print(f"listening on {server.addresses[0]}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
