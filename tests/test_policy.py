"""Attendance policy: arrival/departure windows, late, debounce, unknown and inactive cards."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from appliance.config import parse_config
from appliance.events import Direction, Kind
from appliance.policy import AttendancePolicy
from appliance.roster.model import Person, Role

VN = ZoneInfo("Asia/Ho_Chi_Minh")
AN = Person("HS001", "Nguyễn Văn An", Role.STUDENT, "6A", cards=("AA01",))
DUC = Person("HS003", "Lê Hoàng Đức", Role.STUDENT, "6B", cards=("AA03",))
BAO = Person("GV001", "Đặng Quốc Bảo", Role.STAFF, None, cards=("AA09",))
GONE = Person("HS004", "Phạm Minh Châu", Role.STUDENT, "7A", active=False, cards=("AA04",))


def at(hhmm: str, day: int = 23) -> datetime:
    hours, minutes = map(int, hhmm.split(":"))
    return datetime(2026, 11, day, hours, minutes, tzinfo=VN)


@pytest.fixture
def policy() -> AttendancePolicy:
    config = parse_config(
        {
            "policy": {
                "debounce_seconds": 30,
                "student": {
                    "arrival_window": ["06:00", "11:00"],
                    "departure_window": ["11:00", "18:00"],
                    "start": "07:15",
                    "late_grace_minutes": 5,
                },
                "staff": {
                    "arrival_window": ["05:00", "11:00"],
                    "departure_window": ["11:00", "21:00"],
                    "start": "07:00",
                },
                "class_start": {"6B": "13:00"},
            }
        }
    )
    return AttendancePolicy(config.policy)


def decide(
    policy: AttendancePolicy,
    person: Person | None,
    when: datetime,
    direction: Direction = Direction.AUTO,
    uid: str | None = None,
    mono: float = 0.0,
):
    uid = uid or (person.cards[0] if person else "FFFF0000")
    return policy.decide(uid, person, "lane", direction, when, True, detected=mono)


def test_first_morning_tap_is_arrival_on_time_within_grace(policy: AttendancePolicy) -> None:
    decision = decide(policy, AN, at("07:19"))
    assert decision.draft.kind is Kind.ARRIVAL
    assert decision.draft.late is False and decision.draft.minutes_late == 0
    assert decision.draft.person == "HS001" and decision.draft.card_uid == "AA01"
    assert decision.draft.ts == "2026-11-23T07:19:00.000+07:00"


def test_late_after_start_plus_grace(policy: AttendancePolicy) -> None:
    draft = decide(policy, AN, at("07:31")).draft
    assert draft.kind is Kind.ARRIVAL and draft.late is True and draft.minutes_late == 16


def test_class_start_override_for_afternoon_shift(policy: AttendancePolicy) -> None:
    draft = decide(policy, DUC, at("10:50")).draft
    assert draft.kind is Kind.ARRIVAL and draft.late is False


def test_second_morning_tap_after_debounce_is_plain_tap(policy: AttendancePolicy) -> None:
    decide(policy, AN, at("07:00"), mono=0)
    assert decide(policy, AN, at("07:05"), mono=300).draft.kind is Kind.TAP


def test_repeat_inside_debounce_acknowledged_without_event(policy: AttendancePolicy) -> None:
    decide(policy, AN, at("07:00"), mono=100.0)
    repeat = decide(policy, AN, at("07:00"), mono=129.0)
    assert repeat.draft is None and repeat.repeat_of is Kind.ARRIVAL and repeat.person == AN
    assert decide(policy, AN, at("07:01"), mono=131.0).draft is not None


def test_afternoon_tap_is_departure_once(policy: AttendancePolicy) -> None:
    decide(policy, AN, at("07:00"), mono=0)
    assert decide(policy, AN, at("16:30"), mono=1000).draft.kind is Kind.DEPARTURE
    assert decide(policy, AN, at("16:40"), mono=2000).draft.kind is Kind.TAP


def test_departure_without_arrival_still_counts(policy: AttendancePolicy) -> None:
    assert decide(policy, AN, at("16:30")).draft.kind is Kind.DEPARTURE


def test_lane_direction_wins_over_windows(policy: AttendancePolicy) -> None:
    assert decide(policy, AN, at("07:00"), Direction.OUT, mono=0).draft.kind is Kind.DEPARTURE
    late_in = decide(policy, AN, at("13:30"), Direction.IN, mono=1000).draft
    assert late_in.kind is Kind.ARRIVAL and late_in.minutes_late == 375


def test_in_then_out_lane_within_debounce_are_two_events(policy: AttendancePolicy) -> None:
    assert decide(policy, AN, at("07:00"), Direction.IN, mono=0).draft.kind is Kind.ARRIVAL
    assert decide(policy, AN, at("07:00"), Direction.OUT, mono=5).draft.kind is Kind.DEPARTURE


def test_outside_every_window_is_recorded_as_tap(policy: AttendancePolicy) -> None:
    assert decide(policy, AN, at("19:00")).draft.kind is Kind.TAP


def test_staff_windows_apply_to_staff(policy: AttendancePolicy) -> None:
    draft = decide(policy, BAO, at("05:30")).draft
    assert draft.kind is Kind.ARRIVAL and draft.role == "staff" and draft.late is False
    assert decide(policy, BAO, at("20:30"), mono=99999).draft.kind is Kind.DEPARTURE


def test_unknown_card_event_and_debounce(policy: AttendancePolicy) -> None:
    draft = decide(policy, None, at("07:00"), uid="DEADBEEF").draft
    assert draft.kind is Kind.UNKNOWN_CARD and draft.person is None and draft.card_uid == "DEADBEEF"
    assert decide(policy, None, at("07:00"), uid="DEADBEEF", mono=1).draft is None


def test_inactive_person_rejected(policy: AttendancePolicy) -> None:
    draft = decide(policy, GONE, at("07:00")).draft
    assert draft.kind is Kind.REJECTED and draft.reason == "inactive" and draft.person == "HS004"


def test_new_day_resets_memory(policy: AttendancePolicy) -> None:
    decide(policy, AN, at("07:00"), mono=0)
    assert decide(policy, AN, at("07:00", day=24), mono=86400).draft.kind is Kind.ARRIVAL


def test_memory_reseeded_from_journal_rows_after_restart(policy: AttendancePolicy) -> None:
    now = at("07:10")
    rows = [("arrival", "HS001", "AA01", (now - timedelta(seconds=10)).isoformat(), "auto")]
    policy.remember(rows, now)
    mono = time.monotonic()
    assert decide(policy, AN, now, mono=mono).draft is None  # still inside the debounce window
    assert decide(policy, AN, at("07:20"), mono=mono + 600).draft.kind is Kind.TAP  # already arrived today


def test_forget_lets_a_failed_commit_be_retried(policy: AttendancePolicy) -> None:
    draft = decide(policy, AN, at("07:00"), mono=0).draft
    policy.forget("AA01", draft)
    assert decide(policy, AN, at("07:00"), mono=1).draft.kind is Kind.ARRIVAL
