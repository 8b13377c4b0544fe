"""The integration harness lives in tests/conftest.py (shared with tests/e2e):
fixtures `fx`, `fleet` (one fleetd per module) and `fleetd_factory`."""
