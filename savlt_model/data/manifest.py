"""A CSV manifest as the data source, instead of class folders: hospitals export lists.

Header ``path,label`` plus optional ``patient`` and ``center`` columns. ``path`` is relative
to the manifest's folder (or absolute) and is also the sample's key in split files;
``label`` is a class name of ``task.classes``. Every bad row stops with one line naming
``file:line``; the files it lists go through the same checks as a class folder's
(:func:`savlt_model.data.folders.checked_samples`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path, PurePath

from savlt_model.data.folders import SCAN_SUFFIXES, SKIP_HINT, Listed, Sample, checked_samples
from savlt_model.errors import SavltError

REQUIRED = ("path", "label")
OPTIONAL = ("patient", "center")
CENTRE_FIELD = "<center>"  # in data.manifest: one manifest per centre


def manifest_file(root: Path, template: str, center: str) -> Path:
    """Where ``data.manifest`` puts a centre's manifest: relative to ``data.root``."""
    path = Path(template.replace(CENTRE_FIELD, center)).expanduser()
    return path if path.is_absolute() else Path(root) / path


def _rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) with blank lines left out."""
    if not path.is_file():
        raise SavltError(f"manifest {path} not found — fix data.manifest or data.root")
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:  # -sig: Excel's BOM
            reader = csv.reader(fh)
            header = [c.strip() for c in next(reader, [])]
            rows = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SavltError(f"cannot read manifest {path} ({err}) — save it as UTF-8 CSV") from err
    missing = [c for c in REQUIRED if c not in header]
    unknown = [c for c in header if c not in (*REQUIRED, *OPTIONAL)]
    if missing or unknown or len(set(header)) != len(header):
        raise SavltError(
            f"{path}:1: header {header} — the columns are path,label and optionally "
            f"patient,center, each once (missing {missing}, unknown {unknown})"
        )
    return header, rows


def read_manifest(
    path: Path,
    center: str,
    classes: Sequence[str],
    on_bad_file: str = "stop",
    patient_pattern: str | None = None,
    skip_hint: str = SKIP_HINT,
    per_centre: bool = False,
) -> list[Sample]:
    """The samples a manifest lists for ``center``.

    With a ``center`` column only that centre's rows count; without one the manifest must
    be the centre's own (``per_centre``). A row with the wrong number of cells, an empty
    path or label, a label not in ``classes``, a file type that is no image, or an image
    listed twice (in any centre: one image in two centres would leak between them) stops.
    """
    header, rows = _rows(path)
    if "center" not in header and not per_centre:
        raise SavltError(
            f"{path}: no 'center' column, so it cannot tell which rows are centre {center}'s "
            f"— add the column, or give one manifest per centre (data.manifest: "
            f"'{CENTRE_FIELD}/manifest.csv')"
        )
    col = {name: header.index(name) for name in header}
    first_line: dict[Path, int] = {}
    centres: set[str] = set()
    listed: list[Listed] = []
    for line, cells in rows:
        where = f"{path}:{line}"
        if len(cells) != len(header):
            raise SavltError(
                f"{where}: {len(cells)} cells, the header has {len(header)} — fix the row"
            )
        cell = {name: cells[i].strip() for name, i in col.items()}
        for name in REQUIRED:
            if not cell[name]:
                raise SavltError(f"{where}: empty {name} — fill it in or remove the row")
        file = Path(cell["path"]).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if file.suffix.lower() not in SCAN_SUFFIXES:
            raise SavltError(
                f"{where}: {cell['path']} is not an image file "
                f"({', '.join(sorted(SCAN_SUFFIXES))}) — fix the path"
            )
        resolved = file.resolve()
        if resolved in first_line:
            raise SavltError(
                f"{where}: {cell['path']} is listed again (first on line "
                f"{first_line[resolved]}) — remove one of the rows"
            )
        first_line[resolved] = line
        row_centre = cell.get("center", center)
        centres.add(row_centre)
        if row_centre != center:
            continue
        if cell["label"] not in classes:
            raise SavltError(
                f"{where}: label '{cell['label']}' is not in task.classes "
                f"({', '.join(classes)}) — fix the row or add the class"
            )
        key = PurePath(cell["path"]).as_posix()
        listed.append(
            Listed(file, classes.index(cell["label"]), key, cell.get("patient") or None, where)
        )
    if not listed:
        raise SavltError(
            f"manifest {path} has no rows for centre {center} (centres in it: "
            f"{', '.join(sorted(centres)) or 'none'}) — fix the centre name or the manifest"
        )
    return checked_samples(
        listed, center, classes, str(path), on_bad_file, patient_pattern, skip_hint
    )
