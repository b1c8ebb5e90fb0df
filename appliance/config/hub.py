"""The hub's ``hub.toml``: the school server's side (ingest, notifications, reports, API)."""

from __future__ import annotations

import ipaddress
from datetime import time
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from appliance.config.base import HHMM, NAME_PATTERN, MqttLink, Section, parse_hhmm, read_toml, validate
from appliance.config.gate import LoggingConfig, RosterConfig

DEFAULT_HUB_CONFIG_PATH = Path("/etc/edugate/hub.toml")


class HubSection(Section):
    id: str = Field("hub-1", pattern=NAME_PATTERN, description="this hub instance (client id, logs)")
    schools: list[str] = Field(
        default_factory=list, description="schools this hub serves; empty = every school on the broker"
    )
    timezone: str = "Asia/Ho_Chi_Minh"
    language: Literal["vi", "en"] = "vi"

    @field_validator("schools")
    @classmethod
    def _school_names(cls, value: list[str]) -> list[str]:
        import re

        bad = [s for s in value if not re.match(NAME_PATTERN, s)]
        if bad:
            raise ValueError(f"school ids are letters, digits, '_', '.', '-': {', '.join(bad)}")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Asia/Ho_Chi_Minh)") from exc
        return value


class DatabaseConfig(Section):
    """SQLite for one school; PostgreSQL for a district hub (``postgresql://user@host:5432/edugate``)."""

    url: str = Field("sqlite:////var/lib/edugate-hub/hub.db", description="sqlite:///PATH or postgresql://...")
    password_file: Path | None = Field(None, description="PostgreSQL password (or PGPASSWORD in the environment)")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not (value.startswith("sqlite:///") or value.startswith(("postgresql://", "postgres://"))):
            raise ValueError("use sqlite:////absolute/path.db or postgresql://user@host:5432/dbname")
        return value


DEFAULT_SHARED_GROUP = "hub"


class HubMqttConfig(MqttLink):
    username: str | None = Field("hub", description="broker user name of the hub")
    shared_group: str = Field(
        DEFAULT_SHARED_GROUP,
        pattern=NAME_PATTERN,
        description="MQTT 5 shared-subscription group: hub instances share the events (keep it secret)",
    )
    keepalive: int = Field(30, ge=2, le=3600)

    def guessable_names(self) -> list[str]:
        """Why the hub's names are ones a gate could guess, if they are.

        Mosquitto's acl_file cannot stop a gate from joining a $share group or connecting with another
        client's id; either makes the broker hand events meant for the hub to the gate, which may not
        read them, so they are dropped. Names that only the hub servers know close both doors.
        """
        reasons = []
        if self.shared_group == DEFAULT_SHARED_GROUP:
            reasons.append(
                f'mqtt.shared_group is the default "{DEFAULT_SHARED_GROUP}": a gate that joins that group takes '
                "a share of the events; use the random name `scripts/provision-gate --hub` prints"
            )
        if self.client_id is None:
            reasons.append(
                "mqtt.client_id is not set (so it is edugate-<hub.id>): a gate that connects with it ends the "
                "hub's session; use the random one `scripts/provision-gate --hub` prints"
            )
        return reasons


# The hub's template key used to default to the database's own folder, so one backup of that folder held
# both the sealed faces and the key that opens them; it now defaults to beside the signing key.
DEFAULT_TEMPLATE_KEY_FILE = Path("/etc/edugate/hub-templates.key")
OLD_TEMPLATE_KEY_FILE = Path("/var/lib/edugate-hub/templates.key")


def _is_file(path: Path) -> bool:
    """Whether ``path`` is there; a folder this user may not look into counts as no."""
    try:
        return path.is_file()
    except OSError:
        return False


