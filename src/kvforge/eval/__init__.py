"""Tasks, metrics and reports for measuring policies."""
