"""Data protocol: scanning, bad inputs, splits, few-shot draws, decoding, datasets."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from savlt_model.config import load_config
from savlt_model.data import images, splits
from savlt_model.data.folders import Sample, load_sites, scan_center
from savlt_model.data.images import ImageSet, load_image, make_loader
from savlt_model.data.protocol import center_work_dir, split_parts
from savlt_model.data.splits import few_shot, split_center
from savlt_model.errors import SavltError

CLASSES = ["cyst", "cancer", "ectropion"]  # not alphabetical: labels follow this order


def make_center(root: Path, center: str, counts: dict[str, int]) -> Path:
    """Write ``counts[cls]`` 40x30 PNGs per class; pixel values encode the image index."""
    for cls, n in counts.items():
        folder = root / center / "images" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (40, 30), (i * 10 % 256, 50, 100)).save(folder / f"img{i:02d}.png")
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_center(tmp_path / "DATA", "mixed", dict.fromkeys(CLASSES, 20))


def saved(root: Path) -> Path:
    """Where a split test keeps its split file: outside the DATA folder."""
    return root.parent / "work" / "split.json"


# --- scan_center ---------------------------------------------------------------------


def test_scan_order_labels_and_ignored_files(tmp_path: Path) -> None:
    root = make_center(tmp_path, "c", {"cyst": 2, "cancer": 1, "ectropion": 1})
    folder = root / "c" / "images" / "cyst"
    Image.new("L", (40, 30)).save(folder / "UPPER.PNG")
    Image.new("L", (40, 30)).save(folder / ".hidden.png")
    (folder / "notes.txt").write_text("x")
    (folder / "meta.json").write_text("{}")
    samples = scan_center(root, "c", CLASSES)
    assert [s.key for s in samples] == [
        "cyst/UPPER.PNG",
        "cyst/img00.png",
        "cyst/img01.png",
        "cancer/img00.png",
        "ectropion/img00.png",
    ]
    assert [s.label for s in samples] == [0, 0, 0, 1, 2]
    assert samples[0].path == folder / "UPPER.PNG"
    assert scan_center(root, "c", CLASSES) == samples


def test_missing_centre(root: Path) -> None:
    with pytest.raises(SavltError, match=r"centre folder .*huaxi not found.*\['mixed'\]"):
        scan_center(root, "huaxi", CLASSES)


def test_missing_images_dir(root: Path) -> None:
    (root / "xiangya").mkdir()
    with pytest.raises(SavltError, match=r"xiangya/images not found — expected layout"):
        scan_center(root, "xiangya", CLASSES)


def test_missing_or_empty_class_is_a_warning_with_count_0(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hospital may have had no case of a class: it takes part without it."""
    empty = root / "mixed" / "images" / "mild"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    classes = [*CLASSES, "mild", "polyp"]  # "mild": empty folder, "polyp": no folder
    with caplog.at_level(logging.WARNING, logger="savlt_model.data.folders"):
        samples = scan_center(root, "mixed", classes)
    assert len(samples) == 60 and sorted({s.label for s in samples}) == [0, 1, 2]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        f"centre mixed, class '{c}' has 0 images in {root}/mixed/images/<class>; "
        "the centre takes part without it"
        for c in ("mild", "polyp")
    ]


def test_centre_without_images_stops(root: Path) -> None:
    for cls in CLASSES:
        for f in (root / "mixed" / "images" / cls).iterdir():
            f.unlink()
    with pytest.raises(SavltError, match=r"centre mixed has no readable images in .*<class>"):
        scan_center(root, "mixed", CLASSES)


def test_extra_class_folder(root: Path) -> None:
    (root / "mixed" / "images" / "polyp").mkdir()
    with pytest.raises(
        SavltError,
        match=r"centre mixed has classes not in task.classes: \['polyp'\] — add them",
    ):
        scan_center(root, "mixed", CLASSES)


def corrupt(root: Path) -> list[Path]:
    folder = root / "mixed" / "images" / "cancer"
    bad = [folder / "zz_garbage.png", folder / "zz_empty.jpg"]
    bad[0].write_bytes(b"not an image at all" * 10)
    bad[1].write_bytes(b"")
    return bad


