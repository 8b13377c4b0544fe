"""Modules shared by fleetd, fleetctl and the agent: pure, stdlib only, CPython 3.9+."""
