"""The words parents receive: Vietnamese by default, English when ``hub.language = "en"``.

A school may replace any of them in ``[notify.templates]``; the placeholders are checked when
hub.toml is loaded (``appliance.config.hub.check_template``), so rendering here cannot fail.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config import HubConfig

DEFAULTS: dict[str, dict[str, str]] = {
    "vi": {
        "arrival": "{school}: em {name} đã đến trường lúc {time} ngày {date}.",
        "arrival_late": "{school}: em {name} đã đến trường muộn lúc {time} ngày {date} (muộn {minutes} phút).",
        "departure": "{school}: em {name} đã ra về lúc {time} ngày {date}.",
        "absent": (
            "{school}: em {name} vắng mặt không phép ngày {date}. "
            "Kính mong phụ huynh liên hệ giáo viên chủ nhiệm lớp {class}."
        ),
    },
    "en": {
        "arrival": "{school}: {name} arrived at school at {time} on {date}.",
        "arrival_late": "{school}: {name} arrived late at {time} on {date} ({minutes} min late).",
        "departure": "{school}: {name} left school at {time} on {date}.",
        "absent": (
            "{school}: {name} is absent without permission on {date}. Please contact the teacher of class {class}."
        ),
    },
}

SUBJECTS: dict[str, dict[str, str]] = {
    "vi": {
        "arrival": "Điểm danh: {name} đã đến trường",
        "arrival_late": "Điểm danh: {name} đến trường muộn",
        "departure": "Điểm danh: {name} đã ra về",
        "absent": "Điểm danh: {name} vắng mặt không phép",
    },
    "en": {
        "arrival": "Attendance: {name} arrived at school",
        "arrival_late": "Attendance: {name} arrived late",
        "departure": "Attendance: {name} left school",
        "absent": "Attendance: {name} absent without permission",
    },
}


@dataclass(frozen=True)
class Facts:
    """What a message may say about one child on one day."""

    name: str
    class_name: str | None
    school: str
    day: str  # YYYY-MM-DD
    time: str  # HH:MM, local
    minutes_late: int = 0


def _date_text(day: str, language: str) -> str:
    year, month, dom = day.split("-")
    return f"{dom}/{month}/{year}" if language == "vi" else day


def render(config: HubConfig, template: str, facts: Facts) -> tuple[str, str]:
    """(subject, text) of one message; ``template`` is a key of DEFAULTS (arrival_late for a late arrival)."""
    language = config.hub.language
    values = {
        "name": facts.name,
        "time": facts.time,
        "class": facts.class_name or "",
        "date": _date_text(facts.day, language),
        "school": config.notify.school_names.get(facts.school, facts.school),
        "minutes": str(facts.minutes_late),
    }
    custom: dict[str, str] = dict(config.notify.templates)
    text = custom.get(template) or DEFAULTS[language][template]
    subject = SUBJECTS[language][template].format_map(values)
    return subject, text.format_map(values)
