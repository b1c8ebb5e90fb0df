"""The face side of a gate, built from the config: models, engine, gallery and sealed templates together."""

from __future__ import annotations

import logging

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


class FaceService:
    def __init__(self, config: VisionConfig, database: Database, pack: FacePack | None = None) -> None:
        self.config = config
        self.pack = pack or load_pack(config)
        rules = QualityRules(min_face_px=config.min_face_px, min_sharpness=config.min_sharpness, max_yaw=config.max_yaw)
        self.engine = FaceEngine(self.pack, rules, config.detect_score, config.detect_max_side)
        self.templates = TemplateStore(database, Sealer.from_file(config.key_file))
        self.gallery = Gallery(config.match_threshold, config.match_margin, dim=self.pack.embedding_size)
        self.roster = RosterStore(database)
        self._version = -1
        self.reload()

    def reload(self) -> bool:
        """Load the gallery again if templates changed (enrollment runs in another process)."""
        version = self.templates.version()
        if version == self._version:
            return False
        gallery = Gallery(self.config.match_threshold, self.config.match_margin, dim=self.pack.embedding_size)
        for person, rows in self.templates.load(self.engine.model_name).items():
            gallery.add(person, rows)
        self.gallery = gallery
        self._version = version
        log.info("face gallery loaded: %d people, %d templates", gallery.people, len(gallery))
        return True

    def enroller(self) -> Enroller:
        keep = self.config.photos_dir if self.config.keep_photos else None
        return Enroller(self.engine, self.gallery, self.templates, self.roster, keep)
