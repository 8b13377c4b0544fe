"""restic: command builders and output parsers (pure), and one execute module."""
