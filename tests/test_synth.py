"""The synthetic data set: layout, formats, determinism, and that its signals are there.

Downstream tests and benchmarks trust this generator to stand in for the clinical data, so
these tests pin what they rely on: the real layout, the three decoding paths, sites for the
federated split, reproducible bytes, and class and centre differences one can measure.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from savlt_model.config import CERVICAL_CLASSES
from savlt_model.data.folders import scan_center
from savlt_model.errors import SavltError
from synthetic import centres, write

SCALE = 0.1
CENTRES = ("mixed", "huaxi", "xiangya")
CYST, MILD = "cyst", "mild_inflammation"
HSIL, ECTROPION = "high-grade_squamous_intraepithelial_lesion", "ectropion"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, write.generate(out, seed=0, scale=SCALE, progress=False)


def _images(root: Path, centre: str, cls: str) -> list[Path]:
    return sorted((root / centre / "images" / cls).iterdir())


def _load(path: Path) -> np.ndarray:
    """Grey image in [0, 1] whatever the file's bit depth or channel count."""
    with Image.open(path) as im:
        a = np.asarray(im, dtype=np.float32)
    return (a[..., 0] if a.ndim == 3 else a) / (65535.0 if a.max() > 255 else 255.0)


def _mask(root: Path, centre: str, image: Path) -> np.ndarray:
    with Image.open(root / centre / "masks" / image.parent.name / f"{image.stem}.png") as im:
        return np.asarray(im)


