"""The gate's ``gate.toml``: validated sections, loaded and checked before anything starts."""

from __future__ import annotations

from datetime import time
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from appliance.config.base import HHMM, NAME_PATTERN, MqttLink, Section, parse_hhmm, read_toml, validate
from appliance.events import Direction

DEFAULT_CONFIG_PATH = Path("/etc/edugate/gate.toml")

UidFormat = Literal["hex", "hex_reversed", "dec10", "dec10_reversed"]


class DeviceConfig(Section):
    id: str = Field("gate-01", pattern=NAME_PATTERN)
    school: str = Field("school", pattern=NAME_PATTERN)
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


class JournalConfig(Section):
    path: Path = Path("/var/lib/edugate/journal.db")
    retention_days: int = Field(30, ge=1, le=3650, description="synced events older than this are pruned")
    min_free_mb: int = Field(200, ge=1, description="below this much free disk, status and logs warn loudly")


class ReaderConfig(Section):
    name: str = Field(pattern=NAME_PATTERN)
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


class RolePolicy(Section):
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


class PolicyConfig(Section):
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


class SoundConfig(Section):
    command: list[str] = Field(default_factory=lambda: ["aplay", "-q"], min_length=1)
    speak: bool = Field(False, description="also speak the name with espeak-ng")


class GpioConfig(Section):
    green_led: int | None = Field(17, ge=0, le=40)
    red_led: int | None = Field(27, ge=0, le=40)
    buzzer: int | None = Field(22, ge=0, le=40)
    on_seconds: float = Field(0.8, gt=0, le=10)


class FeedbackConfig(Section):
    outputs: list[Literal["console", "sound", "gpio"]] = Field(default_factory=lambda: ["console"])
    show_names: bool = Field(True, description="show the person's name on the console at the gate")
    sound: SoundConfig = Field(default_factory=SoundConfig)
    gpio: GpioConfig = Field(default_factory=GpioConfig)


class ClockConfig(Section):
    assume_synced: bool = Field(False, description="trust the clock without NTP (only with a battery-backed RTC)")


class RosterColumns(Section):
    """Header names in the school's export, overriding the built-in Vietnamese/English aliases."""

    id: str | None = None
    full_name: str | None = None
    class_name: str | None = Field(None, alias="class")
    role: str | None = None
    active: str | None = None
    cards: str | None = None
    parent_phone: str | None = None
    parent_email: str | None = None


class RosterConfig(Section):
    card_format: Literal["auto", "hex", "hex_reversed", "dec10", "dec10_reversed"] = "auto"
    classes: list[str] = Field(default_factory=list, description="known classes; empty accepts any")
    columns: RosterColumns = Field(default_factory=RosterColumns)
    sheet: str | None = Field(None, description="XLSX sheet name; default the first sheet")


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class VisionConfig(Section):
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


class SyncConfig(MqttLink):
    """MQTT store-and-forward to the school hub (topics and payloads: README "Sync").

    The password may also come from the ``EDUGATE_MQTT_PASSWORD`` environment variable.
    """

    enabled: bool = Field(False, description="send journalled events to the hub and take its instructions")
    username: str | None = Field(None, description="broker user name; default: the device id")
    client_id: str | None = Field(None, description="MQTT client id; default edugate-<device id>")
    batch: int = Field(500, ge=1, le=10000, description="events read from the journal at a time while draining")
    status_interval: float = Field(30.0, ge=1, le=3600, description="seconds between retained status messages")
    hub_public_key: str | None = Field(None, description="the hub's Ed25519 public key, base64 (32 bytes)")
    hub_public_key_file: Path | None = Field(None, description="or a file holding it (base64 or PEM)")

    def link_active(self) -> bool:
        return self.enabled

    @model_validator(mode="after")
    def _one_hub_key(self) -> SyncConfig:
        if self.hub_public_key and self.hub_public_key_file:
            raise ValueError("give hub_public_key or hub_public_key_file, not both")
        return self


class GateConfig(Section):
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


def parse_config(data: dict[str, Any], source: str = "<config>") -> GateConfig:
    """Validate an already-parsed TOML document."""
    return validate(GateConfig, data, source)


def load_config(path: Path) -> GateConfig:
    """Read and validate a gate.toml, with errors that name the file and the key."""
    return parse_config(read_toml(path, "config/gate.example.toml"), str(path))
