"""`edugate hub absent | report | leave import`: the class teacher's list, the daily report, leave requests."""

from __future__ import annotations

import sys
from datetime import date, datetime
from pathlib import Path

import click

from appliance.cli.common import EXIT_FAILED, fail, friendly_errors
from appliance.cli.hub import hub_config_option
from appliance.cli.roster import reject_rows
from appliance.config import HubConfig, load_hub_config
from appliance.hub.store import Connection, migrated_connection

date_option = click.option(
    "--date",
    "day",
    type=click.DateTime(formats=["%Y-%m-%d", "%d/%m/%Y"]),
    default=None,
    help="The day (YYYY-MM-DD or dd/mm/yyyy); default today in the hub's time zone.",
)
school_option = click.option("--school", default=None, help="School id; needed when the hub serves several.")

TEXT = {
    "vi": {
        "present": "có mặt",
        "late": "đi muộn",
        "absent_permitted": "vắng có phép",
        "absent_unexcused": "vắng không phép",
        "pending": "chưa đến (trước giờ chốt)",
        "no_school": "ngày nghỉ",
        "header": "Lớp {klass}, {day} (chốt vắng {cutoff})",
        "none": "Không có học sinh vắng.",
        "minutes": "muộn {n} phút",
    },
    "en": {
        "present": "present",
        "late": "late",
        "absent_permitted": "absent with permission",
        "absent_unexcused": "absent without permission",
        "pending": "not arrived yet (before the cut-off)",
        "no_school": "no school",
        "header": "Class {klass}, {day} (absent after {cutoff})",
        "none": "Nobody is absent.",
        "minutes": "{n} min late",
    },
}


def _day(config: HubConfig, given: datetime | None) -> date:
    return given.date() if given is not None else datetime.now(config.zone).date()


def _school(conn: Connection, config: HubConfig, given: str | None) -> str:
    """The --school given, or the only school this hub serves."""
    from appliance.hub.attendance import schools

    known = schools(conn, config)
    if given is not None:
        if config.hub.schools and given not in config.hub.schools:
            fail(f"this hub does not serve school {given!r}; hub.schools = {', '.join(config.hub.schools)}")
        return given
    if len(known) == 1:
        return known[0]
    if not known:
        fail("no school known yet: set hub.schools in hub.toml or publish a roster first")
    fail(f"the hub serves several schools ({', '.join(known)}): choose one with --school")
    raise AssertionError("unreachable")


@click.command("absent")
@click.option("--class", "class_name", required=True, help="The class, e.g. 6A.")
@school_option
@date_option
@click.option("--all", "everyone", is_flag=True, help="List the whole class, not only the absent.")
@hub_config_option
@friendly_errors
def absent(class_name: str, school: str | None, day: datetime | None, everyone: bool, config_path: Path) -> None:
    """The class teacher's list: who is absent (with or without permission) and why."""
    from appliance.hub.attendance import (
        ABSENT_PERMITTED,
        ABSENT_UNEXCUSED,
        LATE,
        PENDING,
        class_day,
        classes,
        count,
        cutoff,
        local_time,
    )

    config = load_hub_config(config_path)
    text = TEXT[config.hub.language]
    the_day = _day(config, day)
    with migrated_connection(config.database) as conn:
        the_school = _school(conn, config, school)
        known = classes(conn, the_school)
        if class_name not in known:
            fail(f"no class {class_name!r} at {the_school}; classes: {', '.join(known) or '(no students yet)'}")
        students = class_day(conn, config, the_school, the_day, class_name)
    shown = students if everyone else [s for s in students if s.status in (ABSENT_UNEXCUSED, ABSENT_PERMITTED, PENDING)]
    header = text["header"].format(
        klass=class_name, day=the_day.strftime("%d/%m/%Y"), cutoff=cutoff(config, the_day, class_name).strftime("%H:%M")
    )
    counts = count(students)
    click.echo(header + ": " + ", ".join(f"{counts[k]} {text[k]}" for k in (ABSENT_UNEXCUSED, ABSENT_PERMITTED)))
    if not shown:
        click.echo(text["none"])
    width = max((len(s.full_name) for s in shown), default=0)
    for student in shown:
        detail = student.leave_reason or ""
        if student.status == LATE and student.minutes_late is not None:
            detail = text["minutes"].format(n=student.minutes_late)
        arrived = local_time(student.arrival_ts, config)
        when = arrived.strftime("%H:%M") if arrived else ""
        line = f"{student.person}\t{student.full_name.ljust(width)}\t{text[student.status]}"
        click.echo("\t".join(part for part in (line, when, detail) if part))


