"""The DATA folder layout: list a centre's labelled images and its sub-sites.

Layout: ``ROOT/<centre>/images/<class>/<file>``; the label of an image is the position of
its class in ``task.classes``. Every sample carries a ``key`` (``"<class>/<filename>"``),
the stable id that split files, few-shot caches and ``sites.json`` refer to, so that a run
can be repeated on another machine where ROOT lives elsewhere, and, when known, the
``patient`` it was scanned from, so that one patient's B-scans never straddle two splits.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from savlt_model.data.dicom import DICOM_SUFFIXES, dicom_header, is_dicom
from savlt_model.errors import SavltError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
SCAN_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES  # what a class folder or manifest may hold
SKIP_HINT = "set data.on_bad_file: skip"  # the training commands' way to skip bad files
_SHOWN = 5  # how many offending names a message lists before "..."


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    key: str  # "<class>/<filename>" (a manifest: its path column); "#<frame>" for a volume
    patient: str | None = None  # None: unknown, the image counts as its own patient
    frame: int | None = None  # the B-scan's frame in a multi-frame DICOM file


@dataclass(frozen=True)
class Listed:
    """One image file as a source (class folder, manifest row) lists it, not yet checked."""

    path: Path
    label: int
    key: str
    patient: str | None = None  # from a manifest column
    row: str | None = None  # "manifest.csv:12": where the file was listed, for messages


def patient_from_key(key: str, pattern: str, where: str) -> str:
    """The patient id that ``data.patient_pattern`` finds in a sample key.

    The id is the named group ``patient``, else the first group, else the whole match, so
    ``P\\d+`` and ``^(\\w+?)_`` both work. A key it does not match stops the run: a silent
    fallback to "own patient" would reopen the train/test leak the pattern is meant to close.
    """
    match = re.search(pattern, key)
    if match is None:
        raise SavltError(
            f"{where}: data.patient_pattern '{pattern}' does not match image {key} — "
            "fix the pattern so that it matches every image path"
        )
    if "patient" in match.groupdict():
        found = match.group("patient")
    else:
        found = match.group(1) if match.re.groups else match.group(0)
    if not found:
        raise SavltError(
            f"{where}: data.patient_pattern '{pattern}' finds an empty patient id in {key} — "
            "fix the pattern"
        )
    return found


def short_list(items: Sequence[str]) -> str:
    """A short list for one-line messages: the first few names, then how many more."""
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_readable_image(path: Path) -> bool:
    """Cheap integrity check: header and (for PNG) chunk CRCs, without decoding pixels."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return False
    return True


def expand_files(
    listed: Sequence[Listed],
    where: str,
    on_bad_file: str = "stop",
    patient_pattern: str | None = None,
    skip_hint: str = SKIP_HINT,
) -> list[Sample]:
    """Check every listed file and turn it into samples, in the order given.

    A missing or unreadable file stops (``on_bad_file="stop"``, the message ends with
    ``skip_hint``, the option of the command at hand) or is skipped with one warning for
    the whole set, named ``where`` (``"skip"``), so one broken file never crashes a long run
    half-way through. A DICOM volume becomes one sample per frame (key ``<key>#<frame>``).
    The patient is the first of: the listing's (a manifest column), ``patient_pattern`` on
    the key, the DICOM PatientID.
    """
    if on_bad_file not in ("stop", "skip"):
        raise SavltError(f"data.on_bad_file is {on_bad_file!r}; use 'stop' or 'skip'")
    samples: list[Sample] = []
    bad: list[str] = []
    for item in listed:
        at = f" ({item.row})" if item.row else ""
        header = dicom_header(item.path) if is_dicom(item.path) else None
        if not item.path.is_file() or not (
            header is not None if is_dicom(item.path) else _is_readable_image(item.path)
        ):
            if on_bad_file == "stop" and not item.path.is_file():
                raise SavltError(f"image {item.path} not found{at} — fix the path, or {skip_hint}")
            if on_bad_file == "stop":
                raise SavltError(
                    f"unreadable image {item.path}{at} — replace or delete it, or {skip_hint}"
                )
            bad.append(item.key)
            continue
        frames, patient = header if header is not None else (1, None)
        if item.patient is not None:
            patient = item.patient
        elif patient_pattern:
            patient = patient_from_key(item.key, patient_pattern, where)
        if frames == 1:
            samples.append(Sample(item.path, item.label, item.key, patient))
        else:
            samples.extend(
                Sample(item.path, item.label, f"{item.key}#{i}", patient, i) for i in range(frames)
            )
    if bad:
        log.warning("%s: skipped %d unreadable image(s): %s", where, len(bad), short_list(bad))
    return samples


