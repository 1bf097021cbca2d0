"""Tests of cytoclr.anchor: `cytoclr anchor` end to end on an exported TIFF, its refusals, the series check and the numbers
of the demonstration and of affine.json."""
import numpy as np
import pytest

from cytoclr.alignment import plane_angle_deg, point_error_mm
from cytoclr.anchor import (anchor_cli, encoder_from_checkpoint, errors_on_grid, manifest_entry, placement_summary,
                            series_consistency)
from cytoclr.core import DataError


# ---------------------------------------------------------------- a section nobody has registered: cytoclr anchor
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    "A phantom section exported as a tiled TIFF with its mask, a seeded encoder checkpoint and its frame of that section."
    from cytoclr.anchoring import Frame, encoder_space
    from cytoclr.models import embed
    from cytoclr.sampling import extract_patch, mask_grid
    from cytoclr.export import export_phantom
    from cytoclr.manifest import load_manifest
    from cytoclr.training import TrainConfig, checkpoint_path, train
    
    d = tmp_path_factory.mktemp("anchor")
    man_path = export_phantom(d / "export", brains=1, sections=1, spacing_um=256.0, modality="nissl", format="tiff",
                              positions=[-18.0], progress=False)
    man = load_manifest(man_path)
    e = man.entries[0]
    sec = man.section(e.id)
    for mod, seed in (("nissl", 0), ("pli", 0), ("nissl", 7)):
        train(TrainConfig(method="random", modality=mod, seed=seed, proj_hidden=16, proj_dim=8), None, d / f"run_{mod}_{seed}",
              progress=False, write_metrics=False)
    enc, _ = encoder_from_checkpoint(checkpoint_path(d / "run_nissl_0", "nissl", "random"))
    rc = mask_grid(sec, 2.0)
    patches = np.stack([extract_patch(sec, p, 16) for p in rc])
    feats = embed(enc, patches)
    xyz = sec.to_reference(rc)
    fr = Frame(xyz=xyz, hemi=np.zeros(len(rc), np.int8), section=np.zeros(len(rc), np.int64), rc=rc,
               brain=np.array(["phantom-0"] * len(rc)), section_ids=[e.id], features=feats,
               space=encoder_space(enc, "nissl", "random"), meta={"patch_px": 16})
    fr.save(d / "frame")
    mask = man_path.parent / "phantom-0" / "nissl_000_mask.tif"
    return dict(d=d, image=e.path, mask=mask, affine=e.affine, n=len(rc))


def _cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "cytoclr", "anchor", *map(str, args)], capture_output=True, text=True)


