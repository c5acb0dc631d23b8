"""Domain types: plain data with no I/O (steps, outcomes, notifications, names)."""
