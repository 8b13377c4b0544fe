"""Due times: one ticker, and the sources of what becomes due."""