def checked_samples(
    listed: list[Listed],
    center: str,
    classes: Sequence[str],
    source: str,
    on_bad_file: str = "stop",
    patient_pattern: str | None = None,
    skip_hint: str = SKIP_HINT,
) -> list[Sample]:
    """A centre's samples from the files a source lists, ordered by label then key: every
    check and rule that does not depend on the source (:func:`expand_files`), in one place.

    A class without images is a warning with a count of 0 (a hospital may have had no such
    case); a centre without any image stops.
    """
    samples = expand_files(
        sorted(listed, key=lambda i: (i.label, i.key)),
        f"centre {center}",
        on_bad_file,
        patient_pattern,
        skip_hint,
    )
    if not samples:
        raise SavltError(
            f"centre {center} has no readable images in {source} "
            f"(looked for {', '.join(sorted(SCAN_SUFFIXES))}) — add images or fix data.root"
        )
    counts = Counter(s.label for s in samples)
    for label, cls in enumerate(classes):
        if counts[label] == 0:
            log.warning(
                "centre %s, class '%s' has 0 images in %s; the centre takes part without it",
                center,
                cls,
                source,
            )
    return samples


def scan_center(
    root: Path,
    center: str,
    classes: list[str],
    on_bad_file: str = "stop",
    patient_pattern: str | None = None,
    skip_hint: str = SKIP_HINT,
) -> list[Sample]:
    """List the images of one centre folder (:func:`checked_samples` checks them).

    Hidden files, non-image files (``.json``, ``.txt``, ...) and sub-folders inside a class
    folder are ignored; a missing class folder counts as an empty one. A folder that is not
    a class of ``classes`` stops: it is a typo or a class the task does not know.
    """
    root = Path(root)
    layout = f"{root}/{center}/images/<class>/<image files>"
    center_dir = root / center
    if not center_dir.is_dir():
        found = (
            sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
            if root.is_dir()
            else []
        )
        raise SavltError(
            f"centre folder {center_dir} not found (centres in {root}: {found or 'none'}) — "
            f"fix data.root or the centre name; expected layout {layout}"
        )
    images = center_dir / "images"
    if not images.is_dir():
        raise SavltError(f"{images} not found — expected layout {layout}")
    folders = {p.name for p in images.iterdir() if p.is_dir() and _visible(p)}
    extra = sorted(folders - set(classes))
    if extra:
        raise SavltError(
            f"centre {center} has classes not in task.classes: {extra} — "
            "add them to task.classes or remove the folders"
        )
    listed = [
        Listed(path, label, f"{cls}/{path.name}")
        for label, cls in enumerate(classes)
        if (images / cls).is_dir()
        for path in (images / cls).iterdir()
        if _visible(path) and path.suffix.lower() in SCAN_SUFFIXES and path.is_file()
    ]
    return checked_samples(
        listed, center, classes, f"{images}/<class>", on_bad_file, patient_pattern, skip_hint
    )


REGENERATE = "delete the file to regenerate it"


def read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SavltError(f"cannot read {what} {path} ({err}) — {REGENERATE}") from err


def load_sites(root: Path, center: str, samples: list[Sample]) -> dict[str, str]:
    """Map each sample key to its sub-site, from ``ROOT/<centre>/sites.json``.

    A mixed centre pools several hospitals; the sites let the federated protocol split it
    into hospitals along real acquisition boundaries. Entries for keys that are not among
    ``samples`` (e.g. skipped files) are ignored.
    """
    path = Path(root) / center / "sites.json"
    if not path.is_file():
        raise SavltError(
            f"{path} not found — create it as a JSON object mapping "
            '"<class>/<filename>" to a site name for every image of the centre'
        )
    raw = read_json_file(path, "sites file")
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v for v in raw.values()):
        raise SavltError(
            f'{path} must be a JSON object mapping "<class>/<filename>" to a non-empty '
            "site name — fix its content"
        )
    missing = [s.key for s in samples if s.key not in raw]
    if missing:
        raise SavltError(
            f"{path} has no site for {len(missing)} image(s): {short_list(missing)} — "
            "add them to the file"
        )
    return {s.key: raw[s.key] for s in samples}
