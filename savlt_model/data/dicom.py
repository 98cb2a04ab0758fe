"""DICOM B-scans: frame count and patient id from the header, pixels of one frame.

Hospitals export OCT as DICOM: one B-scan per file, or a whole volume in one multi-frame
file (each frame one B-scan). The header is read at scan time (cheap: no pixels), so a
volume becomes one sample per frame and its PatientID groups the split.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from savlt_model.errors import SavltError

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB")


def is_dicom(path: Path) -> bool:
    return Path(path).suffix.lower() in DICOM_SUFFIXES


def dicom_header(path: Path) -> tuple[int, str | None] | None:
    """(number of frames, PatientID or None), or None when the file is no readable DICOM
    image (not DICOM, truncated header, no pixel size)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if int(ds.Rows) < 1 or int(ds.Columns) < 1 or frames < 1:
            return None
    except (InvalidDicomError, OSError, AttributeError, ValueError, TypeError, EOFError):
        return None
    patient = str(ds.get("PatientID", "") or "").strip()
    return frames, patient or None


@functools.lru_cache(maxsize=2)
def _pixels(path: Path) -> tuple[np.ndarray, str, int]:
    """Every frame of a file, kept for the next call: a volume's frames are decoded in a
    row, so each file is read once, not once per frame."""
    ds = pydicom.dcmread(path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in PHOTOMETRIC:
        raise SavltError(
            f"DICOM {path}: PhotometricInterpretation {photometric} is not supported "
            f"({', '.join(PHOTOMETRIC)}) — export the B-scans as greyscale or RGB"
        )
    return ds.pixel_array, photometric, int(ds.get("NumberOfFrames", 1) or 1)


def dicom_frame(path: Path, frame: int | None) -> tuple[np.ndarray, str]:
    """One frame's pixels (H x W, or H x W x 3 for RGB) and the photometric interpretation;
    ``frame`` None means a single-frame file."""
    pixels, photometric, frames = _pixels(Path(path))
    if frames > 1:
        pixels = pixels[frame or 0]
    return np.asarray(pixels), photometric
