"""Database layer: embedded server, connections, migrations, and the thin queue client."""