def _png_depth(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from the IHDR chunk, independent of how PIL widens modes."""
    head = path.read_bytes()[:26]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return head[24], head[25]


def test_layout_counts_and_summary(data: tuple[Path, dict]) -> None:
    root, summary = data
    assert sorted(p.name for p in root.iterdir()) == ["huaxi", "mixed", "synth.json", "xiangya"]
    assert json.loads((root / "synth.json").read_text()) == summary
    assert summary["note"] == "synthetic data, not clinical"
    assert (summary["seed"], summary["scale"]) == (0, SCALE)
    for centre in CENTRES:
        assert sorted(p.name for p in (root / centre / "images").iterdir()) == CERVICAL_CLASSES
        info = summary["centres"][centre]
        for cls in CERVICAL_CLASSES:
            images = _images(root, centre, cls)
            assert len(images) == info["counts"][cls] >= centres.MIN_PER_CELL
            masks = sorted(p.name for p in (root / centre / "masks" / cls).iterdir())
            assert masks == sorted(f"{p.stem}.png" for p in images)
        for profile in (s["profile"] for s in info["sites"].values()):
            assert 256 <= profile["width"] <= 400 and 160 <= profile["height"] <= 256
    assert not list(root.parent.glob("data.tmp-*"))


def test_full_scale_counts() -> None:
    counts = {s: write._counts(s, CERVICAL_CLASSES, 1.0) for s in centres.PROFILES}
    for cls in CERVICAL_CLASSES:
        assert sum(counts[s][cls] for s in centres.CENTRE_SITES["mixed"]) == 60
        assert 20 <= counts["xiangya"][cls] <= 40 and 20 <= counts["huaxi"][cls] <= 40
    assert counts["xiangya"] != counts["huaxi"]


def test_sites_cover_mixed_with_different_class_mixes(data: tuple[Path, dict]) -> None:
    root, _ = data
    sites = json.loads((root / "mixed" / "sites.json").read_text())
    keys = {f"{c}/{p.name}" for c in CERVICAL_CLASSES for p in _images(root, "mixed", c)}
    assert set(sites) == keys
    assert len(set(sites.values())) >= 3
    for site in set(sites.values()):
        per_class = [
            sum(1 for k, s in sites.items() if s == site and k.startswith(f"{c}/"))
            for c in CERVICAL_CLASSES
        ]
        assert min(per_class) >= 3
    full = [  # non-IID sites (at scale 0.1 every cell is at the minimum)
        tuple(write._counts(s, CERVICAL_CLASSES, 1.0).values())
        for s in centres.CENTRE_SITES["mixed"]
    ]
    assert len(set(full)) == 3


def test_file_formats_and_masks(data: tuple[Path, dict]) -> None:
    root, _ = data
    for centre in CENTRES:
        for cls in (CYST, ECTROPION):
            for image in _images(root, centre, cls):
                if centre == "huaxi":
                    assert image.suffix == ".jpg"
                    with Image.open(image) as im:
                        assert im.format == "JPEG"
                else:
                    assert _png_depth(image) == ((16 if centre == "xiangya" else 8), 0)
                mask = _mask(root, centre, image)
                assert mask.dtype == np.uint8 and mask.shape == _load(image).shape
                assert set(np.unique(mask)) == {0, 255}
                assert mask[0].max() == 0 and mask[-1].min() == 255  # tissue reaches the bottom
    with Image.open(_images(root, "xiangya", MILD)[0]) as im:
        assert np.asarray(im).max() > 4095  # the loader must treat it as 16-bit, not 12-bit


def test_same_seed_same_bytes_regardless_of_classes(data: tuple[Path, dict], tmp_path: Path):
    root, _ = data
    (tmp_path / "same").mkdir()  # an existing empty folder is fine
    write.generate(tmp_path / "same", seed=0, scale=SCALE, classes=[CYST], progress=False)
    write.generate(tmp_path / "other", seed=1, scale=SCALE, classes=[CYST], progress=False)
    for centre in CENTRES:
        for part in ("images", "masks"):
            ref = sorted((root / centre / part / CYST).iterdir())
            same = sorted((tmp_path / "same" / centre / part / CYST).iterdir())
            other = sorted((tmp_path / "other" / centre / part / CYST).iterdir())
            assert [p.name for p in ref] == [p.name for p in same] == [p.name for p in other]
            assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ref, same, strict=True))
            assert all(a.read_bytes() != b.read_bytes() for a, b in zip(ref, other, strict=True))


def _dark_fraction(image: np.ndarray, mask: np.ndarray) -> float:
    """Share of tissue (4x4 blocks, against speckle) darker than 0.7x its row's median.

    Comparing within a row cancels most of the depth fall-off that darkens every class.
    """
    h, w = (s // 4 * 4 for s in image.shape)
    blocks = image[:h, :w].reshape(h // 4, 4, w // 4, 4).mean((1, 3))
    tissue = mask[:h, :w].reshape(h // 4, 4, w // 4, 4).min((1, 3)) > 0
    rows = np.arange(tissue.shape[0])[:, None]
    band = tissue & (rows >= tissue.argmax(0)[None, :] + 3) & (rows < 0.85 * tissue.shape[0])
    dark = [b[m] < 0.7 * np.median(b[m]) for b, m in zip(blocks, band, strict=True) if m.any()]
    return float(np.concatenate(dark).mean())


def _streakiness(image: np.ndarray, mask: np.ndarray) -> float:
    """Column-to-column variation just below the surface: HSIL's icicles."""
    rows = np.arange(image.shape[0])[:, None]
    top = mask.argmax(0)[None, :]
    band = (rows >= top + 3) & (rows < top + 0.12 * image.shape[0])
    cols = np.nanmean(np.where(band, image, np.nan), axis=0)
    detail = cols - np.convolve(cols, np.ones(15) / 15, "same")
    return float(np.std(detail[10:-10]))


def _roughness(mask: np.ndarray) -> float:
    """Mean jump of the tissue surface between neighbouring columns: ectropion's papillae."""
    return float(np.abs(np.diff(mask.argmax(0).astype(float))).mean())


def _stat(root: Path, cls: str, fn) -> float:
    values = []
    for image in _images(root, "mixed", cls):
        mask = _mask(root, "mixed", image) > 0
        values.append(fn(mask) if fn is _roughness else fn(_load(image), mask))
    return float(np.mean(values))


def test_class_signatures_are_measurable(data: tuple[Path, dict]) -> None:
    root, _ = data
    assert _stat(root, CYST, _dark_fraction) > 3 * _stat(root, MILD, _dark_fraction)
    streaks = {c: _stat(root, c, _streakiness) for c in CERVICAL_CLASSES}
    assert max(streaks, key=streaks.get) == HSIL
    rough = {c: _stat(root, c, _roughness) for c in CERVICAL_CLASSES}
    assert max(rough, key=rough.get) == ECTROPION


def test_centre_profiles_differ(data: tuple[Path, dict]) -> None:
    root, _ = data
    sites = json.loads((root / "mixed" / "sites.json").read_text())
    brightness: dict[str, list[float]] = {}
    sizes: dict[str, set[tuple[int, int]]] = {}
    for centre in CENTRES:
        for image in _images(root, centre, MILD):
            site = sites[f"{MILD}/{image.name}"] if centre == "mixed" else centre
            pixels = _load(image)
            brightness.setdefault(site, []).append(float(pixels.mean()))
            sizes.setdefault(site, set()).add(pixels.shape)
    assert all(len(s) == 1 for s in sizes.values())  # one scanner setting per site
    assert len({next(iter(s)) for s in sizes.values()}) == len(sizes)
    means = sorted(float(np.mean(v)) for v in brightness.values())
    assert means[-1] - means[0] > 0.05


def test_refuses_non_empty_out_and_bad_arguments(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SavltError, match="not empty"):
        write.generate(out, scale=SCALE, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(SavltError, match="tumour"):
        write.generate(tmp_path / "new", classes=["tumour"], progress=False)
    with pytest.raises(SavltError, match="scale"):
        write.generate(tmp_path / "new", scale=0.0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    real = write.render
    monkeypatch.setattr(write, "render", failing)
    with pytest.raises(RuntimeError):
        write.generate(tmp_path / "out", scale=SCALE, classes=[MILD], progress=False)
    assert list(tmp_path.iterdir()) == []


def _tree(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A two-class DATA folder, its bytes before, and what add_held_out_centres wrote."""
    out = tmp_path_factory.mktemp("held_out") / "data"
    write.generate(out, seed=1, scale=SCALE, classes=[CYST, MILD], progress=False)
    before = _tree(out)
    written = write.add_held_out_centres(
        out, seed=1, scale=SCALE, classes=[CYST, MILD], progress=False
    )
    return out, before, written


def test_held_out_centres_are_opt_in_and_leave_the_standard_centres_alone(
    held_out: tuple[Path, dict, dict],
) -> None:
    out, before, written = held_out
    assert set(written) == set(centres.HELD_OUT_PROFILES)
    assert {p: p.read_bytes() for p in before} == before  # nothing existing changed
    assert not list(out.glob(".*"))  # no temp folder left
    for name, info in written.items():
        samples = scan_center(out, name, [CYST, MILD])
        assert {s.label for s in samples} == {0, 1}
        assert len(samples) == sum(info["counts"].values())
        for cls in (CYST, MILD):
            masks = sorted(p.name for p in (out / name / "masks" / cls).iterdir())
            assert masks == sorted(f"{p.stem}.png" for p in _images(out, name, cls))
        assert json.loads((out / name / centres.HELD_OUT_INFO).read_text()) == info
        assert info["note"] == "synthetic data, not clinical" and info["seed"] == 1
    hr = _images(out, "scanner_hr", CYST)[0]
    assert _png_depth(hr) == (16, 0)
    with Image.open(hr) as im:
        assert np.asarray(im).max() <= 4095  # 12-bit detector in a 16-bit file
        assert im.size == (640, 320)
    with Image.open(_images(out, "scanner_lc", CYST)[0]) as im:
        assert im.format == "JPEG" and im.size == (224, 192)


def test_held_out_centres_are_idempotent(held_out: tuple[Path, dict, dict], tmp_path: Path):
    out, _, _ = held_out
    root = tmp_path / "data"
    shutil.copytree(out, root)
    args = {"seed": 1, "scale": SCALE, "classes": [CYST, MILD], "progress": False}
    kept = _tree(root / "scanner_hr")
    shutil.rmtree(root / "scanner_lc")
    assert set(write.add_held_out_centres(root, **args)) == {"scanner_lc"}  # only the missing
    assert _tree(root / "scanner_hr") == kept
    full = _tree(root)
    assert write.add_held_out_centres(root, **args) == {}  # all there: nothing written
    assert _tree(root) == full
    again = {p.relative_to(root): b for p, b in full.items() if "scanner_lc" in p.parts}
    first = {p.relative_to(out): b for p, b in _tree(out / "scanner_lc").items()}
    assert again == first  # rewritten byte for byte
    with pytest.raises(SavltError, match="remove the folder"):  # other arguments: refused
        write.add_held_out_centres(root, **{**args, "seed": 2})
    with pytest.raises(SavltError, match="scanner_hr, scanner_lc"):
        write.add_held_out_centres(root, names=("scanner_xx",), progress=False)
    assert _tree(root) == full
