"""How a planned message leaves the hub: one small interface, an HTTP webhook and SMTP behind it.

A channel's ``send`` never raises: it answers ``sent``, ``retry`` (the other side may take it
later: 5xx, 408, 429, timeouts, refused connections) or ``failed`` (it never will: the answer is
kept so the office can see why). Secrets (token, SMTP password) are read from their files at
every delivery, so replacing a file needs no restart.
"""

from __future__ import annotations

import json
import re
import smtplib
import ssl
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from pathlib import Path
from typing import Any, Literal, Protocol

import requests

from appliance import __version__
from appliance.config import ConfigError, NotifyConfig, SmtpConfig, WebhookConfig

ANSWER_KEPT = 500  # characters of a gateway's answer kept in outbox.last_error


@dataclass(frozen=True)
class Outgoing:
    """One outbox row as a channel needs it."""

    key: str
    school: str
    person: str
    day: str
    kind: str
    recipients: tuple[str, ...]
    body: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    status: Literal["sent", "retry", "failed"]
    detail: str | None = None  # recorded in outbox.last_error (may quote the gateway: not for logs)
    summary: str = ""  # for the log: no personal data
    retry_after: float | None = None  # the other side asked for this delay (HTTP Retry-After)


class Channel(Protocol):
    name: str
    timeout: float

    def send(self, message: Outgoing) -> Outcome: ...


def _read_secret(path: Path, what: str) -> str:
    try:
        return path.read_text("utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror}") from None


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


