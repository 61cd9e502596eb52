"""``python -m geventtcp``: the same as the ``geventtcp`` console script."""

import sys

from geventtcp.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
