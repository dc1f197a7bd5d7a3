"""HTTP routes: deposit commands, reads (transfers, balances, statements), ops (health, metrics)."""
