"""Synthetic DATA folders in the real layout: ``<centre>/images/<class>/<file>``.

:func:`generate` writes the mixed, Xiangya and Huaxi centres; :func:`add_held_out_centres`
adds the test-only scanner styles and :func:`add_family_centres` a held-out family of them
(:mod:`synthetic.family`); :func:`ensure_data` is what a run calls. Every folder is
rendered into a temp folder and renamed, so it is complete or absent. It is synthetic data,
not clinical data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from savlt_model.atomic import write_json
from savlt_model.config import CERVICAL_CLASSES, Config, resolve_path
from savlt_model.cores import usable_cores
from savlt_model.data.protocol import data_root
from savlt_model.errors import SavltError
from synthetic.centres import (
    BASE_COUNTS,
    CENTRE_SITES,
    FORMATS,
    HELD_OUT_COUNTS,
    HELD_OUT_FORMATS,
    HELD_OUT_INFO,
    HELD_OUT_PROFILES,
    JPEG_QUALITY,
    MIN_PER_CELL,
    NOTE,
    PROFILES,
    SYNTH_VERSION,
)
from synthetic.family import FAMILY_KEY, family_name, family_style
from synthetic.render import SIGNATURES, Array, render

log = logging.getLogger(__name__)
T = TypeVar("T")

# Provenance ids written into synth.json / held_out.json. They keep the names of the first
# release (the generator's old module path): a folder written then still matches, byte for byte.
GENERATOR_ID = "simulation.synth"


def _suffix(fmt: str) -> str:
    return ".jpg" if fmt.startswith("jpeg") else ".png"


def _save(
    img: Array, mask: Array, fmt: str, image_path: Path, mask_path: Path, bits: int = 16
) -> None:
    """Encode in the centre's format, so the loader's 8-, 12-, 16-bit and JPEG paths all run.

    ``bits`` is the detector depth of a png16 file (12 leaves the top 4 bits empty, as
    12-bit scanners write them); ``fmt`` "jpeg<q>" sets the JPEG quality.
    """
    if fmt == "png16":
        full = 2**bits - 1
        Image.fromarray(np.round(img * full).astype(np.uint16)).save(image_path, compress_level=1)
    else:
        grey = Image.fromarray(np.round(img * 255).astype(np.uint8))
        if fmt.startswith("jpeg"):  # RGB, as screenshots exported by clinical viewers usually are
            grey.convert("RGB").save(image_path, quality=int(fmt[4:] or JPEG_QUALITY))
        else:
            grey.save(image_path, compress_level=1)
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path, compress_level=1)


# ---------------------------------------------------------------- data set


def _write(
    centre_dir: Path, cls: str, stem: str, img: Array, mask: Array, fmt: str, bits: int = 16
) -> str:
    """Save one B-scan as ``images/<cls>/<stem>.*`` and its mask; returns the image's name."""
    name = stem + _suffix(fmt)
    image_dir, mask_dir = (centre_dir / part / cls for part in ("images", "masks"))
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    _save(img, mask, fmt, image_dir / name, mask_dir / f"{stem}.png", bits)
    return name


def _on_every_core(fn: Callable[[T], str], plan: list[T], desc: str, progress: bool) -> list[str]:
    """``fn`` over ``plan`` on every core, results in plan order. Threads suffice: NumPy and
    PIL release the GIL, and every image has its own seeded stream, so the files do not
    depend on which thread renders them."""
    with ThreadPoolExecutor(usable_cores()) as pool:
        done = pool.map(fn, plan)
        return list(tqdm(done, total=len(plan), desc=desc, unit="img", disable=not progress))


def _key(name: str) -> int:
    """Stable per-name seed component, so output does not depend on class or site order."""
    return zlib.crc32(name.encode())


def _counts(site: str, classes: list[str], scale: float) -> dict[str, int]:
    """Images per class for one site; the floor keeps every class at every site (non-IID)."""
    return {c: max(round(BASE_COUNTS[site][c] * scale), MIN_PER_CELL) for c in classes}


