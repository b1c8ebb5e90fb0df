"""What the hub's API answers and accepts: these models are the OpenAPI document's schemas.

Every field an integration may rely on is here, with its meaning; nothing else leaves the hub
(no card numbers, face scores or parents' contacts).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

STATUS_HELP = (
    "present (arrived on time, or only seen leaving), late, absent_permitted (approved leave), "
    "absent_unexcused (no arrival after the cut-off), pending (no arrival yet, before the cut-off), "
    "no_school (not a school day)"
)


class UTF8JSON(JSONResponse):
    """JSON with its charset spelled out: some office tools guess Latin-1 for Vietnamese text otherwise."""

    media_type = "application/json; charset=utf-8"


class ErrorOut(BaseModel):
    error: str = Field(description="what is wrong, in one line")


class Counts(BaseModel):
    present: int
    late: int
    absent_permitted: int
    absent_unexcused: int
    pending: int
    total: int = Field(description="active students; the five counts add up to it (except on a day with no school)")


class StudentOut(BaseModel):
    person: str = Field(description="the school's person id (Mã học sinh)")
    full_name: str
    status: str = Field(description=STATUS_HELP)
    arrival: str | None = Field(description="first arrival, ISO 8601 with the gate's offset")
    departure: str | None = Field(description="last departure, ISO 8601 with the gate's offset")
    minutes_late: int | None
    leave_reason: str | None = Field(description="reason of the approved leave request (absent_permitted only)")


class ClassAttendance(BaseModel):
    school: str
    class_name: str
    day: str = Field(description="YYYY-MM-DD")
    school_day: bool
    class_start: str = Field(description="HH:MM in the hub's time zone")
    cutoff: str = Field(description="HH:MM: a student without an arrival is absent after it")
    counts: Counts
    students: list[StudentOut] = Field(description="in class-list order (by given name)")


class ClassCounts(Counts):
    class_start: str
    cutoff: str


class StaffOut(BaseModel):
    person: str
    full_name: str
    first_in: str | None
    last_out: str | None
    minutes_late: int | None


class SchoolAttendance(BaseModel):
    school: str
    day: str
    school_day: bool
    classes: dict[str, ClassCounts] = Field(description="per class, in natural order (6A, 6B, 10A)")
    totals: Counts
    staff: list[StaffOut] = Field(description="staff clock-in (first arrival) and clock-out (last departure)")


class EventOut(BaseModel):
    id: str = Field(description="the event's unique id")
    ts: str = Field(description="when, ISO 8601 with the gate's offset")
    kind: str = Field(description="arrival, departure, tap, rejected, card_face_mismatch, ...")
    method: str = Field(description="card, face or card+face")
    gate: str = Field(description="the gate (device) that saw it")
    direction: str | None
    late: bool | None
    minutes_late: int | None
    clock_ok: bool = Field(description="false when the gate's clock was not synchronised")
    reason: str | None = Field(description="why a rejected event was rejected")


class PersonEvents(BaseModel):
    school: str
    person: str
    full_name: str | None = Field(description="null for someone no longer on the roster")
    role: str | None
    class_name: str | None
    events: list[EventOut] = Field(description="oldest first")
    next: str | None = Field(description="pass as ?cursor= for the following page; null on the last page")


class StreamOut(BaseModel):
    journal: str = Field(description="the gate's journal id (changes only when a damaged journal was rebuilt)")
    contiguous: int = Field(description="the hub holds every seq up to this one")
    highest: int = Field(description="highest seq the hub knows of (from events and the gate's status)")
    missing: int = Field(description="seq numbers between contiguous and highest the hub does not hold")
    gap_since: str | None = Field(description="since when the hub has seen a gap (UTC)")
    resync_requested_at: str | None = Field(description="when the hub last asked the gate to resend (UTC)")


class GateOut(BaseModel):
    gate: str
    school: str
    online: bool | None = Field(description="from its retained status / last will; null before any status")
    status_at: str | None = Field(description="when the hub received the gate's last status (UTC)")
    status_age_s: int | None = Field(description="seconds since then")
    gate_clock_ok: bool | None
    version: str | None
    backlog: int | None = Field(description="events on the gate not yet acknowledged by the broker, per its status")
    oldest_unsynced_age_s: int | None = Field(description="age of the oldest of them when the status was sent")
    last_seq: int | None
    offline_reason: str | None
    readers: list[dict[str, str]] = Field(description="card readers and their states")
    gap: bool = Field(description="the hub is missing events of this gate")
    missing: int
    resync_requested: bool = Field(description="the hub has asked the gate to resend what is missing")
    streams: list[StreamOut]


class Gates(BaseModel):
    gates: list[GateOut]


class Health(BaseModel):
    status: str = Field(description="ok")
    version: str
    hub: str
    database: str
    time: str
    gates: dict[str, int] = Field(description="total, online, with_gap")


class LeaveIn(BaseModel):
    """A leave request for one student or staff member, approved or pending (waiting for the office)."""

    model_config = ConfigDict(extra="forbid")

    person: str = Field(min_length=1, max_length=64, description="person id on the school's roster")
    day_from: str = Field(description="first day, YYYY-MM-DD")
    day_to: str | None = Field(None, description="last day, YYYY-MM-DD (default: the first day)")
    reason: str | None = Field(None, max_length=500)
    approved: bool | None = Field(
        None,
        description="only approved requests make an absence 'with permission'; true needs a token with the approve "
        "right; left out: approved if the token has that right, else pending",
    )


class LeaveOut(BaseModel):
    id: str = Field(description="the same person and days always give the same id; sending again updates it")
    school: str
    person: str
    day_from: str
    day_to: str
    reason: str | None
    approved: bool = Field(description="false: pending, it excuses no one until approved")
    created: bool = Field(description="false when an existing request was updated")
