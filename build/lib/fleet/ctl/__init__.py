"""fleetctl: the operator command line (click + rich)."""
