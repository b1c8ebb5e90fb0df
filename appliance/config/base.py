"""What every edugate config shares: strict sections, one-line errors, TOML loading, the MQTT link.

Every section forbids unknown keys, so a typo in a school's config is an error naming the file,
the key and what is allowed, never a silently ignored setting.
"""

from __future__ import annotations

import re
import tomllib
from datetime import time
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

_TIME_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ConfigError(Exception):
    """A configuration that cannot be used; the message is meant for the school's IT person."""


def parse_hhmm(value: Any) -> time:
    """Parse "HH:MM" (24 h) into a time; TOML local times are accepted as they are."""
    if isinstance(value, time):
        return value
    if not isinstance(value, str) or not _TIME_RE.match(value):
        raise ValueError(f'must be a time as "HH:MM" (24-hour), got {value!r}')
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


HHMM = Annotated[time, Field(json_schema_extra={"format": "HH:MM"})]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttLink(Section):
    """Where and how to reach the school's broker: shared by a gate's [sync] and the hub's [mqtt].

    Secrets come from files (``password_file``) or the environment, never from the config text,
    so the file can be shown to anyone.
    """

    host: str = Field("127.0.0.1", min_length=1, description="the school's MQTT broker")
    port: int = Field(8883, ge=1, le=65535)
    tls: bool = Field(True, description="TLS with the pinned ca_file; plaintext only to loopback or if allowed")
    allow_plaintext: bool = Field(False, description="allow tls = false to a non-loopback broker (not advised)")
    ca_file: Path | None = Field(None, description="the school CA that signed the broker's certificate (pinned)")
    cert_file: Path | None = Field(None, description="client certificate, instead of or besides a password")
    key_file: Path | None = Field(None, description="client certificate's private key")
    username: str | None = Field(None, description="broker user name")
    password_file: Path | None = Field(None, description="file holding the broker password (mode 0600)")
    topic_prefix: str = Field("edugate", pattern=NAME_PATTERN)
    client_id: str | None = Field(None, description="MQTT client id")
    keepalive: int = Field(30, ge=2, le=3600, description="seconds; a silent broker is dropped after ~1.5x this")
    window: int = Field(
        100, ge=1, le=65535, description="messages published but not yet acknowledged (the broker may cap it)"
    )
    backoff_min: float = Field(1.0, gt=0, le=60, description="first reconnect delay (seconds)")
    backoff_max: float = Field(60.0, gt=0, le=3600, description="reconnect delay ceiling (seconds)")
    session_expiry: int = Field(7 * 24 * 3600, ge=0, description="seconds the broker keeps this client's session")

    def link_active(self) -> bool:
        """Whether the link settings must be complete (a disabled gate sync may be half filled)."""
        return True

    @model_validator(mode="after")
    def _safe_transport(self) -> MqttLink:
        if not self.link_active():
            return self
        if not self.tls and self.host.lower() not in LOOPBACK_HOSTS and not self.allow_plaintext:
            raise ValueError(
                f"tls = false would send data in plaintext to {self.host}; use TLS (tls = true, ca_file) "
                "or set allow_plaintext = true if the network is private"
            )
        if self.tls and self.ca_file is None:
            raise ValueError("tls = true needs ca_file (the school CA that signed the broker's certificate)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.cert_file is not None and not self.tls:
            raise ValueError("client certificates need tls = true")
        if self.backoff_max < self.backoff_min:
            raise ValueError("backoff_max must be at least backoff_min")
        return self


def describe_allowed(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """Allowed keys of the table that holds ``loc``'s last element (for unknown-key errors)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", {})
        info = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        if info is None:
            return ""
        annotation = info.annotation
        args = getattr(annotation, "__args__", ())
        current = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if current is None:
            return ""
    keys = [f.alias or name for name, f in current.model_fields.items()]
    return ", ".join(sorted(keys))


def format_errors(source: str, error: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem: ``file: key.path: what is wrong (what is allowed)``."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        if item["type"] == "extra_forbidden":
            allowed = describe_allowed(model, loc)
            message = f"unknown key; allowed here: {allowed}" if allowed else "unknown key"
        else:
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] not in {"value_error", "missing"} and "input" in item:
                message += f" (got {item['input']!r})"
        lines.append(f"{source}: {key or '(top level)'}: {message}")
    return "\n".join(lines)


Model = TypeVar("Model", bound=BaseModel)


def validate(model: type[Model], data: dict[str, Any], source: str) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(source, exc, model)) from None


# A config is a few kilobytes, its tables a few levels deep. Far more is no config: tomllib would recurse until
# RecursionError on deep nesting, and the error report's repr() of a deep value would too.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_DEPTH = 16


def _depth(data: Any) -> int:
    """How deeply tables and arrays nest, counted without recursion (the point is to refuse what would recurse)."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > MAX_CONFIG_DEPTH:
            break
        if isinstance(value, dict):
            stack.extend((item, level + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, level + 1) for item in value)
    return deepest


def read_toml(path: Path, example: str) -> dict[str, Any]:
    """A TOML file as a dict, or a ConfigError naming the file and what to do."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, so not a config; is it the right file?"
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (pass --config FILE or create it from {example})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    too_deep = f"{path}: tables or arrays nested more than {MAX_CONFIG_DEPTH} deep; start again from {example}"
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(too_deep) from None
    if _depth(data) > MAX_CONFIG_DEPTH:
        raise ConfigError(too_deep)
    return data
