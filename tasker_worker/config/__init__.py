"""Configuration: pydantic models and the layered TOML loader."""

from tasker_worker.config.loader import LoadedConfig, load_config
from tasker_worker.config.models import DeploymentMode, TaskerConfig

__all__ = ["DeploymentMode", "LoadedConfig", "TaskerConfig", "load_config"]
