"""The held-out style family (synthetic/family.py): fixed ranges, mostly outside the
training sites, new axes that change the pixels of family styles only, and centres written
next to a DATA folder without touching its bytes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from savlt_model.data.folders import scan_center
from savlt_model.errors import SavltError
from synthetic import family, write
from synthetic.centres import HELD_OUT_INFO, HELD_OUT_PROFILES, PROFILES, HeldOutProfile
from synthetic.render import SIGNATURES, render
from tools.cli import main

CYST, MILD = "cyst", "mild_inflammation"
NEW_AXES = ("speckle_grain", "shadow_count", "shadow_strength", "specular")
# The generator's own axes (the new ones and layer contrast are outside trivially).
OLD_AXES = [k for k in family.FAMILY_RANGES if k not in (*NEW_AXES, "layer_contrast")]
# 35 renders (every standard and held-out profile x every class) made at the commit before
# the family existed (dd84c1d): mean, spread, every 12th row's mean and the mask's area.
# Statistics, not a hash of the float32 pixels: numpy's vectorised maths differs in the last
# bit between CPUs, while a changed random draw moves these by far more than the tolerance.
BEFORE_FAMILY = Path(__file__).parent / "fixtures" / "render-before-family.json"


def test_standard_profiles_render_the_same_pixels_as_before_the_family():
    before = json.loads(BEFORE_FAMILY.read_text())
    renders = {}
    for name, prof in {**PROFILES, **HELD_OUT_PROFILES}.items():
        for k, cls in enumerate(SIGNATURES):
            img, mask = render(cls, prof, np.random.default_rng([7, k, len(name)]))
            x = img.astype(np.float64)
            renders[f"{name}/{cls}"] = (x.mean(), x.std(), x.mean(axis=1)[::12], mask.sum())
    assert sorted(renders) == sorted(before)
    for key, (mean, std, rows, area) in renders.items():
        ref = before[key]
        assert area == ref["mask"], key
        np.testing.assert_allclose(
            [mean, std, *rows],
            [ref["mean"], ref["std"], *ref["rows"]],
            rtol=0,
            atol=1e-6,
            err_msg=key,
        )


def test_family_styles_are_fixed_in_range_and_mostly_outside_the_training_sites():
    spans = family.training_ranges()
    assert spans["range_db"] == (34.0, 44.0) and spans["speckle_grain"] == (0.0, 0.0)
    for seed in range(4):
        styles = [family.family_style(seed, k)[0] for k in range(20)]
        for prof in styles:
            for name, (lo, hi) in family.FAMILY_RANGES.items():
                assert lo <= getattr(prof, name) <= hi, name
        outside = [[a for a in family.outside_axes(p) if a in OLD_AXES] for p in styles]
        assert sum(len(o) >= 2 for o in outside) >= len(styles) / 2, seed
    assert family.family_style(3, 5) == family.family_style(3, 5)
    assert family.family_style(3, 5) != family.family_style(4, 5)


def test_new_axes_change_family_pixels_and_are_neutral_at_zero():
    base = family.family_style(1, 0)[0]
    zero = dataclasses.replace(base, **dict.fromkeys(NEW_AXES, 0.0))
    fields = {f.name: getattr(zero, f.name) for f in dataclasses.fields(HeldOutProfile)}
    plain = HeldOutProfile(**fields)
    a = render(CYST, zero, np.random.default_rng(5))[0]
    assert np.array_equal(a, render(CYST, plain, np.random.default_rng(5))[0])
    for axis, value in (("speckle_grain", 2.0), ("shadow_count", 5.0), ("specular", 0.8)):
        other = dataclasses.replace(zero, **{axis: value, "shadow_strength": 0.8})
        b = render(CYST, other, np.random.default_rng(5))[0]
        assert np.abs(a - b).mean() > 1e-3, axis
    saturated = dataclasses.replace(zero, specular=0.8)
    assert (render(CYST, saturated, np.random.default_rng(5))[0] == 1.0).mean() > (a == 1.0).mean()


def _tree(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_family_centres_are_written_beside_the_data_and_leave_it_alone(tmp_path: Path, capsys):
    out = tmp_path / "data"
    write.generate(out, seed=2, scale=0.05, classes=[CYST, MILD], progress=False)
    before = _tree(out)
    args = {"seed": 2, "scale": 0.05, "classes": [CYST, MILD], "progress": False}
    written = write.add_family_centres(out, 2, 1, **args)
    assert set(written) == {"family1_00", "family1_01"}
    assert {p: p.read_bytes() for p in before} == before
    for name, info in written.items():
        assert info["profile"] == dataclasses.asdict(family.family_style(1, info["index"])[0])
        assert json.loads((out / name / HELD_OUT_INFO).read_text()) == info
        assert len(scan_center(out, name, [CYST, MILD])) == 8  # 4 per class (the floor)
    full = _tree(out)
    assert write.add_family_centres(out, 2, 1, **args) == {}  # idempotent
    assert _tree(out) == full
    with pytest.raises(SavltError, match="remove the folder"):
        write.add_family_centres(out, 1, 1, **{**args, "seed": 3})
    with pytest.raises(SavltError, match=r"--held-out-family must be 1\.\.100"):
        write.add_family_centres(out, 0, 1, **args)
    # `savlt synth --held-out-family N --family-seed S`: the data folder, then the family
    cli = tmp_path / "cli"
    argv = ["synth", "--out", str(cli), "--scale", "0.05", "--held-out-family", "1"]
    assert main([*argv, "--family-seed", "2"]) == 0
    assert "1 centre(s) written" in capsys.readouterr().out
    assert (cli / "mixed").is_dir() and (cli / "family2_00" / HELD_OUT_INFO).is_file()
