"""Green/red LEDs and a buzzer on a Raspberry Pi's GPIO header, through gpiozero.

gpiozero is an optional extra (``pip install edugate[pi]``) imported only here; off a Pi,
tests run this same code against gpiozero's mock pin factory.
"""

from __future__ import annotations

from appliance.config import GpioConfig
from appliance.feedback.base import Ack, Outcome


class GpioFeedback:
    def __init__(self, config: GpioConfig) -> None:
        try:
            from gpiozero import LED, Buzzer
        except ImportError as exc:
            raise RuntimeError(
                "GPIO feedback needs gpiozero: pip install 'edugate[pi]' (or apt python3-gpiozero)"
            ) from exc
        self.config = config
        self.green = LED(config.green_led) if config.green_led is not None else None
        self.red = LED(config.red_led) if config.red_led is not None else None
        self.buzzer = Buzzer(config.buzzer) if config.buzzer is not None else None

    def same_pins(self, config: GpioConfig) -> bool:
        return (config.green_led, config.red_led, config.buzzer) == (
            self.config.green_led,
            self.config.red_led,
            self.config.buzzer,
        )

    def show(self, ack: Ack) -> None:
        on = self.config.on_seconds
        good = ack.outcome in (Outcome.OK, Outcome.REPEAT)
        led = self.green if good else self.red
        if led is not None:
            led.blink(on_time=on, off_time=0, n=1, background=True)
        if self.buzzer is not None:
            beeps = 1 if good else 3
            self.buzzer.beep(on_time=0.1, off_time=0.1, n=beeps, background=True)

    def close(self) -> None:
        for device in (self.green, self.red, self.buzzer):
            if device is not None:
                device.close()
