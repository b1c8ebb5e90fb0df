"""Validated configuration: the gate's ``gate.toml`` and the hub's ``hub.toml``, defined once here.

Import config types from this package (``from appliance.config import GateConfig``); the
modules split them by who reads them: ``base`` (shared), ``gate``, ``hub``.
"""

from appliance.config.base import HHMM, ConfigError, MqttLink, Section, format_errors, parse_hhmm
from appliance.config.gate import (
    DEFAULT_CONFIG_PATH,
    ClockConfig,
    DeviceConfig,
    FeedbackConfig,
    GateConfig,
    GpioConfig,
    JournalConfig,
    LoggingConfig,
    PolicyConfig,
    ReaderConfig,
    RolePolicy,
    RosterColumns,
    RosterConfig,
    SoundConfig,
    SyncConfig,
    UidFormat,
    VisionConfig,
    load_config,
    parse_config,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "HHMM",
    "ClockConfig",
    "ConfigError",
    "DeviceConfig",
    "FeedbackConfig",
    "GateConfig",
    "GpioConfig",
    "JournalConfig",
    "LoggingConfig",
    "MqttLink",
    "PolicyConfig",
    "ReaderConfig",
    "RolePolicy",
    "RosterColumns",
    "RosterConfig",
    "Section",
    "SoundConfig",
    "SyncConfig",
    "UidFormat",
    "VisionConfig",
    "format_errors",
    "load_config",
    "parse_config",
    "parse_hhmm",
]
