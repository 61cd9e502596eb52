"""Start the example application, as SCTornadoTCP's ``python manage.py`` did.

Takes the same flags as ``geventtcp serve`` (``python manage.py --bind 127.0.0.1:9000 --workers 2``).
"""

import sys

from geventtcp.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["serve", "handlers", *sys.argv[1:]]))
