"""Runtime: the worker, its event system (listener, poller) and the command processor."""
