"""`trl-micro serve`: a MiCRo reward as an HTTP service for Ray-based RL engines (OpenRLHF, verl) and live feedback."""

from .app import ServeSettings, create_app, server_config
from .batcher import DynamicBatcher

__all__ = ["DynamicBatcher", "ServeSettings", "create_app", "server_config"]
