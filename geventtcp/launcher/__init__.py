"""The launcher: a master process (``arbiter``) that binds once (``listeners``), forks and
supervises worker processes (``supervisor``, ``worker``), turns signals into actions (``signals``)
and serves merged metrics (``metrics``, ``metrics_endpoint``), in gunicorn's design.
"""