class SigningConfig(Section):
    key_file: Path = Field(Path("/etc/edugate/hub-signing.key"), description="from `edugate sync keygen`")
    resync_after: float = Field(
        60.0, ge=1, description="seconds a gap in a gate's seq may stay open before the hub asks for it again"
    )
    template_key_file: Path = Field(
        default_factory=lambda: DEFAULT_TEMPLATE_KEY_FILE,
        description="AES key sealing the face templates in the hub's database (created 0600 on first use); "
        "keep it out of the database's folder, so that a copy of that folder gives no face away",
    )
    catch_up_every: float = Field(
        60.0,
        ge=0,
        description="seconds between the hub's looks for gates that missed a roster publish (a new gate, a "
        "replaced template key), which then get it; 0: only `edugate hub roster publish` sends",
    )

    @model_validator(mode="after")
    def _template_key_moved(self) -> SigningConfig:
        """A hub upgraded with its key at the old default must not start sealing faces with a new, empty key."""
        if (
            "template_key_file" not in self.model_fields_set
            and not _is_file(self.template_key_file)
            and _is_file(OLD_TEMPLATE_KEY_FILE)
        ):
            old, new = OLD_TEMPLATE_KEY_FILE, self.template_key_file
            raise ValueError(
                f"signing.template_key_file: the default moved from {old} (the default database's folder) to {new}; "
                f'move the file (mv {old} {new}) or set template_key_file = "{old}" in [signing]'
            )
        return self


class AttendanceConfig(Section):
    """When a student without an arrival counts as absent."""

    class_start: HHMM = Field(time(7, 15), description="default start of classes")
    class_start_by_class: dict[str, HHMM] = Field(default_factory=dict, description='e.g. {"6A" = "13:00"}')
    absent_after_minutes: int = Field(15, ge=0, le=600, description="cut-off after class start")
    school_days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default_factory=lambda: ["mon", "tue", "wed", "thu", "fri", "sat"],
        description="days with classes; on other days nobody is absent and no report is sent",
    )
    absent_hold_minutes: int = Field(
        60,
        ge=0,
        le=600,
        description="how long after the cut-off the absence decision waits for a gate of the school that is offline "
        "or still sending its backlog; past it absentees are recorded but their parents are not notified",
    )

    @field_validator("class_start", mode="before")
    @classmethod
    def _start(cls, value: Any) -> time:
        return parse_hhmm(value)

    @field_validator("class_start_by_class", mode="before")
    @classmethod
    def _by_class(cls, value: Any) -> dict[str, time]:
        if not isinstance(value, dict):
            raise ValueError('must be a table of class = "HH:MM"')
        return {str(k): parse_hhmm(v) for k, v in value.items()}


class WebhookConfig(Section):
    """An HTTP gateway for SMS/Zalo/app messages: one JSON POST per message, with an idempotency key."""

    url: str = Field(description="the SMS/Zalo/app gateway's endpoint (https://...)")
    token_file: Path | None = Field(None, description="bearer token sent as Authorization")
    timeout: float = Field(10.0, gt=0, le=120, description="seconds to connect, and to wait for each part of an answer")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


class SmtpConfig(Section):
    """E-mail to parents: one mail per parent address."""

    host: str = Field(min_length=1, description="the school's or provider's SMTP server")
    port: int = Field(587, ge=1, le=65535)
    starttls: bool = Field(True, description="upgrade the connection with STARTTLS (port 587)")
    implicit_tls: bool = Field(False, description="TLS from the first byte (SMTPS, port 465) instead of STARTTLS")
    ca_file: Path | None = Field(None, description="CA that signed the server's certificate (default: system CAs)")
    username: str | None = Field(None, description="login; the password comes from password_file")
    password_file: Path | None = None
    sender: str = Field(min_length=3, description='From: address, e.g. "Trường THCS <thongbao@truong.edu.vn>"')
    timeout: float = Field(20.0, gt=0, le=120)

    @model_validator(mode="after")
    def _consistent(self) -> SmtpConfig:
        if self.starttls and self.implicit_tls:
            raise ValueError("choose starttls (port 587) or implicit_tls (port 465), not both")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        return self


