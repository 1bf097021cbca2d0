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
                       min_inliers=8, no_progress=True)


def test_phantom_export_options_become_keywords(monkeypatch):
    got = {}
    monkeypatch.setattr(cytoclr.export, "export_phantom_cli", lambda **kw: got.update(kw) or 0)
    assert main(["phantom", "export", "--out", "o", "--brains", "1", "--positions", "-10", "5"]) == 0
    assert got == dict(out="o", brains=1, sections=4, spacing_um=32.0, modality="nissl", seed=0, format="zarr",
                       axis="coronal", positions=[-10.0, 5.0])


def test_anchor_errors_are_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["anchor", "a.tif", "--modality", "nissl", "--spacing-um", "20", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--run RUN" in err and "Traceback" not in err
