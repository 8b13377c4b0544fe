"""Fleet: central management of restic backups for a fleet of servers."""

__version__ = "0.1.0"
