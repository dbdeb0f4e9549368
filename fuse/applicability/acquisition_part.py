"""The detector's acquisition part: the image file's acquisition cues (`embed.acquisition`)
against the training images'.

Each cue is robustly standardised (median, 1.4826 x MAD, with a floor so that a cue every
training image shares, such as a fixed size, still counts when it changes), then scored by the
Mahalanobis distance under a Ledoit-Wolf covariance of those standardised cues.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from embed.acquisition import CUE_NAMES, CUES_VERSION
from fuse.applicability.config import ApplicabilityConfig
from runfolder.errors import RunError

__all__ = ["AcquisitionPart"]

log = logging.getLogger(__name__)

# Robust scale floors of the acquisition cues, in the cue's units: a cue that every training
# image shares (HAM10000's 200x150) has no spread, and any change of it must still count, by
# about this much per standard deviation. Sizes count 5% per unit; colours a few Lab units.
_CUE_FLOORS: dict[str, float] = {
    "width": 0.05,  # applied to log(width): see _acquisition_matrix
    "height": 0.05,
    "log_pixels": 0.05,
    "log_aspect": 0.05,
    "bytes_per_pixel": 0.01,
    "L_mean": 2.0,
    "L_std": 1.0,
    "a_mean": 2.0,
    "a_std": 0.5,
    "b_mean": 2.0,
    "b_std": 0.5,
    "saturation": 0.02,
    "sharpness": 0.1,
    "vignetting": 0.02,
    "dark_corners": 0.01,
}
_Z_CLIP = 50.0  # a standardised cue beyond this counts as this far: one cue cannot overflow


def _acquisition_matrix(frame: pd.DataFrame) -> np.ndarray:
    """Cues as the part compares them: sizes as logs (a 10% change counts alike at any size)."""
    x = frame[list(CUE_NAMES)].to_numpy(dtype=np.float64).copy()
    for name in ("width", "height"):
        j = CUE_NAMES.index(name)
        x[:, j] = np.log(np.maximum(x[:, j], 1.0))
    return x


class AcquisitionPart:
    """Mahalanobis distance of robustly standardised cues (Ledoit-Wolf covariance)."""

    name = "acquisition"

    def __init__(self, center, scale, precision, median_raw):
        self.center = np.asarray(center, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.precision = np.asarray(precision, dtype=np.float64)
        self.median_raw = np.asarray(median_raw, dtype=np.float64)

    @classmethod
    def fit(cls, frame: pd.DataFrame, config: ApplicabilityConfig, rng) -> AcquisitionPart:
        from sklearn.covariance import LedoitWolf

        raw = frame[list(CUE_NAMES)].to_numpy(dtype=np.float64)
        ok = np.isfinite(raw).all(axis=1)
        if ok.sum() < 10:
            raise RunError(
                f"applicability: only {int(ok.sum())} training images have acquisition cues; "
                "at least 10 are needed (are the images readable?)"
            )
        x = _acquisition_matrix(frame)[ok]
        center = np.median(x, axis=0)
        mad = 1.4826 * np.median(np.abs(x - center), axis=0)
        floors = np.array([_CUE_FLOORS[name] for name in CUE_NAMES])
        scale = np.maximum(mad, floors)
        z = np.clip((x - center) / scale, -_Z_CLIP, _Z_CLIP)
        if len(z) > config.max_reference:
            z = z[rng.choice(len(z), config.max_reference, replace=False)]
        covariance = LedoitWolf(assume_centered=True).fit(z).covariance_
        # Cues every training image shares have no variance; a floor keeps the inverse finite
        # (and a change of such a cue then counts by its robust z alone).
        covariance = covariance + np.eye(len(covariance)) * 1e-3
        return cls(center, scale, np.linalg.inv(covariance), np.median(raw[ok], axis=0))

    def _z(self, frame: pd.DataFrame) -> np.ndarray:
        return np.clip((_acquisition_matrix(frame) - self.center) / self.scale, -_Z_CLIP, _Z_CLIP)

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        z = self._z(frame)
        d2 = np.einsum("ij,jk,ik->i", np.nan_to_num(z), self.precision, np.nan_to_num(z))
        out = np.sqrt(np.maximum(d2, 0.0))
        out[~np.isfinite(z).all(axis=1)] = np.nan
        return out

    def detail(self, frame_row: pd.DataFrame) -> str:
        """The cues furthest from the training images' (|robust z| > 3, at most two)."""
        z = self._z(frame_row)[0]
        raw = frame_row[list(CUE_NAMES)].to_numpy(dtype=np.float64)[0]
        order = [j for j in np.argsort(-np.abs(z)) if abs(z[j]) > 3][:2]
        words = []
        size_said = False
        for j in order:
            name = CUE_NAMES[j]
            if name in ("width", "height", "log_pixels", "log_aspect"):
                if size_said:
                    continue
                size_said = True
                w, h = raw[CUE_NAMES.index("width")], raw[CUE_NAMES.index("height")]
                mw, mh = (
                    self.median_raw[CUE_NAMES.index("width")],
                    self.median_raw[CUE_NAMES.index("height")],
                )
                words.append(f"size {w:.0f}x{h:.0f} vs training {mw:.0f}x{mh:.0f}")
            else:
                words.append(f"{name} {raw[j]:.3g} vs training {self.median_raw[j]:.3g}")
        return ", ".join(words)

    def state(self) -> tuple[dict, dict]:
        return {"cues": list(CUE_NAMES), "cues_version": CUES_VERSION}, {
            "acquisition_center": self.center,
            "acquisition_scale": self.scale,
            "acquisition_precision": self.precision,
            "acquisition_median": self.median_raw,
        }

    @classmethod
    def from_state(cls, record: dict, arrays: dict) -> AcquisitionPart:
        if record.get("cues") != list(CUE_NAMES) or record.get("cues_version") != CUES_VERSION:
            raise RunError(
                f"applicability detector was fitted on cues {record.get('cues_version')!r} "
                f"but this lesionfuse measures {CUES_VERSION!r}; fit it again (invoke stack)"
            )
        return cls(
            arrays["acquisition_center"],
            arrays["acquisition_scale"],
            arrays["acquisition_precision"],
            arrays["acquisition_median"],
        )
