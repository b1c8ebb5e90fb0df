"""Detect -> align -> quality gate -> embed, for one image: the step shared by enrollment, the gate and benches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from appliance.vision.align import align_face
from appliance.vision.detect import DEFAULT_SCORE_THRESHOLD, Face
from appliance.vision.models import FacePack
from appliance.vision.quality import Quality, QualityRules, assess


@dataclass(frozen=True)
class FaceObservation:
    face: Face
    quality: Quality
    embedding: np.ndarray | None  # None when the quality gate refused the face


class FaceEngine:
    def __init__(
        self,
        pack: FacePack,
        rules: QualityRules | None = None,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        max_side: int | None = 640,
    ) -> None:
        self.pack = pack
        self.rules = rules or QualityRules()
        self.score_threshold = score_threshold
        self.max_side = max_side

    @property
    def model_name(self) -> str:
        """The recognizer's name, under which templates are stored and loaded (never mixed across models)."""
        return self.pack.model_name

    @property
    def embedding_size(self) -> int:
        return self.pack.embedding_size

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        return self.pack.detect(image_bgr, self.score_threshold, self.max_side)

    def observe(self, image_bgr: np.ndarray, faces: list[Face] | None = None) -> list[FaceObservation]:
        """Every face in the image, best detection first; only faces passing the gate are embedded (one batch)."""
        faces = self.detect(image_bgr) if faces is None else faces
        crops, assessed = [], []
        for face in faces:
            crop = align_face(image_bgr, face.landmarks)
            assessed.append((face, assess(face.size, face.landmarks, crop, self.rules)))
            crops.append(crop)
        good = [i for i, (_, quality) in enumerate(assessed) if quality.ok]
        if good:
            embeddings = self.pack.embed(np.stack([crops[i] for i in good]))
        else:
            embeddings = np.zeros((0, self.pack.embedding_size), np.float32)
        by_index = dict(zip(good, embeddings, strict=True))
        return [FaceObservation(face, quality, by_index.get(i)) for i, (face, quality) in enumerate(assessed)]

    def embed_face(self, image_bgr: np.ndarray, face: Face) -> np.ndarray:
        """The embedding of one given face, whatever its quality (benchmarks, accuracy)."""
        return self.pack.embed(align_face(image_bgr, face.landmarks)[None])[0]
