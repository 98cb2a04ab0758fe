"""Data sources besides class folders of PNGs: CSV manifests and DICOM files (written here)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from savlt_model.config import load_config
from savlt_model.data.folders import scan_center
from savlt_model.data.images import ImageSet, load_image
from savlt_model.data.manifest import read_manifest
from savlt_model.data.protocol import center_work_dir, split_parts
from savlt_model.errors import SavltError
from tests.test_data import CLASSES, PATIENT, leaks, make_center, make_patients


def write_manifest(path: Path, rows: list[str], header: str = "path,label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def folder_rows(root: Path, center: str, prefix: str = "") -> list[str]:
    """One manifest row per image of a class-folder centre, in a shuffled order."""
    rows = [
        f"{prefix}{p.parent.name}/{p.name},{p.parent.name}"
        for p in (root / center / "images").glob("*/*.png")
    ]
    random.Random(0).shuffle(rows)
    return rows


# --- manifest ----------------------------------------------------------------------------


def test_manifest_gives_the_same_samples_as_the_folder(tmp_path: Path) -> None:
    root = make_center(tmp_path, "c", {"cyst": 3, "cancer": 2, "ectropion": 4})
    manifest = write_manifest(root / "c" / "images" / "list.csv", folder_rows(root, "c"))
    from_csv = read_manifest(manifest, "c", CLASSES, per_centre=True)
    assert from_csv == scan_center(root, "c", CLASSES)  # paths, labels, keys, order
    assert len(from_csv) == 9 and from_csv[0].key == "cyst/img00.png"


def test_manifest_patients_and_centres(tmp_path: Path) -> None:
    """One manifest for the whole DATA folder: a centre column and a patient column."""
    root = make_center(tmp_path, "a", {"cyst": 2, "cancer": 2})
    make_center(root, "b", {"cyst": 1, "ectropion": 1})
    rows = [
        "a/images/cyst/img00.png,cyst,P1,a",
        "a/images/cyst/img01.png,cyst,P1,a",
        "b/images/cyst/img00.png,cyst,Q7,b",
        "a/images/cancer/img00.png,cancer,,a",  # no patient: its own
        "b/images/ectropion/img00.png,ectropion,Q8,b",
        "a/images/cancer/img01.png,cancer,P2,a",
    ]
    manifest = write_manifest(root / "all.csv", rows, "path,label,patient,center")
    a = read_manifest(manifest, "a", CLASSES)
    assert [(s.key, s.label, s.patient) for s in a] == [
        ("a/images/cyst/img00.png", 0, "P1"),
        ("a/images/cyst/img01.png", 0, "P1"),
        ("a/images/cancer/img00.png", 1, None),
        ("a/images/cancer/img01.png", 1, "P2"),
    ]
    assert [s.patient for s in read_manifest(manifest, "b", CLASSES)] == ["Q7", "Q8"]
    with pytest.raises(
        SavltError, match=r"all.csv has no rows for centre huaxi \(centres in it: a, b\)"
    ):
        read_manifest(manifest, "huaxi", CLASSES)


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        (
            ["cyst/img00.png,polyp"],
            "path,label",
            r"list.csv:2: label 'polyp' is not in task.classes",
        ),
        (
            ["cyst/img00.png,cyst", "cyst/gone.png,cyst"],
            "path,label",
            r"image .*cyst/gone.png not found \(.*list.csv:3\) — fix the path, or set "
            r"data.on_bad_file: skip",
        ),
        (
            ["cyst/img00.png,cyst", "cancer/img00.png,cancer", "./cyst/img00.png,cyst"],
            "path,label",
            r"list.csv:4: ./cyst/img00.png is listed again \(first on line 2\) — remove one",
        ),
        (["cyst/img00.png,cyst,P1"], "path,label", r"list.csv:2: 3 cells, the header has 2"),
        (["cyst/img00.png,"], "path,label", r"list.csv:2: empty label"),
        (["cyst/notes.txt,cyst"], "path,label", r"list.csv:2: cyst/notes.txt is not an image"),
        (
            ["cyst/img00.png,cyst,P1"],
            "path,label,patiend",
            r"list.csv:1: header .*unknown \['patiend'\]",
        ),
        (["cyst/img00.png"], "path", r"list.csv:1: header .*missing \['label'\]"),
    ],
)
def test_manifest_bad_rows_name_the_row(
    tmp_path: Path, rows: list[str], header: str, message: str
) -> None:
    root = make_center(tmp_path, "c", {"cyst": 2, "cancer": 1})
    manifest = write_manifest(root / "c" / "images" / "list.csv", rows, header)
    with pytest.raises(SavltError, match=message) as err:
        read_manifest(manifest, "c", CLASSES, per_centre=True)
    assert "\n" not in str(err.value)


def test_manifest_without_centre_column_must_be_per_centre(tmp_path: Path) -> None:
    root = make_center(tmp_path, "c", {"cyst": 1})
    manifest = write_manifest(root / "all.csv", ["c/images/cyst/img00.png,cyst"])
    with pytest.raises(SavltError, match=r"no 'center' column, .*'<center>/manifest.csv'"):
        read_manifest(manifest, "c", CLASSES)


def test_manifest_missing_file_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_center(tmp_path, "c", {"cyst": 2, "cancer": 1})
    rows = [*folder_rows(root, "c"), "cancer/gone.png,cancer"]
    manifest = write_manifest(root / "c" / "images" / "list.csv", rows)
    with caplog.at_level(logging.WARNING, logger="savlt_model.data.folders"):
        samples = read_manifest(manifest, "c", CLASSES, on_bad_file="skip", per_centre=True)
    assert len(samples) == 3
    assert "centre c: skipped 1 unreadable image(s): cancer/gone.png" in caplog.text
    assert "centre c, class 'ectropion' has 0 images in" in caplog.text


def test_manifest_through_the_config_splits_by_patient(tmp_path: Path) -> None:
    root = make_patients(tmp_path / "D", "c", {"cyst": 6, "cancer": 5, "ectropion": 6}, scans=3)
    rows = [
        f"{p.parent.name}/{p.name},{p.parent.name},{p.name.split('_')[0]}"
        for p in sorted((root / "c" / "images").glob("*/*.png"))
    ]
    write_manifest(root / "c" / "manifest.csv", [f"images/{r}" for r in rows], "path,label,patient")
    cfg = load_config(
        None,
        [
            "data.synthetic.enabled=false",
            f"data.root={root}",
            "data.manifest=<center>/manifest.csv",
            f"task.classes={CLASSES}",
            "task.positive=[cancer]",
            f"data.work_dir={tmp_path / 'work'}",
        ],
    )
    parts = split_parts(cfg, root, "c")
    assert sum(len(p) for p in parts.values()) == 51 and leaks(parts) == 0
    assert (center_work_dir(cfg, root, "c") / "split.json").is_file()
    assert not (root / "c" / "split.json").exists()  # the data folder is not written to


# --- DICOM -------------------------------------------------------------------------------


def write_dicom(
    path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", patient: str = ""
) -> Path:
    """A minimal secondary-capture DICOM file; (F, H, W) pixels make a multi-frame one."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient
    ds.set_pixel_data(
        pixels, photometric_interpretation=photometric, bits_stored=8 * pixels.itemsize
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _pixels(bits: int, seed: int = 0, frames: int | None = None) -> np.ndarray:
    """Random square B-scans: 8-bit, or 12-bit data in 16-bit words (a common OCT export)."""
    shape = (24, 24) if frames is None else (frames, 24, 24)
    rng = np.random.default_rng(seed)
    top = 255 if bits == 8 else 4095
    return rng.integers(0, top + 1, shape).astype(np.uint8 if bits == 8 else np.uint16)


@pytest.mark.parametrize("bits", [8, 16])
def test_dicom_decodes_like_the_same_png(tmp_path: Path, bits: int) -> None:
    """MONOCHROME2 decodes exactly as a PNG of the same values; MONOCHROME1 (white is 0)
    as its inverse."""
    pixels = _pixels(bits)
    png = tmp_path / "b.png"
    Image.fromarray(pixels).save(png)
    mono2 = write_dicom(tmp_path / "m2.dcm", pixels)
    mono1 = write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1")
    expected = load_image(png, 24)
    assert torch.equal(load_image(mono2, 24), expected)
    assert torch.equal(load_image(mono1, 24), 255 - expected)
    assert float(expected.float().std()) > 50  # the pixels are really there


def test_dicom_volume_is_one_sample_per_frame(tmp_path: Path) -> None:
    volume = _pixels(16, seed=1, frames=3)
    write_dicom(tmp_path / "c" / "images" / "cyst" / "vol.dcm", volume, patient="PX")
    write_dicom(tmp_path / "c" / "images" / "cancer" / "one.dcm", _pixels(8), patient="PY")
    samples = scan_center(tmp_path, "c", CLASSES)
    assert [(s.key, s.label, s.patient, s.frame) for s in samples] == [
        ("cyst/vol.dcm#0", 0, "PX", 0),
        ("cyst/vol.dcm#1", 0, "PX", 1),
        ("cyst/vol.dcm#2", 0, "PX", 2),
        ("cancer/one.dcm", 1, "PY", None),
    ]
    ds = ImageSet(samples[:3], 24, (0.0,) * 3, (1.0,) * 3, train=False)
    for i in range(3):
        png = tmp_path / f"f{i}.png"
        Image.fromarray(volume[i]).save(png)
        assert torch.equal(ds.images[i], load_image(png, 24))
    # A pattern or a manifest column wins over the file's PatientID.
    assert scan_center(tmp_path, "c", CLASSES, patient_pattern=r"/(\w+)\.")[0].patient == "vol"


def test_dicom_folder_gives_the_same_samples_as_the_png_folder(tmp_path: Path) -> None:
    """The same B-scans as PNGs (patient in the name) and as DICOM (patient in the file)."""
    pngs = make_patients(tmp_path / "png", "c", {"cyst": 4, "cancer": 3, "ectropion": 4}, scans=2)
    for p in sorted((pngs / "c" / "images").glob("*/*.png")):
        with Image.open(p) as im:
            pixels = np.asarray(im)
        dcm = tmp_path / "dcm" / "c" / "images" / p.parent.name / f"{p.stem}.dcm"
        write_dicom(dcm, pixels, patient=p.name.split("_")[0])
    a = scan_center(pngs, "c", CLASSES, patient_pattern=PATIENT)
    b = scan_center(tmp_path / "dcm", "c", CLASSES)
    assert [(s.label, s.patient, s.key[:-4]) for s in a] == [
        (s.label, s.patient, s.key[:-4]) for s in b
    ]
    load = lambda ss: ImageSet(ss, 16, (0.0,) * 3, (1.0,) * 3, train=False).images  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(load(a), load(b), strict=True))


def test_unreadable_dicom_stops_or_is_skipped(tmp_path: Path) -> None:
    write_dicom(tmp_path / "c" / "images" / "cyst" / "ok.dcm", _pixels(8))
    (tmp_path / "c" / "images" / "cyst" / "bad.dcm").write_bytes(b"DICM but not really" * 20)
    with pytest.raises(SavltError, match=r"unreadable image .*bad.dcm — replace or delete it"):
        scan_center(tmp_path, "c", CLASSES)
    assert [s.key for s in scan_center(tmp_path, "c", CLASSES, on_bad_file="skip")] == [
        "cyst/ok.dcm"
    ]
