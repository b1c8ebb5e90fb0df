"""The gate's SQLite database: events (durability lives here alone), roster, later templates."""

from appliance.journal.db import JournalError, JournalLocked, open_database
from appliance.journal.events import EventJournal

__all__ = ["EventJournal", "JournalError", "JournalLocked", "open_database"]
