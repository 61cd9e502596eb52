"""The database schema: ``schema.sql`` (one table, one index; idempotent), and the command that runs it.

``python -m orders.schema DATABASE_URL`` creates them (the first of the two commands that run the
service, docs/example.md); the tests call :func:`create_schema` on a database of their own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg

__all__ = ["SCHEMA", "create_schema"]

SCHEMA = Path(__file__).with_name("schema.sql")


def create_schema(database_url: str) -> None:
    """Create the table and index (a no-op when they exist)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SCHEMA.read_text())  # no parameters: psycopg sends the whole script as is


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m orders.schema DATABASE_URL", file=sys.stderr)
        return 2
    create_schema(argv[0])
    print("schema ready")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
