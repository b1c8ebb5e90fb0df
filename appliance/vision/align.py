"""Face alignment: map the 5 detected landmarks onto the standard ArcFace 112x112 template.

SFace (like ArcFace-style recognizers) was trained on faces warped this way, so embeddings are only
comparable when every face goes through the same similarity transform (rotation, uniform scale,
translation: no shear, which would distort the face).

Colour contract of the vision code: detection takes BGR frames (OpenCV's order), ``align_face`` returns
RGB, which is what :meth:`appliance.vision.models.ModelPack.embed` takes.
"""

from __future__ import annotations

import cv2
import numpy as np

FACE_SIZE = 112

# Landmark positions in a 112x112 crop, in YuNet's order (person's right eye, left eye, nose tip,
# right mouth corner, left mouth corner), i.e. image-left eye first. The widely used ArcFace template.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


class AlignmentError(ValueError):
    """The landmarks do not define a usable similarity transform (degenerate or collinear points)."""


def similarity_transform(landmarks: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform that maps ``landmarks`` [5, 2] onto the template in the least-squares sense.

    Every landmark counts: the huge RANSAC threshold makes all five inliers, and OpenCV's Levenberg-Marquardt
    refinement then gives the least-squares fit (what OpenCV's FaceRecognizerSF.alignCrop computes). With
    outlier rejection (LMedS, or RANSAC at 3 px) the nose of a turned head was dropped on
    barack_obama_02.jpg and the worst different-person cosine on ../shared/data/faces rose from 0.275 to 0.301.
    """
    points = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    if not np.isfinite(points).all():
        raise AlignmentError("landmarks contain NaN or infinity")
    matrix, _inliers = cv2.estimateAffinePartial2D(
        points, ARCFACE_TEMPLATE, method=cv2.RANSAC, ransacReprojThreshold=1e6, refineIters=50
    )
    if matrix is None or not np.isfinite(matrix).all():
        raise AlignmentError("landmarks do not define a similarity transform")
    return matrix


def align_face(image_bgr: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Warp one face of a BGR uint8 image to a 112x112 RGB uint8 crop (pixels outside the image are black)."""
    if image_bgr.dtype != np.uint8 or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"align_face wants a BGR uint8 image [H, W, 3], got {image_bgr.dtype} {list(image_bgr.shape)}")
    matrix = similarity_transform(landmarks)
    crop = cv2.warpAffine(
        image_bgr, matrix, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)


def align_faces(image_bgr: np.ndarray, landmarks: list[np.ndarray]) -> np.ndarray:
    """Several faces of one image as an ``[N, 112, 112, 3]`` RGB batch for ``ModelPack.embed``."""
    if not landmarks:
        return np.zeros((0, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    return np.stack([align_face(image_bgr, marks) for marks in landmarks])
