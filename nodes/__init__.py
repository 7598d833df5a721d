"""Node runtime: the only code that reads raw records."""
