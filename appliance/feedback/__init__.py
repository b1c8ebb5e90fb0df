"""What the person at the gate sees and hears once their tap is recorded (or not)."""

from appliance.feedback.base import Ack, Feedback, MultiFeedback, Outcome, build_feedback

__all__ = ["Ack", "Feedback", "MultiFeedback", "Outcome", "build_feedback"]
