"""What every agent of a process shares: settings, broker address, registry, metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline.metrics import Metrics
from pipeline.registry import Registry
from pipeline.settings import Settings

log = logging.getLogger("inferline")


@dataclass
class Runtime:
    """Per-process context handed to the router and the workers."""

    settings: Settings
    bootstrap_servers: str
    registry: Registry
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def worker_id(self) -> str:
        """Name this process signs its responses with."""
        return self.settings.worker_id

    @classmethod
    def build(cls, settings: Settings, bootstrap_servers: str) -> Runtime:
        """Load the registry named by the settings."""
        return cls(settings, bootstrap_servers, Registry.load(settings.registry_path))
