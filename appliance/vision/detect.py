"""Face detection with YuNet: decode the raw head outputs into boxes, 5 landmarks and scores, then NMS.

YuNet 2023mar is anchor-free with one prior per cell at strides 8, 16 and 32. For a cell at column ``c``,
row ``r`` of stride ``s`` (as OpenCV's FaceDetectorYN decodes it):

* score = sqrt(cls * obj), both clipped to [0, 1]
* box centre = ((c, r) + bbox[0:2]) * s, box size = exp(bbox[2:4]) * s
* landmark k = ((c, r) + kps[2k : 2k+2]) * s

Coordinates refer to the zero-padded input, whose top-left corner is the image's, so no shift is needed.

Score threshold: DEFAULT_SCORE_THRESHOLD = 0.8, for images at gate-camera scale (longest side <= 640; use
``detect_faces(..., max_side=640)`` for photos). Measured on ../shared/data/faces at that scale: real faces score
0.88-0.95 and every single-face, edge and group photo gives exactly its expected count. OpenCV's sample value 0.6
also keeps a wall clock (0.64, group/voc_2008_004176.jpg) and, at full resolution, two dog faces (0.77, 0.65).
One dog face in noface/dogs.jpg scores 0.86 at 640 px: no threshold separates it from real faces, but it matches
nobody (cosine <= 0.29 to every person), so it stays unknown. Very large faces score low at full resolution
(paul_rudd_01.jpg, 2048 px tall: 0.59), another reason to shrink photos first.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from appliance.vision.models import ModelPack, RawDetections

STRIDES = (8, 16, 32)
DEFAULT_SCORE_THRESHOLD = 0.8
DEFAULT_NMS_THRESHOLD = 0.3
DEFAULT_TOP_K = 5000


@dataclass(frozen=True)
class Face:
    """One detected face in image pixels.

    ``landmarks`` is float32 ``[5, 2]`` (x, y) in YuNet's order: right eye, left eye, nose tip, right mouth
    corner, left mouth corner, where "right" is the person's right (the left side of the image).
    """

    box: tuple[float, float, float, float]  # x, y, width, height
    landmarks: np.ndarray
    score: float

    @property
    def size(self) -> float:
        """The shorter side of the box, the usual measure of how large a face is."""
        return min(self.box[2], self.box[3])


def decode(
    raw: RawDetections,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    nms_threshold: float = DEFAULT_NMS_THRESHOLD,
    top_k: int = DEFAULT_TOP_K,
) -> list[Face]:
    """Turn YuNet's outputs into faces above ``score_threshold`` after non-maximum suppression, best first."""
    pad_w, pad_h = raw.padded_size
    boxes, landmarks, scores = [], [], []
    for stride in STRIDES:
        cols, rows = pad_w // stride, pad_h // stride
        cls = raw.outputs[f"cls_{stride}"].reshape(-1)
        obj = raw.outputs[f"obj_{stride}"].reshape(-1)
        if cls.size != rows * cols:
            raise ValueError(f"stride {stride}: {cls.size} scores for a {cols}x{rows} grid")
        score = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
        keep = np.nonzero(score >= score_threshold)[0]
        if keep.size == 0:
            continue
        grid = np.stack([keep % cols, keep // cols], axis=1).astype(np.float32)
        bbox = raw.outputs[f"bbox_{stride}"].reshape(-1, 4)[keep]
        kps = raw.outputs[f"kps_{stride}"].reshape(-1, 5, 2)[keep]
        centre = (grid + bbox[:, :2]) * stride
        size = np.exp(bbox[:, 2:]) * stride
        boxes.append(np.concatenate([centre - size / 2, size], axis=1))
        landmarks.append((grid[:, None, :] + kps) * stride)
        scores.append(score[keep])
    if not boxes:
        return []
    all_boxes = np.concatenate(boxes).astype(np.float32)
    all_marks = np.concatenate(landmarks).astype(np.float32)
    all_scores = np.concatenate(scores).astype(np.float32)
    kept = cv2.dnn.NMSBoxes(all_boxes.tolist(), all_scores.tolist(), score_threshold, nms_threshold, top_k=top_k)
    order = sorted((int(i) for i in np.asarray(kept).reshape(-1)), key=lambda i: -all_scores[i])
    return [
        Face(box=tuple(float(v) for v in all_boxes[i]), landmarks=all_marks[i], score=float(all_scores[i]))  # type: ignore[arg-type]
        for i in order
    ]


def detect_faces(
    pack: ModelPack,
    image_bgr: np.ndarray,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    nms_threshold: float = DEFAULT_NMS_THRESHOLD,
    max_side: int | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> list[Face]:
    """Detect faces in a BGR uint8 image; with ``max_side`` a larger image is shrunk first (coordinates
    are returned in the original image's pixels either way)."""
    height, width = image_bgr.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return decode(pack.raw_detect(image_bgr), score_threshold, nms_threshold, top_k)
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
    fx, fy = width / size[0], height / size[1]
    faces = decode(pack.raw_detect(small), score_threshold, nms_threshold, top_k)
    return [
        Face(
            box=(f.box[0] * fx, f.box[1] * fy, f.box[2] * fx, f.box[3] * fy),
            landmarks=(f.landmarks * np.array([fx, fy])).astype(np.float32),
            score=f.score,
        )
        for f in faces
    ]
