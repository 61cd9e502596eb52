"""The orders example service: ``geventtcp serve orders`` from ``examples/orders`` (docs/example.md).

``registry`` is the application built from the ``ORDERS_*`` environment variables
(:mod:`orders.config`); :func:`create_app` builds one from a given :class:`~orders.config.Config`.
Importing connects nothing: each worker opens its pool and redis client in ``post_worker_init``.
"""

from orders.app import create_app
from orders.config import Config

__all__ = ["Config", "create_app", "registry"]

registry = create_app()
