"""Making a rename or a new file survive a power cut: the folder that names it is synced too."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """fsync a directory, so the entries created or renamed in it are on disk (a file's own fsync is not enough)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
