"""Exit statuses of every Fleet program, defined once.

Shell scripts and cron wrappers branch on these, so they are an interface:
never renumber one. The man pages document the same table.
"""

import enum


class Exit(enum.IntEnum):
    OK = 0
    ERROR = 1  # a job failed, or an error not covered below
    USAGE = 2  # bad command line or invalid input
    AUTH = 3  # not authenticated, or not allowed
    NOT_FOUND = 4
    UNREACHABLE = 5  # the server could not be reached
    INTERRUPTED = 130
    # fleetctl status, read as a monitoring check does (Nagios' meaning); the
    # same numbers as ERROR and USAGE, which status never exits with for those
    WARNING = 1  # something needs looking at: a stale lock, no recent check
    CRITICAL = 2  # a backup failed or is overdue, a host is offline, a check failed
