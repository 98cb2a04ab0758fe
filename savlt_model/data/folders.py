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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from savlt_model.errors import SavltError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_SHOWN = 5  # how many offending names a message lists before "..."


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    key: str  # "<class>/<filename>": stable id relative to the centre
    patient: str | None = None  # None: unknown, the image counts as its own patient


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


def scan_center(
    root: Path,
    center: str,
    classes: list[str],
    on_bad_file: str = "stop",
    patient_pattern: str | None = None,
) -> list[Sample]:
    """List the images of one centre, ordered by label (``classes`` order) then filename.

    Hidden files, non-image files (``.json``, ``.txt``, ...) and sub-folders inside a class
    folder are ignored. Unreadable images stop the scan (``on_bad_file="stop"``) or are
    skipped with one warning per centre (``"skip"``), so one broken file never crashes a
    long run half-way through. With ``patient_pattern`` each sample's patient is read
    from its key (:func:`patient_from_key`).
    """
    if on_bad_file not in ("stop", "skip"):
        raise SavltError(f"data.on_bad_file is {on_bad_file!r}; use 'stop' or 'skip'")
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
    samples: list[Sample] = []
    bad: list[str] = []
    for label, cls in enumerate(classes):
        folder = images / cls
        if not folder.is_dir():
            raise SavltError(
                f"centre {center} has no folder for class '{cls}' ({folder}) — "
                "add its images or remove the class from task.classes"
            )
        files = sorted(
            p
            for p in folder.iterdir()
            if _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        kept = 0
        for path in files:
            key = f"{cls}/{path.name}"
            if not _is_readable_image(path):
                if on_bad_file == "stop":
                    raise SavltError(
                        f"unreadable image {path} — replace or delete it, "
                        "or set data.on_bad_file: skip"
                    )
                bad.append(key)
                continue
            patient = (
                patient_from_key(key, patient_pattern, f"centre {center}")
                if patient_pattern
                else None
            )
            samples.append(Sample(path=path, label=label, key=key, patient=patient))
            kept += 1
        if kept == 0:
            raise SavltError(
                f"class '{cls}' of centre {center} has no readable images in {folder} "
                f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}) — "
                "add images or remove the class from task.classes"
            )
    if bad:
        log.warning(
            "centre %s: skipped %d unreadable image(s): %s", center, len(bad), short_list(bad)
        )
    return samples


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
