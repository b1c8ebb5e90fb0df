"""The face side of a gate, built from the config: models, engine, gallery and sealed templates together."""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from collections.abc import Callable

from appliance.config import VisionConfig
from appliance.journal.db import Database
from appliance.journal.roster_store import RosterStore
from appliance.journal.sealing import Sealer
from appliance.journal.template_store import TemplateStore
from appliance.vision.engine import FaceEngine
from appliance.vision.enroll import Enroller
from appliance.vision.gallery import Gallery
from appliance.vision.models import FacePack, load_pack
from appliance.vision.quality import QualityRules

log = logging.getLogger(__name__)


def release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    glibc keeps memory freed in the middle of its heap for later use, so a reload that decrypts thousands of
    rows would leave megabytes counted in the daemon's RSS for good on a gate that has little to spare.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class FaceService:
    def __init__(self, config: VisionConfig, database: Database, pack: FacePack | None = None) -> None:
        self.config = config
        self.pack = pack or load_pack(config)
        rules = QualityRules(min_face_px=config.min_face_px, min_sharpness=config.min_sharpness, max_yaw=config.max_yaw)
        self.engine = FaceEngine(self.pack, rules, config.detect_score, config.detect_max_side)
        self.templates = TemplateStore(database, Sealer.from_file(config.key_file))
        self.gallery = Gallery(config.match_threshold, config.match_margin, dim=self.pack.embedding_size)
        self.roster = RosterStore(database)
        self.skipped = 0
        self._version = -1
        self.reload()

    def reload(self) -> bool:
        """Load the gallery again if templates changed (enrollment runs in another process)."""
        version = self.templates.version()
        if version == self._version:
            return False
        loaded = self.templates.load_matrix(self.engine.model_name, self.pack.embedding_size)
        gallery = Gallery.from_rows(
            self.config.match_threshold, self.config.match_margin, loaded.rows, loaded.owners, loaded.people
        )
        self.gallery = gallery
        self._version = version
        self.skipped = loaded.skipped
        release_free_heap()  # what decrypting the rows and the previous gallery left behind
        log.info("face gallery loaded: %d people, %d templates", gallery.people, len(gallery))
        if loaded.skipped:
            log.warning(
                "face gallery: %d stored templates left out: not of %s's size (%d values) or sealed with another"
                " key; enroll those people again or publish their templates from the hub again",
                loaded.skipped,
                self.engine.model_name,
                self.pack.embedding_size,
            )
        return True

    def enroller(self) -> Enroller:
        keep = self.config.photos_dir if self.config.keep_photos else None
        return Enroller(self.engine, self.gallery, self.templates, self.roster, keep)
