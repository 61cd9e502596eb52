"""Command ids of the example application, in one place for handlers, clients and tests."""

import enum


class CmdId(enum.IntEnum):
    ECHO = 1
    SLEEP = 2
    FAIL = 3
    TEST = 10000  # the seed's TEST_CMDID