TEMPLATE_KINDS = ("arrival", "arrival_late", "departure", "absent")
TEMPLATE_PLACEHOLDERS = ("name", "time", "class", "date", "school", "minutes")


def check_template(text: str) -> None:
    """Refuse a message template that would fail when a parent's message is made (found at load, not at 7 am)."""
    import string

    allowed = ", ".join("{" + p + "}" for p in TEMPLATE_PLACEHOLDERS)
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
    for _, field, spec, conversion in fields:
        if field is None:
            continue
        if field not in TEMPLATE_PLACEHOLDERS:
            raise ValueError(f"unknown placeholder {{{field}}}; use {allowed}")
        if spec or conversion:
            raise ValueError(f"placeholders take no format or conversion: write {{{field}}}")
    if not text.strip():
        raise ValueError("a message template cannot be empty")


class NotifyConfig(Section):
    enabled: bool = False
    max_age_minutes: int = Field(
        60, ge=1, description="events older than this when they reach the hub notify nobody (night-time backlogs)"
    )
    max_attempts: int = Field(12, ge=1, le=100, description="delivery attempts before a message is marked failed")
    retry_min: float = Field(5.0, gt=0, description="first retry delay (seconds); doubles up to retry_max")
    retry_max: float = Field(600.0, gt=0)
    concurrency: int = Field(4, ge=1, le=32, description="deliveries in flight at once")
    templates: dict[Literal["arrival", "arrival_late", "departure", "absent"], str] = Field(
        default_factory=dict,
        description="message text per kind; {name}, {time}, {class}, {date}, {school}, {minutes} (late only)",
    )
    school_names: dict[str, str] = Field(
        default_factory=dict, description='{school} in messages, e.g. {"thcs-dong-da" = "Trường THCS Đống Đa"}'
    )
    webhook: WebhookConfig | None = None
    smtp: SmtpConfig | None = None

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        for kind, text in value.items():
            try:
                check_template(text)
            except ValueError as exc:
                raise ValueError(f"{kind}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _has_channel(self) -> NotifyConfig:
        if self.enabled and self.webhook is None and self.smtp is None:
            raise ValueError("notify.enabled needs a channel: [notify.webhook] and/or [notify.smtp]")
        if self.retry_max < self.retry_min:
            raise ValueError("retry_max must be at least retry_min")
        return self


# Every field name of the JSON the hub pushes to the city (appliance/hub/city.py): the keys field_mapping may rename.
CITY_FIELDS = (
    "school",
    "date",
    "generated_at",
    "school_day",
    "totals",
    "classes",
    "students",
    "staff",
    "class_name",
    "class_start",
    "cutoff",
    "total",
    "present",
    "late",
    "absent_permitted",
    "absent_unexcused",
    "pending",
    "person_id",
    "full_name",
    "status",
    "arrival",
    "departure",
    "minutes_late",
    "leave_reason",
    "first_in",
    "last_out",
)


class CityApiConfig(Section):
    """The city data centre's API; its specification is not public, so everything is configuration."""

    url: str = Field(description="endpoint that receives one school's daily report (POST, JSON)")
    token_file: Path | None = Field(None, description="bearer token sent as Authorization")
    timeout: float = Field(30.0, gt=0, le=300, description="seconds to wait for the server's answer")
    max_attempts: int = Field(10, ge=1, le=100, description="attempts before the day's push is marked failed")
    retry_min: float = Field(5.0, gt=0, le=3600, description="first retry delay (seconds); doubles up to retry_max")
    retry_max: float = Field(300.0, gt=0, le=3600, description="longest delay between two attempts (seconds)")
    field_mapping: dict[str, str] = Field(
        default_factory=dict,
        description='our field name -> the city\'s field name in the pushed JSON; "" leaves the field out',
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("field_mapping")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(CITY_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; ours are: {', '.join(CITY_FIELDS)}")
        targets = [v for v in value.values() if v]
        twice = sorted({v for v in targets if targets.count(v) > 1})
        if twice:
            raise ValueError(f"two of our fields would have the same name: {', '.join(twice)}")
        return value

    @model_validator(mode="after")
    def _retry_order(self) -> CityApiConfig:
        if self.retry_min > self.retry_max:
            raise ValueError("retry_min must not exceed retry_max")
        return self


class ReportConfig(Section):
    export_dir: Path = Field(
        Path("/var/lib/edugate-hub/reports"), description="where XLSX/CSV exports go (<export_dir>/<school>/<day>.*)"
    )
    send_at: HHMM = Field(time(16, 30), description="when the day's report is exported and pushed")
    city: CityApiConfig | None = None

    @field_validator("send_at", mode="before")
    @classmethod
    def _send_at(cls, value: Any) -> time:
        return parse_hhmm(value)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost): nothing on the network can listen in."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# The hub's MQTT client (paho) watches its socket with select(), which cannot take a file descriptor above
# 1023: the API's connections plus the rest of the hub must stay under that.
MAX_API_CONNECTIONS = 768


class ApiConfig(Section):
    """The hub's HTTP API for the school office and integrations (appliance/hub/api/, docs/security/api.md)."""

    enabled: bool = True
    listen: str = Field(
        "127.0.0.1", min_length=1, description="address of the HTTP API (0.0.0.0 or :: = every interface)"
    )
    port: int = Field(8780, ge=1, le=65535)
    token_file: Path | None = Field(
        None,
        description="one line per integration: TOKEN schools=SCHOOL[,SCHOOL...] rights=read[,write][,approve] "
        "(# starts a comment; tokens at least 16 characters); re-read when it changes; without it the API "
        "refuses every request",
    )
    workers: int = Field(8, ge=1, le=64, description="requests answered at once, each with its own database connection")
    tls_cert_file: Path | None = Field(None, description="serve HTTPS with this certificate chain (PEM)")
    tls_key_file: Path | None = Field(None, description="the certificate's private key (PEM)")
    allow_plaintext: bool = Field(
        False,
        description="DANGEROUS: serve plain HTTP on an address other than loopback; tokens and children's data "
        "then cross the network readable by anyone on it",
    )
    max_body_bytes: int = Field(
        65536, ge=1024, le=16 * 1024 * 1024, description="largest request body; a larger one is refused (413) unread"
    )
    max_connections: int = Field(
        256,
        ge=8,
        le=MAX_API_CONNECTIONS,
        description="connections open at once; at the limit the idle connection of the address holding the most "
        "is closed, or the new one if every connection is busy",
    )
    request_timeout: float = Field(
        15.0,
        ge=1,
        le=600,
        description="seconds a client has to send a whole request (its TLS handshake, headers and body) after "
        "connecting or after its previous answer; a slower connection is closed",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self

    @model_validator(mode="after")
    def _no_plaintext_on_the_network(self) -> ApiConfig:
        if self.enabled and self.tls_cert_file is None and not is_loopback(self.listen) and not self.allow_plaintext:
            raise ValueError(
                f"listen = {self.listen!r} without TLS would send tokens and children's data in plaintext over the "
                "network; set tls_cert_file and tls_key_file, or listen on 127.0.0.1 behind a TLS proxy, "
                "or (dangerous) set allow_plaintext = true"
            )
        return self


class HubConfig(Section):
    """The whole ``hub.toml``."""

    hub: HubSection = Field(default_factory=HubSection)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    mqtt: HubMqttConfig = Field(default_factory=lambda: HubMqttConfig(tls=False))
    signing: SigningConfig = Field(default_factory=SigningConfig)
    attendance: AttendanceConfig = Field(default_factory=AttendanceConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    roster: RosterConfig = Field(default_factory=RosterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.hub.timezone)


def parse_hub_config(data: dict[str, Any], source: str = "<hub config>") -> HubConfig:
    return validate(HubConfig, data, source)


def load_hub_config(path: Path) -> HubConfig:
    return parse_hub_config(read_toml(path, "config/hub.example.toml"), str(path))
