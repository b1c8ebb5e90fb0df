"""The words shown and spoken at the gate, Vietnamese first."""

from __future__ import annotations

from appliance.events import Kind
from appliance.feedback.base import Ack, Outcome

_TEXT = {
    "vi": {
        Kind.ARRIVAL: "Xin chào {name}! Đã điểm danh vào lúc {time}",
        Kind.DEPARTURE: "Tạm biệt {name}! Đã điểm danh ra lúc {time}",
        Kind.TAP: "{name}: đã ghi nhận lúc {time}",
        "late": " (muộn {minutes} phút)",
        Outcome.REPEAT: "{name}: đã ghi nhận rồi, không cần chạm lại",
        Outcome.UNKNOWN: "Thẻ chưa được đăng ký. Vui lòng gặp nhân viên nhà trường",
        Outcome.REJECTED: "Thẻ không còn hiệu lực. Vui lòng gặp nhân viên nhà trường",
        Outcome.ERROR: "Lỗi hệ thống: chưa ghi nhận. Vui lòng chạm thẻ lại",
        "ok": "OK",
        "someone": "Bạn",
    },
    "en": {
        Kind.ARRIVAL: "Hello {name}! Checked in at {time}",
        Kind.DEPARTURE: "Goodbye {name}! Checked out at {time}",
        Kind.TAP: "{name}: recorded at {time}",
        "late": " ({minutes} min late)",
        Outcome.REPEAT: "{name}: already recorded, no need to tap again",
        Outcome.UNKNOWN: "Card not registered. Please see the school staff",
        Outcome.REJECTED: "Card no longer valid. Please see the school staff",
        Outcome.ERROR: "System error: not recorded. Please tap again",
        "ok": "OK",
        "someone": "You",
    },
}


def message(ack: Ack, language: str, show_names: bool = True) -> str:
    text = _TEXT.get(language, _TEXT["vi"])
    name = ack.name if (show_names and ack.name) else text["someone"]
    if ack.outcome is Outcome.OK and ack.kind is not None:
        line = text[ack.kind].format(name=name, time=ack.time_text)
        if ack.kind is Kind.ARRIVAL and ack.minutes_late > 0:
            line += text["late"].format(minutes=ack.minutes_late)
        return line
    return text[ack.outcome].format(name=name)
