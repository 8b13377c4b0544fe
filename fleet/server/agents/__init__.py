"""The agent side of fleetd: enrollment, sessions (sockets only), ingest of reports."""
