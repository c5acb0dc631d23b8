"""Worker registration, heartbeats, supervision jobs and the event log (Postgres as control plane)."""
