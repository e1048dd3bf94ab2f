"""Running one task: import it, run it under its timeout, capture result, error and logs, report."""
