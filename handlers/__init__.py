"""The example application: importing it registers its handlers in ``geventtcp.urls``."""

from . import cmdids, example  # noqa: F401  (imported for their @urls.handler registrations)