def test_anchor_places_an_exported_tiff_without_its_transform(exported):
    "The command's path end to end: identical patches in the frame, so the plane must come out right."
    import json
    import yaml
    d = exported["d"]
    r = _cli(exported["image"], "--modality", "nissl", "--spacing-um", 256, "--checkpoint",
             d / "run_nissl_0" / "checkpoints" / "nissl" / "random", "--frame", d / "frame", "--mask", exported["mask"],
             "--out", d / "out", "--grid-mm", 2, "--min-inliers", 6, "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "placed;" in r.stdout and "Traceback" not in r.stderr
    out = d / "out" / "nissl_000"
    info = json.loads((out / "affine.json").read_text())
    A = np.array(info["affine"])
    assert plane_angle_deg(A, exported["affine"]) < 1.0
    assert np.median(point_error_mm(A, exported["affine"], np.array([[0, 0], [300, 400], [600, 100]]))) < 1.0
    assert info["inliers"] >= 6 and 0 < info["inlier_share"] <= 1
    rows = (out / "matches.csv").read_text().splitlines()
    assert rows[0] == "row,col,x,y,z,similarity,inlier" and len(rows) == exported["n"] + 1
    entry = yaml.safe_load((out / "manifest_entry.yml").read_text())["sections"][0]
    assert entry["modality"] == "nissl" and np.allclose(entry["transform"]["affine"], A, atol=1e-5)
    assert (out / "figures" / "placed.png").stat().st_size > 1000


def test_anchor_refuses_bad_input_with_a_message(exported, tmp_path):
    d = exported["d"]
    base = ["--spacing-um", 256, "--frame", d / "frame", "--out", tmp_path / "o", "--grid-mm", 2, "--no-progress"]
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\0garbage")
    cases = [
        ([bad, "--modality", "nissl", "--checkpoint", d / "run_nissl_0/checkpoints/nissl/random", *base], "broken.tif"),
        ([exported["image"], "--modality", "nissl", "--checkpoint", d / "run_pli_0/checkpoints/pli/random", *base],
         "is a pli encoder"),
        ([exported["image"], "--modality", "nissl", "--checkpoint", d / "run_nissl_7/checkpoints/nissl/random", *base],
         "another encoder"),
        ([exported["image"], "--modality", "nissl", "--spacing-um", 256, "--out", tmp_path / "o"], "--run RUN"),
    ]
    for args, phrase in cases:
        r = _cli(*args)
        assert r.returncode == 2, (phrase, r.stdout, r.stderr)
        assert phrase in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_series_consistency():
    mk = lambda n, c: {"normal": n, "centre_mm": c}
    ok = series_consistency([mk([0, 1, 0], [0, -10, 0]), mk([0, 1, 0.02], [0, -5, 0]), mk([0, -1, 0], [0, 0, 0])])
    assert ok["consistent"]
    assert not series_consistency([mk([0, 1, 0], [0, -10, 0]), mk([0, 1, 0], [0, 5, 0]), mk([0, 1, 0], [0, 0, 0])])["consistent"]
    assert not series_consistency([mk([0, 1, 0], [0, 0, 0]), mk([1, 1, 0], [0, 5, 0])])["consistent"]


def test_errors_on_grid_by_hand():
    A = np.array([[0.0, 0.1, 5.0], [0.0, 0.0, -20.0], [-0.1, 0.0, 30.0]])
    e = errors_on_grid(A + np.array([[0, 0, 3.0], [0, 0, 4.0], [0, 0, 0]]), A, (100, 120))  # 5 mm everywhere
    assert e["plane_angle_error_deg"] == 0.0 and e["median_point_error_mm"] == pytest.approx(5.0, abs=1e-12)
    B = A.copy()
    B[:, 1] *= 2  # columns twice as long: the error grows from 0 at column 0 to 0.1 * 119 mm at the last column
    e = errors_on_grid(B, A, (100, 120), n=3)  # columns 0, 59.5, 119
    assert e["median_point_error_mm"] == pytest.approx(0.1 * 59.5) and e["plane_angle_error_deg"] == pytest.approx(0, abs=1e-9)


def test_placement_summary_and_manifest_entry_by_hand(tmp_path):
    from types import SimpleNamespace
    A = np.array([[0.0, 0.1, 5.0], [0.0, 0.0, -20.0], [-0.1, 0.0, 30.0]])
    rc = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], float)
    xyz = rc @ A[:, :2].T + A[:, 2] + np.array([[0, 1, 0], [0, 2, 0], [0, 3, 0], [0, 40, 0]])  # residuals 1, 2, 3, 40
    pl = SimpleNamespace(A=A, matches=np.arange(4), inliers=np.array([1, 1, 1, 0], bool), history=[{"inliers": 3}])
    s = placement_summary("img.tif", pl, rc, xyz, (11, 21))
    assert s["inliers"] == 3 and s["inlier_share"] == 0.75 and s["patches"] == 4
    assert s["median_residual_mm"] == 2.0 and s["p90_residual_mm"] == pytest.approx(2.8)
    np.testing.assert_allclose(s["normal"], [0, -1, 0], atol=1e-12)  # (-z) x (+x) = -y
    np.testing.assert_allclose(s["centre_mm"], A @ [5.0, 10.0, 1.0])
    img = tmp_path / "img.tif"
    img.write_bytes(b"x")
    e = manifest_entry(img, s, "nissl", 100.0)
    assert e["id"] == "img" and e["transform"]["affine"] == A.tolist() and e["provenance"]["inliers"] == 3
    assert "mask" not in e and e["spacing_um"] == 100.0


