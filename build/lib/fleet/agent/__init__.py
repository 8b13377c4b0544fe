"""fleet-agent: runs on every server; stdlib, websockets and croniter only (CPython 3.9+)."""
