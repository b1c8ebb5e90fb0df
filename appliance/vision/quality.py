"""Is this face good enough to recognise or enrol? Size, sharpness and head pose from the landmarks.

A blurred, tiny or turned face gives an embedding that matches nobody well (or, worse, the
wrong person), so such faces are skipped at the gate and refused at enrollment.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True, slots=True)
class QualityRules:
    min_face_px: float = 48.0
    min_sharpness: float = 30.0
    max_yaw: float = 0.35
    max_roll_degrees: float = 25.0


@dataclass(frozen=True, slots=True)
class Quality:
    size: float
    sharpness: float
    yaw: float
    roll_degrees: float
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def pose(landmarks: np.ndarray) -> tuple[float, float]:
    """(yaw, roll): yaw is how far the nose sits off the eyes' midline, in eye distances (0 = frontal)."""
    marks = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    eye_a, eye_b, nose = marks[0], marks[1], marks[2]
    eye_vector = eye_b - eye_a
    eye_distance = float(np.linalg.norm(eye_vector)) or 1e-6
    roll = float(np.degrees(np.arctan2(eye_vector[1], eye_vector[0])))
    axis = eye_vector / eye_distance
    yaw = float(np.dot(nose - (eye_a + eye_b) / 2, axis) / eye_distance)
    return yaw, roll


def sharpness(aligned_rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the aligned crop: low means blurred."""
    grey = cv2.cvtColor(aligned_rgb, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def assess(face_size: float, landmarks: np.ndarray, aligned_rgb: np.ndarray, rules: QualityRules) -> Quality:
    yaw, roll = pose(landmarks)
    sharp = sharpness(aligned_rgb)
    problems = []
    if face_size < rules.min_face_px:
        problems.append(f"face too small ({face_size:.0f} px, need {rules.min_face_px:.0f})")
    if sharp < rules.min_sharpness:
        problems.append(f"too blurred (sharpness {sharp:.0f}, need {rules.min_sharpness:.0f})")
    if abs(yaw) > rules.max_yaw:
        problems.append(f"head turned (yaw {yaw:+.2f}, limit {rules.max_yaw:.2f})")
    if abs(roll) > rules.max_roll_degrees:
        problems.append(f"head tilted ({roll:+.0f} degrees, limit {rules.max_roll_degrees:.0f})")
    return Quality(face_size, sharp, yaw, roll, tuple(problems))