def _check_args(seed: int, scale: float, classes: list[str]) -> None:
    """Refuse bad arguments before any pixel is rendered, with a one-line fix."""
    unknown = [c for c in classes if c not in SIGNATURES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise SavltError(
            f"synth classes must be distinct names from {', '.join(CERVICAL_CLASSES)}; "
            f"got {', '.join(classes) or 'none'}"
        )
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise SavltError(f"synth seed must be a non-negative integer, got {seed!r}")
    if not (math.isfinite(scale) and 0 < scale <= 100):
        raise SavltError(f"synth scale must be in (0, 100], got {scale}")


def _check(out: Path, seed: int, scale: float, classes: list[str]) -> None:
    """:func:`_check_args`, and OUT must be new or empty."""
    _check_args(seed, scale, classes)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SavltError(f"{out} exists and is not empty — choose another --out or remove it")


def generate(
    out: Path,
    seed: int = 0,
    scale: float = 1.0,
    classes: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Write OUT/{mixed,huaxi,xiangya} in the real layout.

    Returns the summary also written to OUT/synth.json. Everything is rendered into
    ``OUT.tmp-<pid>`` and renamed at the end, so OUT is either complete or absent.
    """
    out = Path(out)
    classes = list(CERVICAL_CLASSES) if classes is None else list(classes)
    _check(out, seed, scale, classes)
    plan = [
        (centre, site, cls, i)
        for centre, sites in CENTRE_SITES.items()
        for site in sites
        for cls, n in _counts(site, classes, scale).items()
        for i in range(n)
    ]
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:

        def one(item: tuple[str, str, str, int]) -> str:
            centre, site, cls, i = item
            rng = np.random.default_rng([seed, _key(site), _key(cls), i])
            img, mask = render(cls, PROFILES[site], rng)
            return _write(tmp / centre, cls, f"{site}_{i:04d}", img, mask, FORMATS[centre])

        names = _on_every_core(one, plan, "synth", progress)
        site_of = {
            f"{cls}/{name}": site
            for (centre, site, cls, _), name in zip(plan, names, strict=True)
            if centre == "mixed"
        }
        write_json(tmp / "mixed" / "sites.json", site_of)
        summary = _summary(seed, scale, classes)
        write_json(tmp / "synth.json", summary)
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _summary(seed: int, scale: float, classes: list[str]) -> dict[str, Any]:
    """Provenance for OUT/synth.json: enough to regenerate and to explain the centre shift."""
    centres: dict[str, Any] = {}
    for centre, sites in CENTRE_SITES.items():
        per_site = {s: _counts(s, classes, scale) for s in sites}
        centres[centre] = {
            "format": FORMATS[centre],
            "counts": {c: sum(n[c] for n in per_site.values()) for c in classes},
            "sites": {s: {"profile": asdict(PROFILES[s]), "counts": per_site[s]} for s in sites},
        }
    return {
        "note": NOTE,
        "generator": GENERATOR_ID,
        "version": SYNTH_VERSION,
        "seed": seed,
        "scale": scale,
        "classes": classes,
        "centres": centres,
    }


def _held_out_info(name: str, seed: int, scale: float, classes: list[str]) -> dict[str, Any]:
    """Provenance of one held-out centre, as written to (and compared with) its JSON file."""
    counts = {c: max(round(HELD_OUT_COUNTS[name][c] * scale), MIN_PER_CELL) for c in classes}
    return {
        "note": NOTE,
        "generator": f"{GENERATOR_ID}.add_held_out_centres",
        "version": SYNTH_VERSION,
        "centre": name,
        "seed": seed,
        "scale": scale,
        "classes": classes,
        "format": HELD_OUT_FORMATS[name],
        "counts": counts,
        "profile": asdict(HELD_OUT_PROFILES[name]),
    }


def _existing_held_out(root: Path, info: dict[str, Any]) -> bool:
    """True if ``info``'s centre is already in ``root`` as written with these arguments.

    A folder of that name from other arguments (or not from this generator) is refused
    rather than silently reused, since its images would not be the ones asked for.
    """
    centre = root / info["centre"]
    if not centre.exists():
        return False
    path = centre / HELD_OUT_INFO
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    if found != json.loads(json.dumps(info)):
        raise SavltError(
            f"{centre} exists but was not written by add_held_out_centres with seed "
            f"{info['seed']}, scale {info['scale']} and these classes ({path} differs) — "
            "remove the folder to regenerate it"
        )
    return True


def add_held_out_centres(
    root: Path,
    seed: int = 0,
    scale: float = 1.0,
    classes: list[str] | None = None,
    names: tuple[str, ...] = tuple(HELD_OUT_PROFILES),
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Add the held-out scanner centres ``names`` (test-only) to an existing DATA folder.

    Separate from :func:`generate`, so the standard centres and ``synth.json`` keep their
    bytes. Idempotent: only centres missing from ``root`` are written, so it can run on the
    same folder every time; a centre folder left by different arguments is refused. Each
    centre is rendered into a hidden temp folder and renamed (complete or absent), holds
    ``images/<class>/``, ``masks/<class>/`` and its provenance ``held_out.json``, and is seeded
    by (seed, centre, class, index) like the standard sites. Returns the provenance of
    each centre written now ({} when all were there).
    """
    root = Path(root)
    classes = list(CERVICAL_CLASSES) if classes is None else list(classes)
    _check_args(seed, scale, classes)
    unknown = [n for n in names if n not in HELD_OUT_PROFILES]
    if unknown:
        raise SavltError(
            f"held-out centres must be from {', '.join(HELD_OUT_PROFILES)}; got {unknown}"
        )
    if not root.is_dir():
        raise SavltError(f"{root} is not a DATA folder — generate one first (`savlt synth`)")
    written: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(names):
        info = _held_out_info(name, seed, scale, classes)
        if _existing_held_out(root, info):
            continue
        _render_centre(root, info, HELD_OUT_PROFILES[name], [seed, _key(name)], progress)
        written[name] = info
    return written


FAMILY_PER_CLASS = 30  # images per class of a family centre at scale 1 (balanced)


def _render_centre(
    root: Path, info: dict[str, Any], prof: Any, stream: list[int], progress: bool
) -> None:
    """Render one test-only centre into a hidden temp folder and rename it (complete or
    absent); image (class, i) is seeded by ``stream + [class, i]``."""
    name, fmt = info["centre"], info["format"]
    tmp = root / f".{name}.tmp-{os.getpid()}"  # hidden: scan_center never lists it
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plan = [(c, i) for c, n in info["counts"].items() for i in range(n)]

        def one(item: tuple[str, int]) -> str:
            cls, i = item
            img, mask = render(cls, prof, np.random.default_rng([*stream, _key(cls), i]))
            return _write(tmp, cls, f"{name}_{i:04d}", img, mask, fmt, prof.bit_depth)

        _on_every_core(one, plan, name, progress)
        write_json(tmp / HELD_OUT_INFO, info)
        tmp.rename(root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def add_family_centres(
    root: Path,
    n: int,
    family_seed: int,
    seed: int = 0,
    scale: float = 1.0,
    classes: list[str] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Add ``n`` centres of the held-out style family ``family_seed`` (test-only) to a DATA
    folder, named ``family<S>_<k>``: style k is :func:`synthetic.family.family_style`, its
    images are seeded by (seed, family, S, k, class, index), balanced over the classes.
    Idempotent like :func:`add_held_out_centres`; the standard centres are never touched.
    Returns the provenance of each centre written now."""
    root = Path(root)
    classes = list(CERVICAL_CLASSES) if classes is None else list(classes)
    _check_args(seed, scale, classes)
    if not (
        isinstance(n, int) and 0 < n <= 100 and isinstance(family_seed, int) and family_seed >= 0
    ):
        raise SavltError(
            f"--held-out-family must be 1..100 and --family-seed >= 0; got {n}, {family_seed}"
        )
    if not root.is_dir():
        raise SavltError(f"{root} is not a DATA folder — generate one first (`savlt synth`)")
    written: dict[str, dict[str, Any]] = {}
    for k in range(n):
        prof, fmt = family_style(family_seed, k)
        info = {
            "note": NOTE,
            "generator": f"{GENERATOR_ID}.add_family_centres",
            "version": SYNTH_VERSION,
            "centre": family_name(family_seed, k),
            "family_seed": family_seed,
            "index": k,
            "seed": seed,
            "scale": scale,
            "classes": classes,
            "format": fmt,
            "counts": {c: max(round(FAMILY_PER_CLASS * scale), MIN_PER_CELL) for c in classes},
            "profile": asdict(prof),
        }
        if _existing_held_out(root, info):
            continue
        _render_centre(root, info, prof, [seed, FAMILY_KEY, family_seed, k], progress)
        written[info["centre"]] = info
    return written


def ensure_data(cfg: Config) -> Path:
    """The run's DATA folder, generated first when ``data.synthetic.enabled`` asks for it
    (the held-out scanner centres of ``data.synthetic.held_out`` are added if missing)."""
    root = resolve_path(cfg.data.root)
    syn = cfg.data.synthetic
    if syn.enabled and not root.exists():
        log.info("Generating synthetic multi-centre OCT data in %s (seed %d)", root, syn.seed)
        generate(root, seed=syn.seed, scale=syn.scale, classes=cfg.task.classes)
    if syn.enabled and syn.held_out:
        add_held_out_centres(root, syn.seed, syn.scale, cfg.task.classes, tuple(syn.held_out))
    return data_root(cfg)
