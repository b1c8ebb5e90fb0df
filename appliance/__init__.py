"""edugate: the software of a school-gate attendance appliance."""

__version__ = "0.1.0"
