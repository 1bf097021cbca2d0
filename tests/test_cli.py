"Tests of cytoclr.cli: every subcommand in the parser, and the keyword arguments the parser's options become."
import pytest

import cytoclr.anchor
import cytoclr.export
from cytoclr.cli import build_parser, main


def test_every_subcommand_is_in_the_parser():
    p = build_parser()
    for argv in (["run"], ["book"], ["data", "check", "m.yml"], ["phantom", "export", "--out", "o"], ["clean"],
                 ["anchor", "a.tif", "--modality", "nissl", "--spacing-um", "20", "--out", "o"]):
        assert p.parse_args(argv).command == argv[0]
    with pytest.raises(SystemExit):
        p.parse_args(["no-such-command"])


def test_anchor_options_become_keywords(monkeypatch):
    got = {}
    monkeypatch.setattr(cytoclr.anchor, "anchor_cli", lambda **kw: got.update(kw) or 0)
    assert main(["anchor", "a.tif", "b.tif", "--modality", "pli", "--spacing-um", "64", "--run", "runs/quick",
                 "--out", "placed", "--grid-mm", "2", "--min-inliers", "8", "--no-progress"]) == 0
    assert got == dict(images=["a.tif", "b.tif"], modality="pli", spacing_um=64.0, out="placed", run="runs/quick",
                       method="geodesic", checkpoint=None, frame=None, mask=None, grid_mm=2.0, threshold_mm=5.0,
                       min_inliers=8, no_progress=True, estimator="sections", cortex_head=None, k=20)
    got.clear()
    assert main(["anchor", "a.tif", "--modality", "nissl", "--spacing-um", "32", "--run", "r", "--out", "o",
                 "--estimator", "ransac", "--cortex-head", "h.json", "--k", "30"]) == 0
    assert (got["estimator"], got["cortex_head"], got["k"]) == ("ransac", "h.json", 30)


def test_phantom_export_options_become_keywords(monkeypatch):
    got = {}
    monkeypatch.setattr(cytoclr.export, "export_phantom_cli", lambda **kw: got.update(kw) or 0)
    assert main(["phantom", "export", "--out", "o", "--brains", "1", "--positions", "-10", "5"]) == 0
    assert got == dict(out="o", brains=1, sections=4, spacing_um=32.0, modality="nissl", seed=0, format="zarr",
                       axis="coronal", positions=[-10.0, 5.0], rotation_deg=0.0, flip=False, tilt_deg=None,
                       compression="lossless", no_mask=False)
    main(["phantom", "export", "--out", "o", "--rotation-deg", "-15", "--flip", "--tilt-deg", "3", "-2",
          "--compression", "jpeg", "--no-mask"])
    assert {k: got[k] for k in ("rotation_deg", "flip", "tilt_deg", "compression", "no_mask")} == dict(
        rotation_deg=-15.0, flip=True, tilt_deg=[3.0, -2.0], compression="jpeg", no_mask=True)


def test_phantom_export_of_unregistered_looking_sections(tmp_path, capsys):
    """End to end: a tiny rotated, mirrored, tilted JPEG export without masks; its manifest keeps the true affine.
    (Brain, plane and tilt as in test_export's cut export: the plane's geometry is computed once, then cached.)"""
    import numpy as np
    import tifffile
    from cytoclr.manifest import load_manifest
    from cytoclr.phantom import PhantomBrain
    from cytoclr.reference import load_reference
    out = tmp_path / "o"
    assert main(["phantom", "export", "--out", str(out), "--brains", "1", "--sections", "1", "--spacing-um", "512",
                 "--modality", "pli", "--seed", "2", "--format", "tiff", "--rotation-deg", "90", "--flip", "--tilt-deg", "6", "-4",
                 "--compression", "jpeg", "--no-mask"]) == 0
    assert "wrote 1 phantom sections" in capsys.readouterr().out
    man = load_manifest(out / "data_manifest.yml")
    (e,) = man.entries
    assert tifffile.TiffFile(e.path).pages[0].compression == tifffile.COMPRESSION.JPEG and e.mask is None
    y = man.data["sections"][0]["provenance"]["phantom"]["y_mm"]
    want = PhantomBrain(seed=2, ref=load_reference()).section(index=0, y_mm=y, spacing_um=512.0, modality="pli",
                                                              tilt_deg=(6.0, -4.0), rotation_deg=90.0, flip=True)
    assert np.array_equal(e.affine, np.asarray(want.affine, float)) and man.sections[0].shape == tuple(want.shape)
    assert main(["phantom", "export", "--out", str(tmp_path / "p"), "--tilt-deg", "60", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--tilt-deg" in err and "Traceback" not in err


def test_anchor_errors_are_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["anchor", "a.tif", "--modality", "nissl", "--spacing-um", "20", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--run RUN" in err and "Traceback" not in err