def test_corrupt_file_stops(root: Path) -> None:
    corrupt(root)
    with pytest.raises(SavltError, match=r"unreadable image .*zz_empty.jpg .*on_bad_file: skip"):
        scan_center(root, "mixed", CLASSES)


def test_corrupt_file_skipped_and_counted(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    corrupt(root)
    with caplog.at_level(logging.WARNING, logger="savlt_model.data.folders"):
        samples = scan_center(root, "mixed", CLASSES, on_bad_file="skip")
    assert len(samples) == 60
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "centre mixed: skipped 2 unreadable image(s)" in warnings[0]
    assert "cancer/zz_garbage.png" in warnings[0]


def test_bad_on_bad_file_value(root: Path) -> None:
    with pytest.raises(SavltError, match=r"data.on_bad_file"):
        scan_center(root, "mixed", CLASSES, on_bad_file="ignore")


# --- split_center ----------------------------------------------------------------------


def test_split_fractions_saved_and_reused(root: Path) -> None:
    samples = scan_center(root, "mixed", CLASSES)
    split = split_center(samples, saved(root), seed=3)
    for label in range(3):
        sizes = [sum(s.label == label for s in split[p]) for p in ("train", "val", "test")]
        assert sizes == [9, 3, 8]
    keys = [s.key for p in ("train", "val", "test") for s in split[p]]
    assert sorted(keys) == sorted(s.key for s in samples)
    on_disk = json.loads(saved(root).read_text())
    assert on_disk == {p: [s.key for s in split[p]] for p in ("train", "val", "test")}
    # An existing file wins over seed and fractions.
    assert split_center(samples, saved(root), fractions=(0.8, 0.1, 0.1), seed=99) == split
    assert split_center(samples, root.parent / "s4.json", seed=4) != split


def test_split_reuse_with_deleted_sample(root: Path) -> None:
    samples = scan_center(root, "mixed", CLASSES)
    split_center(samples, saved(root))
    (root / "mixed" / "images" / "cyst" / "img05.png").unlink()
    with pytest.raises(SavltError, match=r"split.json names 1 image\(s\) not in the data: cyst/"):
        split_center(scan_center(root, "mixed", CLASSES), saved(root))


def test_split_file_missing_samples(root: Path) -> None:
    samples = scan_center(root, "mixed", CLASSES)
    split_center(samples, saved(root))
    Image.new("RGB", (40, 30)).save(root / "mixed" / "images" / "cyst" / "new.png")
    with pytest.raises(SavltError, match=r"misses 1 image\(s\): cyst/new.png — delete the file"):
        split_center(scan_center(root, "mixed", CLASSES), saved(root))


def test_split_small_classes_keep_one_per_part(tmp_path: Path) -> None:
    root = make_center(tmp_path, "c", {"cyst": 3, "cancer": 4, "ectropion": 2})
    split = split_center(scan_center(root, "c", CLASSES), tmp_path / "s.json")
    for label in (0, 1):
        assert all(any(s.label == label for s in split[p]) for p in ("train", "val", "test"))
    assert [sum(s.label == 2 for s in split[p]) for p in ("train", "val", "test")] == [1, 0, 1]
    assert (tmp_path / "s.json").is_file() and not (root / "c" / "split.json").exists()


def test_split_bad_fractions(root: Path) -> None:
    with pytest.raises(SavltError, match=r"data.split"):
        split_center(scan_center(root, "mixed", CLASSES), saved(root), fractions=(0.5, 0.5, 0.5))


def test_split_read_only_warns(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def read_only(path: Path, obj: object) -> Path:
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(splits, "write_json", read_only)
    samples = scan_center(root, "mixed", CLASSES)
    with caplog.at_level(logging.WARNING, logger="savlt_model.data.splits"):
        split = split_center(samples, saved(root))
    assert sum(len(v) for v in split.values()) == 60
    assert "could not save split" in caplog.text
    assert split_center(samples, saved(root)) == split  # seeded, so still the same


# --- few_shot --------------------------------------------------------------------------


def test_few_shot_determinism_and_order_independence(root: Path) -> None:
    samples = scan_center(root, "mixed", CLASSES)
    a = few_shot(samples, 4, seed=5, classes=CLASSES)
    assert len(a) == 12 and all(sum(s.label == c for s in a) == 4 for c in range(3))
    assert few_shot(samples, 4, seed=5, classes=CLASSES) == a
    assert few_shot(list(reversed(samples)), 4, seed=5, classes=CLASSES) == a
    assert few_shot(samples, 4, seed=42, classes=CLASSES) != a


def test_few_shot_cache_reused(root: Path, tmp_path: Path) -> None:
    samples = scan_center(root, "mixed", CLASSES)
    cache = tmp_path / "fs" / "seed5.json"
    first = few_shot(samples, 2, seed=5, classes=CLASSES, cache=cache)
    saved = json.loads(cache.read_text())
    assert saved == {"seed": 5, "shots": 2, "keys": [s.key for s in first]}
    # Replace the cached keys with another valid set: the next call must return it.
    other = [s.key for s in samples if s.key not in saved["keys"]][:6]
    cache.write_text(json.dumps({**saved, "keys": other}))
    assert [s.key for s in few_shot(samples, 2, seed=5, classes=CLASSES, cache=cache)] == sorted(
        other
    )
    with pytest.raises(SavltError, match="drawn for seed 5 and 2 shots, not seed 6"):
        few_shot(samples, 2, seed=6, classes=CLASSES, cache=cache)
    cache.write_text(json.dumps({**saved, "keys": ["cyst/gone.png"]}))
    with pytest.raises(SavltError, match=r"names 1 image.*cyst/gone.png — delete the file"):
        few_shot(samples, 2, seed=5, classes=CLASSES, cache=cache)


def test_few_shot_small_class_takes_all(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = [
        s for s in scan_center(root, "mixed", CLASSES) if s.label != 1 or s.key < "cancer/img03"
    ]
    with caplog.at_level(logging.WARNING, logger="savlt_model.data.splits"):
        chosen = few_shot(samples, 5, seed=1, classes=CLASSES)
    assert sum(s.label == 1 for s in chosen) == 3
    assert "class 'cancer' has 3 image(s), fewer than 5 shots" in caplog.text


# --- patients: grouped splits, leak refusal, patients-first draws ----------------------

PATIENT = r"(?P<patient>P\d+)_"


def make_patients(root: Path, center: str, patients: dict[str, int], scans: int) -> Path:
    """``patients[cls]`` patients per class, ``scans`` B-scans each, named ``P<id>_s<j>``."""
    pid = 0
    for cls, n in patients.items():
        folder = root / center / "images" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            for j in range(scans):
                Image.new("L", (40, 30), (pid * 7 + j) % 256).save(folder / f"P{pid:03d}_s{j}.png")
            pid += 1
    return root


def leaks(split: dict[str, list[Sample]]) -> int:
    """How many patients (read from the key) have images in more than one part."""
    parts: dict[str, set[str]] = {}
    for part, samples in split.items():
        for s in samples:
            parts.setdefault(s.key.rsplit("/", 1)[1].split("_")[0], set()).add(part)
    return sum(len(v) > 1 for v in parts.values())


def test_per_image_split_and_draw_unchanged(tmp_path: Path) -> None:
    """Without patient ids the split and the K-shot draw are the original ones, key for key."""
    root = make_center(tmp_path, "c", {"cyst": 7, "cancer": 5, "ectropion": 6})
    samples = scan_center(root, "c", CLASSES)
    assert all(s.patient is None for s in samples)
    split = split_center(samples, tmp_path / "split.json", seed=7)
    assert {p: [s.key.split("/")[1][3:5] for s in v] for p, v in split.items()} == {
        "train": ["00", "05", "06", "02", "04", "00", "02", "03"],
        "val": ["02", "03", "04"],
        "test": ["01", "03", "04", "00", "01", "01", "05"],
    }
    assert [s.key for s in few_shot(samples, 3, 11, CLASSES)] == [
        "cancer/img00.png", "cancer/img01.png", "cancer/img02.png",
        "cyst/img00.png", "cyst/img05.png", "cyst/img06.png",
        "ectropion/img01.png", "ectropion/img03.png", "ectropion/img04.png",
    ]  # fmt: skip


def test_patient_pattern_reads_ids(tmp_path: Path) -> None:
    root = make_patients(tmp_path, "c", {"cyst": 1, "cancer": 1, "ectropion": 1}, scans=2)
    samples = scan_center(root, "c", CLASSES, patient_pattern=PATIENT)
    assert [s.patient for s in samples] == ["P000", "P000", "P001", "P001", "P002", "P002"]
    assert scan_center(root, "c", CLASSES, patient_pattern=r"P(\d+)")[2].patient == "001"
    with pytest.raises(SavltError, match=r"centre c: data.patient_pattern 'Q\\d' does not match "):
        scan_center(root, "c", CLASSES, patient_pattern=r"Q\d")


def test_grouped_split_keeps_every_patient_in_one_part(tmp_path: Path) -> None:
    """Several B-scans per patient: the per-image split leaks, the grouped one never does."""
    root = make_patients(tmp_path, "c", {"cyst": 12, "cancer": 10, "ectropion": 14}, scans=4)
    plain = scan_center(root, "c", CLASSES)
    grouped = scan_center(root, "c", CLASSES, patient_pattern=PATIENT)
    per_image = [
        leaks(split_center(plain, tmp_path / f"i{seed}.json", seed=seed)) for seed in range(10)
    ]
    assert min(per_image) > 10  # of 36 patients: the original split leaks at every seed
    for seed in range(10):
        split = split_center(grouped, tmp_path / f"g{seed}.json", seed=seed)
        assert leaks(split) == 0
        assert sorted(s.key for p in split.values() for s in p) == sorted(s.key for s in grouped)
        for label, n in enumerate((12, 10, 14)):  # stratified: every class in every part,
            sizes = [sum(s.label == label for s in split[p]) // 4 for p in split]
            assert all(k >= 1 for k in sizes), sizes  # near 45/15/40 % of its patients
            assert abs(sizes[0] - 0.45 * n) <= 2 and abs(sizes[2] - 0.40 * n) <= 2, sizes
    # Reloaded from the file it wrote: the same grouped split.
    again = split_center(grouped, tmp_path / "g3.json", seed=99)
    assert again == split_center(grouped, tmp_path / "g3.json")


def test_split_file_with_a_leaking_patient_refused(tmp_path: Path) -> None:
    root = make_patients(tmp_path, "c", {"cyst": 4, "cancer": 4, "ectropion": 4}, scans=2)
    plain = scan_center(root, "c", CLASSES)
    grouped = scan_center(root, "c", CLASSES, patient_pattern=PATIENT)
    path = tmp_path / "split.json"
    split = split_center(plain, path, seed=0)  # per image: it leaks
    assert leaks(split) > 0
    with pytest.raises(SavltError, match=r"split file .*split.json puts patient P\d+ in \w+ and"):
        split_center(grouped, path)
    raw = {"train": [s.key for s in grouped[2:]], "val": [], "test": [grouped[1].key]}
    raw["val"] = [grouped[0].key]  # P000's two scans in val and test
    path.write_text(json.dumps(raw))
    with pytest.raises(SavltError, match=r"puts patient P000 in val and test \(e.g. cyst/P000_s1"):
        split_center(grouped, path)


def test_run_log_says_how_the_split_was_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_patients(tmp_path / "D", "c", {"cyst": 5, "cancer": 2, "ectropion": 4}, scans=2)
    sets = ["data.synthetic.enabled=false", f"data.root={root}", f"task.classes={CLASSES}"]
    sets += ["task.positive=[cancer]", f"data.work_dir={tmp_path / 'work'}"]
    with caplog.at_level(logging.INFO, logger="savlt_model.data.protocol"):
        split_parts(cfg := load_config(None, sets), root, "c")
    assert "centre c: no patient ids, so the split is per image" in caplog.text
    (center_work_dir(cfg, root, "c") / "split.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="savlt_model.data.protocol"):
        parts = split_parts(
            load_config(None, [*sets, f"data.patient_pattern={PATIENT}"]), root, "c"
        )
    assert "centre c: split by patient (11 patients): train 4, val 2, test 5" in caplog.text
    assert "centre c, class 'cancer' has no image in val" in caplog.text  # 2 patients only
    assert leaks(parts) == 0


def test_few_shot_takes_different_patients_first(tmp_path: Path) -> None:
    root = make_patients(tmp_path, "c", {"cyst": 6, "cancer": 3, "ectropion": 9}, scans=4)
    samples = scan_center(root, "c", CLASSES, patient_pattern=PATIENT)
    for seed in range(5):
        chosen = few_shot(samples, 5, seed, CLASSES)
        per_class = [[s.patient for s in chosen if s.label == c] for c in range(3)]
        assert [len(set(p)) for p in per_class] == [5, 3, 5]  # cancer: 3 patients, 5 shots
        assert sorted(Counter(per_class[1]).values()) == [1, 2, 2]
    assert few_shot(samples, 5, 0, CLASSES) != few_shot(samples, 5, 1, CLASSES)
    assert few_shot(list(reversed(samples)), 5, 3, CLASSES) == few_shot(samples, 5, 3, CLASSES)


# --- load_image ------------------------------------------------------------------------


def transparent_palette() -> Image.Image:
    """A palette image whose only colour is fully transparent: composites to black."""
    im = Image.new("P", (40, 30), 1)
    im.putpalette([0, 0, 0, 200, 100, 50])
    im.info["transparency"] = 1
    return im


@pytest.mark.parametrize(
    ("make", "suffix", "expected"),
    [
        (lambda: Image.new("L", (41, 17), 200), ".png", (200, 200, 200)),
        (lambda: Image.new("RGB", (13, 57), (10, 120, 250)), ".png", (10, 120, 250)),
        (lambda: Image.new("RGB", (33, 21), (10, 120, 250)), ".jpg", (10, 120, 250)),
        (lambda: Image.new("RGBA", (40, 30), (200, 100, 50, 128)), ".png", (100, 50, 25)),
        (lambda: Image.new("LA", (40, 30), (200, 255)), ".png", (200, 200, 200)),
        (lambda: Image.new("RGB", (40, 30), (0, 102, 204)).convert("P"), ".png", (0, 102, 204)),
        (transparent_palette, ".png", (0, 0, 0)),
        (lambda: Image.new("CMYK", (40, 30), (0, 0, 0, 0)), ".jpg", (255, 255, 255)),
        (lambda: Image.new("RGB", (40, 30), (30, 60, 90)), ".bmp", (30, 60, 90)),
        (lambda: Image.new("RGB", (40, 30), (30, 60, 90)), ".tiff", (30, 60, 90)),
    ],
)
def test_load_image_modes(tmp_path: Path, make, suffix: str, expected: tuple[int, ...]) -> None:
    path = tmp_path / f"im{suffix}"
    make().save(path)
    out = load_image(path, 24)
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)
    centre = out[:, 12, 12].tolist()
    assert all(abs(a - b) <= 3 for a, b in zip(centre, expected, strict=True)), centre


def save_16bit(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)


@pytest.mark.parametrize(
    ("peak", "expected"),
    [(65535, 255), (32768, 128), (4095, 255), (2048, 128), (255, 255), (100, 100)],
)
def test_load_image_16bit_scaling(tmp_path: Path, peak: int, expected: int) -> None:
    path = tmp_path / "wide.png"
    save_16bit(path, np.full((30, 50), peak))
    assert Image.open(path).mode.startswith("I")
    out = load_image(path, 16)
    assert out.shape == (3, 16, 16) and abs(int(out[0, 8, 8]) - expected) <= 1


def test_load_image_16bit_gradient_keeps_range(tmp_path: Path) -> None:
    path = tmp_path / "grad.tif"
    save_16bit(path, np.tile(np.linspace(0, 65535, 64), (20, 1)))
    out = load_image(path, 64)
    assert out[0, 10, 0] <= 3 and out[0, 10, -1] >= 250
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_load_image_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"garbage")
    with pytest.raises(SavltError, match=r"cannot decode image .*broken.png"):
        load_image(path, 8)


# --- ImageSet and make_loader -----------------------------------------------------------


def test_imageset_eval_normalises_and_decodes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    white, black = tmp_path / "w.png", tmp_path / "b.png"
    Image.new("RGB", (40, 30), (255, 255, 255)).save(white)
    Image.new("L", (40, 30), 0).save(black)
    samples = [Sample(white, 1, "x/w.png"), Sample(black, 0, "x/b.png")]
    calls: list[Path] = []
    real = images.load_image
    monkeypatch.setattr(
        images, "load_image", lambda p, s, i, f: calls.append(p) or real(p, s, i, f)
    )
    ds = ImageSet(samples, 16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5), train=False)
    again = ImageSet(samples, 16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5), train=True)
    for _ in range(3):
        x, y = ds[0]
        _ = again[1]
    assert calls == [white, black]  # two files, each decoded once for both sets
    assert ds.labels == [1, 0] and ds.samples == samples and len(ds) == 2
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and y == 1
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(
        x[1], torch.full((16, 16), 2.0)
    )
    assert torch.allclose(ds[1][0][0], torch.full((16, 16), -1.0))


def test_imageset_train_augments(tmp_path: Path) -> None:
    path = tmp_path / "grad.png"
    Image.fromarray(np.tile(np.arange(0, 240, 4, dtype=np.uint8), (30, 1))).save(path)
    ds = ImageSet([Sample(path, 2, "x/grad.png")], 32, (0.0,) * 3, (1.0,) * 3, train=True)
    torch.manual_seed(0)
    views = [ds[0][0] for _ in range(8)]
    assert all(v.shape == (3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert all(float(v.min()) >= 0.0 and float(v.max()) <= 1.0 for v in views)
    assert any(not torch.equal(views[0], v) for v in views[1:])
    plain = ImageSet(ds.samples, 32, (0.0,) * 3, (1.0,) * 3, train=False)
    assert torch.equal(plain[0][0], plain[0][0])


def test_make_loader_seeded_shuffle(root: Path) -> None:
    samples = scan_center(root, "mixed", CLASSES)
    ds = ImageSet(samples, 8, (0.5,) * 3, (0.5,) * 3, train=False)

    def order(seed: int) -> list[int]:
        loader = make_loader(ds, batch_size=7, shuffle=True, seed=seed)
        return [float(x.sum()) for xb, _ in loader for x in xb]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert len(make_loader(ds, 32, shuffle=True, seed=0, drop_last=True)) == 1
    with pytest.raises(SavltError, match=r"train.batch_size \(64\) exceeds the 60"):
        make_loader(ds, 64, shuffle=True, seed=0, drop_last=True)


# --- load_sites -------------------------------------------------------------------------


def test_load_sites(root: Path) -> None:
    samples = scan_center(root, "mixed", CLASSES)
    sites = {s.key: f"site{i % 3}" for i, s in enumerate(samples)}
    sites["cyst/skipped.png"] = "site9"  # extra entries (e.g. skipped files) are ignored
    (root / "mixed" / "sites.json").write_text(json.dumps(sites))
    got = load_sites(root, "mixed", samples)
    assert got == {s.key: sites[s.key] for s in samples}
    del sites["cancer/img04.png"]
    (root / "mixed" / "sites.json").write_text(json.dumps(sites))
    with pytest.raises(SavltError, match=r"sites.json has no site for 1 image\(s\): cancer/img04"):
        load_sites(root, "mixed", samples)


def test_load_sites_missing_file(root: Path) -> None:
    with pytest.raises(SavltError, match=r"mixed/sites.json not found — create it"):
        load_sites(root, "mixed", scan_center(root, "mixed", CLASSES))


def test_the_work_dir_is_outside_the_data_folder(tmp_path: Path) -> None:
    root = make_center(tmp_path / "D", "c", {"cyst": 3, "cancer": 3, "ectropion": 3})
    sets = ["data.synthetic.enabled=false", f"data.root={root}", f"task.classes={CLASSES}"]
    sets.append("task.positive=[cancer]")
    cfg = load_config(None, [*sets, f"data.work_dir={tmp_path / 'work'}"])
    work = center_work_dir(cfg, root, "c")
    assert work.parent.parent == tmp_path / "work" and work.name == "c"
    assert work.parent.name.startswith("D-")  # the DATA folder's name and its path's hash
    inside = load_config(None, [*sets, f"data.work_dir={root / 'cache'}"])
    with pytest.raises(SavltError, match=r"data.work_dir: .* is inside the DATA folder"):
        split_parts(inside, root, "c")
    assert not (root / "cache").exists()