def test_anchor_cli_takes_keywords_and_refuses_without_inputs(tmp_path):
    with pytest.raises(DataError, match="--run RUN"):
        anchor_cli(images=["a.tif"], modality="nissl", spacing_um=20.0, out=tmp_path)
    with pytest.raises(DataError, match="run chapter 9 first"):
        anchor_cli(images=["a.tif"], modality="nissl", spacing_um=20.0, out=tmp_path, run=tmp_path)
    with pytest.raises(TypeError):
        anchor_cli(["a.tif"], "nissl", 20.0, tmp_path)  # keywords only


def test_anchor_ransac_estimator_is_still_available(exported):
    d = exported["d"]
    r = _cli(exported["image"], "--modality", "nissl", "--spacing-um", 256, "--checkpoint",
             d / "run_nissl_0" / "checkpoints" / "nissl" / "random", "--frame", d / "frame", "--mask", exported["mask"],
             "--out", d / "out_ransac", "--grid-mm", 2, "--min-inliers", 6, "--no-progress", "--estimator", "ransac")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "placed; ransac" in r.stdout


def test_anchor_places_a_jpeg_export_without_mask_at_another_pixel_size(exported, tmp_path):
    """No mask, JPEG tiles, 128 um/px while the frame records 256 um: the image is resampled to the frame's pixel size,
    placed by the section-level estimator, and the affine is reported for the image's own pixels."""
    import json
    from cytoclr.anchoring import Frame
    from cytoclr.export import export_phantom
    from cytoclr.manifest import load_manifest
    d = exported["d"]
    fr = Frame.load(d / "frame")
    fr.meta["spacing_um"] = 256.0
    fr.save(tmp_path / "frame")
    man_path = export_phantom(tmp_path / "export", brains=1, sections=1, spacing_um=128.0, modality="nissl",
                              format="tiff", positions=[-18.0], progress=False, compression="jpeg", masks=False)
    e = load_manifest(man_path).entries[0]
    r = _cli(e.path, "--modality", "nissl", "--spacing-um", 128, "--checkpoint",
             d / "run_nissl_0" / "checkpoints" / "nissl" / "random", "--frame", tmp_path / "frame",
             "--out", tmp_path / "out", "--grid-mm", 2, "--min-inliers", 6, "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads((tmp_path / "out" / "nissl_000" / "affine.json").read_text())
    A = np.array(info["affine"])
    assert info["resampled_to_um"] == 256.0 and info["estimator"] == "sections"
    assert plane_angle_deg(A, e.affine) < 2.0
    assert np.median(point_error_mm(A, e.affine, np.array([[0, 0], [600, 800], [1200, 200]]))) < 2.0


def test_to_source_pixels_is_exact():
    from cytoclr.anchor import to_source_pixels

    class Half:  # a reader at twice the pixel size: centres coincide, (r + 0.5) / 2 - 0.5
        def from_source(self, rc):
            return (np.asarray(rc, float) + 0.5) / 2 - 0.5

    A = np.array([[0.0, 0.1, 5.0], [0.0, 0.0, -20.0], [-0.1, 0.0, 30.0]])
    As = to_source_pixels(A, Half())
    rc = np.array([[10.0, 20.0], [333.0, 7.0]])
    assert np.allclose(rc @ As[:, :2].T + As[:, 2], Half().from_source(rc) @ A[:, :2].T + A[:, 2])
    assert np.array_equal(to_source_pixels(A, None), A)