class WebhookChannel:
    """POST one JSON object per message; the key travels in the body and in the ``Idempotency-Key`` header."""

    name = "webhook"

    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self.timeout = config.timeout
        if config.token_file is not None:
            _read_secret(config.token_file, "notify.webhook.token_file")  # refuse to start without it
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def payload(self, message: Outgoing) -> dict[str, Any]:
        return {
            "key": message.key,
            "school": message.school,
            "student": message.person,
            "day": message.day,
            "kind": message.kind,
            "time": message.body.get("time"),
            "late": message.body.get("late", False),
            "language": message.body.get("language"),
            "recipients": list(message.recipients),
            "subject": message.body.get("subject"),
            "text": message.body.get("text"),
        }

    def send(self, message: Outgoing) -> Outcome:
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Idempotency-Key": message.key,
            "User-Agent": f"edugate-hub/{__version__}",
        }
        try:
            if self.config.token_file is not None:
                headers["Authorization"] = "Bearer " + _read_secret(self.config.token_file, "notify.webhook.token_file")
        except ConfigError as exc:
            return Outcome("retry", str(exc), "token file unreadable")
        data = json.dumps(self.payload(message), ensure_ascii=False).encode("utf-8")
        try:
            answer = self._session().post(
                self.config.url, data=data, headers=headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.Timeout:
            return Outcome("retry", f"no answer within {self.timeout:g} s", "timeout")
        except requests.ConnectionError as exc:
            return Outcome("retry", f"connection failed: {_connection_reason(exc)}", "connection failed")
        except requests.RequestException as exc:
            return Outcome("failed", f"request not sent: {_first_line(exc)}", "request not sent")
        code = answer.status_code
        text = answer.text[:ANSWER_KEPT]
        detail = f"HTTP {code}: {text}" if text else f"HTTP {code}"
        if 200 <= code < 300:
            return Outcome("sent", None, f"HTTP {code}")
        if code in (408, 429) or code >= 500:
            return Outcome("retry", detail, f"HTTP {code}", _retry_after(answer.headers.get("Retry-After")))
        if 300 <= code < 400:
            where = answer.headers.get("Location", "?")
            return Outcome("failed", f"HTTP {code}: redirected to {where}; fix notify.webhook.url", f"HTTP {code}")
        return Outcome("failed", detail, f"HTTP {code}")


def _connection_reason(exc: requests.ConnectionError) -> str:
    """The cause under requests' and urllib3's wrappers ("[Errno 111] Connection refused"), not a paragraph."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    text = str(reason or exc)
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    return found.group(0).strip() if found else _first_line(exc)[:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SmtpChannel:
    """One e-mail per parent address, UTF-8 subject and body, STARTTLS or implicit TLS, login from a file."""

    name = "smtp"

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self.timeout = config.timeout
        if config.password_file is not None:
            _read_secret(config.password_file, "notify.smtp.password_file")
        self._domain = parseaddr(config.sender)[1].rpartition("@")[2] or "edugate.invalid"

    def _tls_context(self) -> ssl.SSLContext:
        if self.config.ca_file is not None:
            return ssl.create_default_context(cafile=str(self.config.ca_file))
        return ssl.create_default_context()

    def _connect(self) -> smtplib.SMTP:
        cfg = self.config
        server: smtplib.SMTP
        if cfg.implicit_tls:
            server = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=self.timeout, context=self._tls_context())
        else:
            server = smtplib.SMTP(cfg.host, cfg.port, timeout=self.timeout)
        try:
            server.ehlo()
            if cfg.starttls:
                server.starttls(context=self._tls_context())
                server.ehlo()
            if cfg.username is not None and cfg.password_file is not None:
                server.login(cfg.username, _read_secret(cfg.password_file, "notify.smtp.password_file"))
        except BaseException:
            server.close()
            raise
        return server

    def mail(self, message: Outgoing, address: str) -> EmailMessage:
        mail = EmailMessage()
        mail["Subject"] = str(message.body.get("subject", ""))
        mail["From"] = self.config.sender
        mail["To"] = address
        mail["Date"] = formatdate(localtime=True)
        mail["Message-ID"] = f"<{message.key}@{self._domain}>"
        mail["Auto-Submitted"] = "auto-generated"
        mail.set_content(str(message.body.get("text", "")), charset="utf-8")
        return mail

    def send(self, message: Outgoing) -> Outcome:
        try:
            server = self._connect()
        except smtplib.SMTPAuthenticationError as exc:
            return Outcome("retry", f"SMTP login refused: {exc.smtp_code} {_smtp_text(exc)}", "login refused")
        except ConfigError as exc:
            return Outcome("retry", str(exc), "password file unreadable")
        except (smtplib.SMTPException, OSError) as exc:
            return Outcome("retry", f"SMTP {self.config.host}:{self.config.port}: {_first_line(exc)}", "no session")
        try:
            for address in message.recipients:
                server.send_message(self.mail(message, address))
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            answers = "; ".join(f"{code} {_decode(text)}" for code, text in exc.recipients.values())
            status: Literal["retry", "failed"] = "failed" if all(c >= 500 for c in codes) else "retry"
            return Outcome(status, f"recipient refused: {answers}", f"recipient refused ({codes[0]})")
        except smtplib.SMTPResponseException as exc:
            status = "failed" if exc.smtp_code >= 500 else "retry"
            return Outcome(status, f"SMTP {exc.smtp_code} {_smtp_text(exc)}", f"SMTP {exc.smtp_code}")
        except (smtplib.SMTPException, OSError) as exc:
            return Outcome("retry", f"SMTP: {_first_line(exc)}", "session lost")
        finally:
            try:
                server.quit()
            except (smtplib.SMTPException, OSError):
                server.close()
        return Outcome("sent", None, "250")


def _decode(text: bytes | str) -> str:
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else text


def _smtp_text(exc: smtplib.SMTPResponseException) -> str:
    return _decode(exc.smtp_error)[:ANSWER_KEPT]


def build_channels(config: NotifyConfig) -> dict[str, Channel]:
    """The configured channels by name (what the outbox's ``channel`` column holds)."""
    channels: dict[str, Channel] = {}
    if config.webhook is not None:
        channels["webhook"] = WebhookChannel(config.webhook)
    if config.smtp is not None:
        channels["smtp"] = SmtpChannel(config.smtp)
    return channels
