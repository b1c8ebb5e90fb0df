"""What a gate keeps and writes about people: no parents' contacts at rest, no names in its logs.

Real parts: ``edugate roster import`` and ``edugate run`` as subprocesses, the journal read back as bytes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon_harness import REPO, DaemonProcess, send_taps, write_config

from appliance.journal import open_database
from appliance.journal.roster_store import RosterStore

PEOPLE = [  # id, name, card, parent's phone as written in the file, as stored once normalised, e-mail
    ("HS001", "Nguyễn Thị Ánh Dương", "04A1B2C3D4E5F6", "0912 345 678", "912345678", "duong.phuhuynh@example.vn"),
    ("HS002", "Trần Quốc Bảo", "04A1B2C3D4E5F7", "+84 987 654 321", "987654321", "bao.gia.dinh@example.vn"),
    ("GV001", "Lê Minh Khôi", "04A1B2C3D4E5F8", "", "", ""),
]


def edugate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def roster_file(path: Path) -> Path:
    rows = ["Mã định danh,Họ và tên,Lớp,Vai trò,Mã thẻ,SĐT phụ huynh,Email phụ huynh"]
    for pid, name, card, phone, _, email in PEOPLE:
        role = "Giáo viên" if pid.startswith("GV") else "Học sinh"
        rows.append(f"{pid},{name},{'' if role == 'Giáo viên' else '6A'},{role},{card},{phone},{email}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def journal_bytes(journal: Path) -> bytes:
    """Everything SQLite has on disk for this journal: the file, its WAL and shared memory."""
    return b"".join(p.read_bytes() for p in sorted(journal.parent.glob(journal.name + "*")) if p.is_file())


def assert_no_contacts(journal: Path) -> None:
    database = open_database(journal, readonly=True)
    try:
        rows = database.conn.execute("SELECT parent_phones, parent_emails FROM persons").fetchall()
    finally:
        database.close()
    assert len(rows) == len(PEOPLE) and set(rows) == {("[]", "[]")}
    stored = journal_bytes(journal)
    assert "Nguyễn Thị Ánh Dương".encode() in stored  # the bytes searched are the roster's
    for _, _, _, _, digits, email in PEOPLE[:2]:
        assert digits.encode() not in stored and email.encode() not in stored and b"example.vn" not in stored


def test_a_roster_imported_at_the_gate_keeps_no_parents_phones_or_emails(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    result = edugate("roster", "import", str(roster_file(tmp_path / "roster.csv")), "--journal", str(journal))
    assert result.returncode == 0, result.stderr
    assert "imported 3 people: 3 added" in result.stdout
    assert_no_contacts(journal)
    again = edugate("roster", "import", str(roster_file(tmp_path / "roster.csv")), "--journal", str(journal))
    assert "0 added, 0 updated, 3 unchanged" in again.stdout  # contacts in the file are not a change either


def test_contacts_an_older_gate_kept_are_removed_when_the_daemon_opens_the_journal(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    assert (
        edugate("roster", "import", str(roster_file(tmp_path / "roster.csv")), "--journal", str(journal)).returncode
        == 0
    )
    database = open_database(journal)  # what an older version wrote
    for pid, _, _, _, digits, email in PEOPLE:
        phones, emails = (f'["+84{digits}"]', f'["{email}"]') if digits else ("[]", "[]")
        database.conn.execute(
            "UPDATE persons SET parent_phones = ?, parent_emails = ? WHERE id = ?", [phones, emails, pid]
        )
    database.close()
    assert b"duong.phuhuynh@example.vn" in journal_bytes(journal)

    config = write_config(
        tmp_path / "gate.toml", journal, [{"name": "lane", "type": "socket", "path": str(tmp_path / "l.sock")}]
    )
    daemon = DaemonProcess(config).start()
    assert daemon.stop() == 0
    assert_no_contacts(journal)
    assert "removed parents' phones and e-mails of 2 people" in "\n".join(daemon.stderr_lines)
    database = open_database(journal, readonly=True)
    try:
        assert RosterStore(database).by_card("04A1B2C3D4E5F6").full_name == "Nguyễn Thị Ánh Dương"
    finally:
        database.close()


def test_the_daemons_stdout_and_stderr_carry_no_names_when_they_are_not_a_terminal(tmp_path: Path) -> None:
    """Under systemd stdout is the system journal: the console line is for the screen at the gate only."""
    journal = tmp_path / "journal.db"
    assert (
        edugate("roster", "import", str(roster_file(tmp_path / "roster.csv")), "--journal", str(journal)).returncode
        == 0
    )
    lane = tmp_path / "lane.sock"
    config = write_config(tmp_path / "gate.toml", journal, [{"name": "lane", "type": "socket", "path": str(lane)}])
    config.write_text(config.read_text().replace("show_names = false", "show_names = true"))
    daemon = DaemonProcess(config).start()
    try:
        cards = [card for _, _, card, *_ in PEOPLE]
        send_taps(lane, [*cards, cards[0], "0BADCAFE"])  # arrivals, a repeat, an unknown card
        daemon.wait_for(lambda: len(daemon.stdout_lines) >= 5, what="five console lines")
    finally:
        daemon.stop()
    out = "\n".join(daemon.stdout_lines + daemon.stderr_lines)
    for pid, name, card, *_ in PEOPLE:
        for part in (name, *name.split(), pid, card):
            assert part not in out, f"{part!r} in the daemon's output:\n{out}"
    assert sum("Xin chào Bạn! Đã điểm danh vào lúc" in line for line in daemon.stdout_lines) == 3
    assert "Bạn: đã ghi nhận rồi" in daemon.stdout_lines[3] and "Thẻ chưa được đăng ký" in daemon.stdout_lines[4]