@click.command("report")
@date_option
@school_option
@click.option("--push", is_flag=True, help="Also send the day to the city's API ([report.city]).")
@click.option("--force", is_flag=True, help="Send again even if the city already accepted this day.")
@hub_config_option
@friendly_errors
def report(day: datetime | None, school: str | None, push: bool, force: bool, config_path: Path) -> None:
    """Write the day's XLSX and CSV report (and push it to the city with --push)."""
    from appliance.hub.attendance import schools
    from appliance.hub.city import CityError, push_day, report_record
    from appliance.hub.report import export_day

    config = load_hub_config(config_path)
    if push and config.report.city is None:
        fail("report.city is not configured: set [report.city] url (and token_file) in hub.toml")
    the_day = _day(config, day)
    failed = False
    with migrated_connection(config.database) as conn:
        targets = [_school(conn, config, school)] if school else schools(conn, config)
        if not targets:
            fail("no school known yet: set hub.schools in hub.toml or publish a roster first")
        for the_school in targets:
            files = export_day(conn, config, the_school, the_day)
            click.echo(str(files.xlsx))
            click.echo(str(files.csv))
            if not push:
                continue
            try:
                result = push_day(conn, config, the_school, the_day, force=force)
            except CityError as exc:
                fail(str(exc))
            where = f"{the_school} {the_day.isoformat()}"
            if result.status == "skipped_sent":
                record = report_record(conn, the_school, the_day) or {}
                click.echo(f"city: {where} already accepted at {record.get('sent_at')}; not sent again (--force)")
            elif result.status == "busy":
                failed = True
                click.echo(f"city: {where} is being sent by the running hub; wait, or use --force", err=True)
            elif result.status == "sent":
                click.echo(f"city: {where} accepted (HTTP {result.response_code}, attempt {result.attempts})")
            else:
                failed = True
                answer = f"HTTP {result.response_code}" if result.response_code is not None else "no answer"
                detail = (result.response or "").strip().splitlines()[:1]
                click.echo(
                    f"city: {where} {result.status} after {result.attempts} attempt(s): {answer}"
                    + (f": {detail[0][:200]}" if detail else ""),
                    err=True,
                )
    if failed:
        sys.exit(EXIT_FAILED)


@click.group("leave")
def leave() -> None:
    """Leave requests (đơn xin nghỉ): approved ones make an absence 'with permission'."""


@leave.command("import")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--school", required=True, help="The school the requests belong to.")
@hub_config_option
@friendly_errors
def leave_import(file: Path, school: str, config_path: Path) -> None:
    """Import leave requests from CSV/XLSX (all-or-nothing; every bad row is reported)."""
    from appliance.hub.leave import LeaveFileError, import_leave_file

    config = load_hub_config(config_path)
    with migrated_connection(config.database) as conn:
        try:
            parsed = import_leave_file(conn, school, file)
        except LeaveFileError as exc:
            fail(str(exc))
    reject_rows(file, parsed.errors)
    approved = sum(1 for r in parsed.requests if r.approved)
    click.echo(
        f"{file}: imported {len(parsed.requests)} leave request(s) for {school}: {approved} approved, "
        f"{len(parsed.requests) - approved} not approved"
    )
