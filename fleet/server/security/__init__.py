"""Passwords, tokens, rate limits and secrets at rest."""
