"""Deployment configuration: the YAML schema, loading, and checks against a model.

Importing this package imports no torch.
"""

from mstar.config.deployment import (
    DeploymentConfig,
    KVCacheConfig,
    NodeGroup,
    NodeHosts,
    SchedulerConfig,
    with_preset_cap,
)
from mstar.config.loader import load_config, packaged_configs, parse_overrides
from mstar.config.validate import (
    DTYPES,
    ConfigError,
    NodePlacement,
    Placement,
    placement,
    validate_for_model,
)

__all__ = [
    "DTYPES",
    "ConfigError",
    "DeploymentConfig",
    "KVCacheConfig",
    "NodeGroup",
    "NodeHosts",
    "NodePlacement",
    "Placement",
    "SchedulerConfig",
    "load_config",
    "packaged_configs",
    "parse_overrides",
    "placement",
    "validate_for_model",
    "with_preset_cap",
]
