"""The control-plane HTTP API (Starlette + uvicorn): worker registry, queues, health, metrics."""

from tasker_worker.api.app import ApiContext, create_app

__all__ = ["ApiContext", "create_app"]
