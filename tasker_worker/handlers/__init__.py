"""Handlers: the registry, the step context, and the built-in handlers."""
