"""Validated configuration of a gate: loaded from TOML, checked before anything starts.

Every section is a pydantic model that forbids unknown keys, so a typo in a school's
``gate.toml`` is an error naming the file, the key and what is allowed, never a silently
ignored setting.
"""

from __future__ import annotations

import re
import tomllib
from datetime import time
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.events import Direction

DEFAULT_CONFIG_PATH = Path("/etc/edugate/gate.toml")

UidFormat = Literal["hex", "hex_reversed", "dec10", "dec10_reversed"]
_TIME_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceConfig(_Section):
    id: str = Field("gate-01", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    school: str = Field("school", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    timezone: str = "Asia/Ho_Chi_Minh"
    language: Literal["vi", "en"] = "vi"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Asia/Ho_Chi_Minh)") from exc
        return value


class JournalConfig(_Section):
    path: Path = Path("/var/lib/edugate/journal.db")
    retention_days: int = Field(30, ge=1, le=3650, description="synced events older than this are pruned")
    min_free_mb: int = Field(200, ge=1, description="below this much free disk, status and logs warn loudly")


class ReaderConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    type: Literal["pcsc", "wedge", "socket"]
    direction: Direction = Direction.AUTO
    match: str | None = Field(None, description="pcsc: text contained in the PC/SC reader name")
    device: str | None = Field(None, description="wedge: /dev/input/... path of the reader")
    uid_format: UidFormat | None = Field(
        None, description="how the reader writes UIDs; default dec10_reversed for wedge, hex for socket"
    )
    path: Path | None = Field(None, description="socket: unix socket that receives UIDs, one per line")

    @model_validator(mode="after")
    def _needs_its_address(self) -> ReaderConfig:
        needed = {"pcsc": "match", "wedge": "device", "socket": "path"}[self.type]
        if getattr(self, needed) is None:
            raise ValueError(f"a {self.type} reader needs '{needed}'")
        return self

    @property
    def uid_text_format(self) -> str:
        return self.uid_format or ("dec10_reversed" if self.type == "wedge" else "hex")


class RolePolicy(_Section):
    arrival_window: tuple[HHMM, HHMM]
    departure_window: tuple[HHMM, HHMM]
    start: HHMM
    late_grace_minutes: int = Field(0, ge=0, le=240)

    @field_validator("arrival_window", "departure_window", mode="before")
    @classmethod
    def _window(cls, value: Any) -> tuple[time, time]:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError('must be a pair of times, e.g. ["06:00", "08:30"]')
        first, last = parse_hhmm(value[0]), parse_hhmm(value[1])
        if not first < last:
            raise ValueError(f"window must start before it ends, got {value[0]} .. {value[1]}")
        return first, last

    @field_validator("start", mode="before")
    @classmethod
    def _start(cls, value: Any) -> time:
        return parse_hhmm(value)


def _student_defaults() -> RolePolicy:
    return RolePolicy(arrival_window=("05:30", "11:00"), departure_window=("11:00", "19:30"), start="07:15")


def _staff_defaults() -> RolePolicy:
    return RolePolicy(arrival_window=("05:00", "11:00"), departure_window=("11:00", "21:00"), start="07:00")


class PolicyConfig(_Section):
    debounce_seconds: float = Field(30.0, ge=0, le=3600)
    student: RolePolicy = Field(default_factory=_student_defaults)
    staff: RolePolicy = Field(default_factory=_staff_defaults)
    class_start: dict[str, HHMM] = Field(
        default_factory=dict, description="per-class start time overriding student.start (afternoon shifts)"
    )

    @field_validator("class_start", mode="before")
    @classmethod
    def _class_start(cls, value: Any) -> dict[str, time]:
        if not isinstance(value, dict):
            raise ValueError('must be a table of class = "HH:MM"')
        return {str(k): parse_hhmm(v) for k, v in value.items()}


class SoundConfig(_Section):
    command: list[str] = Field(default_factory=lambda: ["aplay", "-q"], min_length=1)
    speak: bool = Field(False, description="also speak the name with espeak-ng")


class GpioConfig(_Section):
    green_led: int | None = Field(17, ge=0, le=40)
    red_led: int | None = Field(27, ge=0, le=40)
    buzzer: int | None = Field(22, ge=0, le=40)
    on_seconds: float = Field(0.8, gt=0, le=10)


class FeedbackConfig(_Section):
    outputs: list[Literal["console", "sound", "gpio"]] = Field(default_factory=lambda: ["console"])
    show_names: bool = Field(True, description="show the person's name on the console at the gate")
    sound: SoundConfig = Field(default_factory=SoundConfig)
    gpio: GpioConfig = Field(default_factory=GpioConfig)


class ClockConfig(_Section):
    assume_synced: bool = Field(False, description="trust the clock without NTP (only with a battery-backed RTC)")


class RosterColumns(_Section):
    """Header names in the school's export, overriding the built-in Vietnamese/English aliases."""

    id: str | None = None
    full_name: str | None = None
    class_name: str | None = Field(None, alias="class")
    role: str | None = None
    active: str | None = None
    cards: str | None = None
    parent_phone: str | None = None
    parent_email: str | None = None


class RosterConfig(_Section):
    card_format: Literal["auto", "hex", "hex_reversed", "dec10", "dec10_reversed"] = "auto"
    classes: list[str] = Field(default_factory=list, description="known classes; empty accepts any")
    columns: RosterColumns = Field(default_factory=RosterColumns)
    sheet: str | None = Field(None, description="XLSX sheet name; default the first sheet")


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class VisionConfig(_Section):
    """Face recognition: models, decision thresholds, quality gate, template storage.

    ``match_threshold`` is the cosine similarity a face needs to be identified; calibrate it per
    model with ``edugate bench accuracy`` (the threshold at FAR 1e-3 on your data); the default
    sits between the worst genuine pair (0.56) and the best impostor pair (0.28) of SFace on the
    test photos, above OpenCV's published 0.363 because a gate compares against everyone (1:N).

    ``pack`` picks the models: ``"default"`` is YuNet + SFace as ``edugate models install`` put them
    in ``models_dir``; ``"insightface"`` is an InsightFace pack folder (buffalo_l, antelopev2 ...)
    that IT copied into ``insightface_dir``. Templates are stored per recognizer, so switching packs
    means enrolling again (and calibrating ``match_threshold`` for the new model).
    """

    enabled: bool = Field(False, description="load the models and use the camera at the gate")
    match_threshold: float = Field(0.42, ge=-1, le=1)
    match_margin: float = Field(0.05, ge=0, le=2, description="best person must beat the runner-up by this much")
    detect_score: float = Field(0.8, gt=0, lt=1)
    detect_max_side: int = Field(640, ge=160, le=4096, description="frames are shrunk to this before detection")
    min_face_px: int = Field(48, ge=16, le=1024)
    min_sharpness: float = Field(30.0, ge=0)
    max_yaw: float = Field(0.35, gt=0, le=1, description="nose offset from the eyes' midline, in eye distances")
    key_file: Path = Field(Path("/var/lib/edugate/templates.key"), description="template encryption key (0600)")
    keep_photos: bool = Field(False, description="keep enrollment photos (off: only templates are kept)")
    photos_dir: Path = Path("/var/lib/edugate/photos")
    camera: str = Field("/dev/video0", description="V4L2 device, video file, rtsp:// or http:// URL, or picamera2")
    camera_direction: Direction = Field(Direction.AUTO, description="lane direction of staff face clock-in")
    card_face: Literal["warn", "refuse"] = Field(
        "warn", description="a card tapped with someone else's face: record it and warn, or refuse the check-in"
    )
    unknown_face_events: bool = Field(True, description="journal an unknown_face event per pass of a stranger")

    models_dir: Path = Field(Path("/var/lib/edugate/models"), description="where `edugate models install` put them")
    intra_op_threads: int = Field(2, ge=1, le=16, description="onnxruntime threads per model call")
    providers: list[Literal["cpu", "cuda", "tensorrt"]] = Field(
        default_factory=lambda: ["cpu"],
        min_length=1,
        description="execution providers in order of preference; missing ones fall back to cpu with a warning",
    )
    pack: Literal["default", "insightface"] = Field(
        "default", description='"default" (YuNet + SFace in models_dir) or "insightface" (a pack in insightface_dir)'
    )
    insightface_dir: Path | None = Field(
        None, description='with pack = "insightface": the folder of the pack IT copied in, e.g. .../buffalo_l'
    )

    @field_validator("pack", mode="before")
    @classmethod
    def _known_pack(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("default", "insightface"):
            raise ValueError(
                f'unknown pack {value!r}: use "default" (YuNet + SFace from `edugate models install`) '
                'or "insightface" with insightface_dir = the folder holding the pack\'s .onnx files'
            )
        return value

    @model_validator(mode="after")
    def _pack_has_its_folder(self) -> VisionConfig:
        if self.pack == "insightface" and self.insightface_dir is None:
            raise ValueError(
                'pack = "insightface" needs insightface_dir, the folder IT copied the pack into '
                "(e.g. /var/lib/edugate/insightface/buffalo_l)"
            )
        if self.pack == "default" and self.insightface_dir is not None:
            raise ValueError('insightface_dir is used only with pack = "insightface"; set pack or remove the key')
        return self


_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


class SyncConfig(_Section):
    """MQTT store-and-forward to the school hub (topics and payloads: README "Sync").

    Secrets come from files (``password_file``) or the ``EDUGATE_MQTT_PASSWORD`` environment
    variable, never from the config text itself, so the file can be shown to anyone.
    """

    enabled: bool = Field(False, description="send journalled events to the hub and take its instructions")
    host: str = Field("127.0.0.1", min_length=1, description="the school's MQTT broker")
    port: int = Field(8883, ge=1, le=65535)
    tls: bool = Field(True, description="TLS with the pinned ca_file; plaintext only to loopback or if allowed")
    allow_plaintext: bool = Field(False, description="allow tls = false to a non-loopback broker (not advised)")
    ca_file: Path | None = Field(None, description="the school CA that signed the broker's certificate (pinned)")
    cert_file: Path | None = Field(None, description="client certificate, instead of or besides a password")
    key_file: Path | None = Field(None, description="client certificate's private key")
    username: str | None = Field(None, description="broker user name; default: the device id")
    password_file: Path | None = Field(None, description="file holding the broker password (mode 0600)")
    topic_prefix: str = Field("edugate", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    client_id: str | None = Field(None, description="MQTT client id; default edugate-<device id>")
    keepalive: int = Field(30, ge=2, le=3600, description="seconds; a silent broker is dropped after ~1.5x this")
    window: int = Field(
        100, ge=1, le=65535, description="events published but not yet acknowledged (the broker may cap it)"
    )
    batch: int = Field(500, ge=1, le=10000, description="events read from the journal at a time while draining")
    status_interval: float = Field(30.0, ge=1, le=3600, description="seconds between retained status messages")
    backoff_min: float = Field(1.0, gt=0, le=60, description="first reconnect delay (seconds)")
    backoff_max: float = Field(60.0, gt=0, le=3600, description="reconnect delay ceiling (seconds)")
    session_expiry: int = Field(7 * 24 * 3600, ge=0, description="seconds the broker keeps this gate's session")
    hub_public_key: str | None = Field(None, description="the hub's Ed25519 public key, base64 (32 bytes)")
    hub_public_key_file: Path | None = Field(None, description="or a file holding it (base64 or PEM)")

    @model_validator(mode="after")
    def _safe_transport(self) -> SyncConfig:
        if not self.enabled:
            return self
        if not self.tls and self.host.lower() not in _LOOPBACK_HOSTS and not self.allow_plaintext:
            raise ValueError(
                f"tls = false would send check-ins in plaintext to {self.host}; use TLS (tls = true, ca_file) "
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
        if self.hub_public_key and self.hub_public_key_file:
            raise ValueError("give hub_public_key or hub_public_key_file, not both")
        return self


class GateConfig(_Section):
    """The whole ``gate.toml``."""

    device: DeviceConfig = Field(default_factory=DeviceConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    readers: list[ReaderConfig] = Field(default_factory=list)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    clock: ClockConfig = Field(default_factory=ClockConfig)
    roster: RosterConfig = Field(default_factory=RosterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    vision: VisionConfig = Field(default_factory=VisionConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)

    @model_validator(mode="after")
    def _unique_reader_names(self) -> GateConfig:
        names = [r.name for r in self.readers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reader names must be unique, repeated: {', '.join(dupes)}")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.device.timezone)


def _describe_allowed(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
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
            allowed = _describe_allowed(model, loc)
            message = f"unknown key; allowed here: {allowed}" if allowed else "unknown key"
        else:
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] not in {"value_error", "missing"} and "input" in item:
                message += f" (got {item['input']!r})"
        lines.append(f"{source}: {key or '(top level)'}: {message}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> GateConfig:
    """Validate an already-parsed TOML document."""
    try:
        return GateConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(source, exc, GateConfig)) from None


def load_config(path: Path) -> GateConfig:
    """Read and validate a gate.toml, with errors that name the file and the key."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file (pass --config FILE or create it from config/gate.example.toml)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path))
