"`cytoclr data check`: every problem reported once, with its field path and line; exit code 1; never a traceback."
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from cytoclr.core import DataError, path_fingerprint
from cytoclr.manifest import load_manifest
from cytoclr.manifest_check import check_manifest_cli
from cytoclr.readers import open_image

from helpers import NOT_MANIFESTS, WRONG_TYPES, _good_manifest, _wrong, _write
from helpers import HAS_PHANTOM

def _break(kind, man, tmp_path):
    "Apply one kind of damage; return (expected field path, expected phrase)."
    s = man["sections"]
    if kind == "missing_field":
        del s[1]["spacing_um"]
        return "sections[1].spacing_um", "missing required field"
    if kind == "unknown_field":
        s[0]["spacng_um"] = s[0].pop("spacing_um")
        return "sections[0].spacng_um", "did you mean 'spacing_um'"
    if kind == "missing_file":
        s[2]["path"] = "data/nope.png"
        return "sections[2].path", "file not found"
    if kind == "checksum":
        (tmp_path / "data" / "c.png").write_bytes((tmp_path / "data" / "c.png").read_bytes() + b"\0")
        return "sections[2].sha256", "checksum mismatch"
    if kind == "corrupt_image":
        (tmp_path / "data" / "b.tif").write_bytes(b"II*\0" + b"\x13" * 64)
        s[1]["sha256"] = path_fingerprint(tmp_path / "data" / "b.tif")
        return "sections[1].path", "unreadable image"
    if kind == "corrupt_chunk":
        chunk = sorted(q for q in (tmp_path / "data" / "a.ome.zarr" / "0" / "c").rglob("*") if q.is_file())[0]
        chunk.write_bytes(b"garbage")
        s[0]["sha256"] = path_fingerprint(tmp_path / "data" / "a.ome.zarr")
        return "sections[0].path", "corrupt image"
    if kind == "channels":
        s[2]["modality"] = "pli"
        return "sections[2].path", "pli needs 3 channel(s), the image has 1"
    if kind == "dtype":
        nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int64), np.eye(4), dtype=np.int64), tmp_path / "data" / "d.nii")
        s[0]["path"], s[0]["sha256"] = "data/d.nii", path_fingerprint(tmp_path / "data" / "d.nii")
        return "sections[0].path", "pixel type int64 is not supported"
    if kind == "spacing":
        s[1]["spacing_um"] = -1
        return "sections[1].spacing_um", "must be > 0, got -1"
    if kind == "degenerate":
        s[0]["transform"]["affine"] = [[0, 1, 0], [0, 2, 0], [0, 3, 0]]
        return "sections[0].transform.affine", "degenerate"
    if kind == "unknown_brain":
        s[2]["brain"] = "lab-9"
        return "sections[2].brain", "unknown brain 'lab-9'"
    if kind == "brain_in_two_splits":
        man["splits"]["train"] = ["lab-1/a", "lab-2/c"]
        return "splits.unseen_brains[0]", "brain 'lab-2' is held out but also has sections in train"
    if kind == "section_in_two_splits":
        man["splits"]["validation"] = ["lab-1/a"]
        return "splits.validation", "in two splits"
    if kind == "duplicate_id":
        s[1]["id"] = "lab-1/a"
        return "sections[1].id", "duplicate section id"
    if kind == "unknown_split":
        man["splits"]["tset"] = man["splits"].pop("test")
        return "splits.tset", "did you mean 'test'"
    if kind == "bad_modality":
        s[0]["modality"] = "nisl"
        return "sections[0].modality", "must be one of"
    if kind == "empty_mask":
        Image.fromarray(np.zeros((64, 80), np.uint8)).save(tmp_path / "data" / "c_mask.png")
        s[2]["mask"]["sha256"] = path_fingerprint(tmp_path / "data" / "c_mask.png")
        return "sections[2].mask", "the cortex mask is empty"
    if kind == "displacement":
        s[0]["transform"]["displacement"] = "warp.nii"
        return "sections[0].transform.displacement", "not supported yet"
    if kind == "pairing_negative":
        man["pairing"] = {"max_distance_mm": -0.5}
        return "pairing.max_distance_mm", "must be > 0, got -0.5"
    if kind == "pairing_unknown":
        man["pairing"] = {"max_distance": 1.0}
        return "pairing.max_distance", "did you mean 'max_distance_mm'"
    raise AssertionError(kind)


BROKEN = ["missing_field", "unknown_field", "missing_file", "checksum", "corrupt_image", "corrupt_chunk", "channels",
          "dtype", "spacing", "degenerate", "unknown_brain", "brain_in_two_splits", "section_in_two_splits",
          "duplicate_id", "unknown_split", "bad_modality", "displacement", "empty_mask", "pairing_negative",
          "pairing_unknown"]


@pytest.mark.parametrize("kind", BROKEN)
def test_data_check_reports_broken_manifests(kind, tmp_path, ref, capsys):
    from cytoclr.cli import main
    man = _good_manifest(tmp_path, ref)
    field, phrase = _break(kind, man, tmp_path)
    p = _write(tmp_path, man)
    code = main(["data", "check", str(p)])
    out = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in out.out + out.err
    lines = [ln for ln in out.out.splitlines() if ln.startswith("error: ")]
    assert any(ln.startswith(f"error: {field}: ") and phrase in ln for ln in lines), out.out
    if kind not in ("checksum", "corrupt_image", "corrupt_chunk", "channels", "dtype", "empty_mask"):  # deep checks: `data check` only
        with pytest.raises(DataError, match=field.replace("[", r"\[").replace("]", r"\]")):
            load_manifest(p)

def test_data_check_without_checksums_skips_hashing(tmp_path, ref, capsys):
    "--no-checksums: a changed file passes (nothing is hashed), every other check still runs."
    from cytoclr.cli import main
    man = _good_manifest(tmp_path, ref)
    _break("checksum", man, tmp_path)
    p = _write(tmp_path, man)
    assert main(["data", "check", str(p)]) != 0
    capsys.readouterr()
    assert main(["data", "check", "--no-checksums", str(p)]) == 0, capsys.readouterr().out
    man["sections"][0]["spacing_um"] = -1
    p = _write(tmp_path, man)
    assert main(["data", "check", "--no-checksums", str(p)]) != 0
    assert "sections[0].spacing_um" in capsys.readouterr().out


def test_broken_yaml_reports_its_line(tmp_path, capsys):
    p = tmp_path / "m.yml"
    p.write_text("reference:\n  name: hcp-s1200\nbrains:\n  - id: a\n    phantom: {seed: 0\nsections: []\n")
    assert check_manifest_cli(str(p)) == 1
    out = capsys.readouterr().out
    assert "broken YAML" in out and "(line 6)" in out


def test_several_problems_reported_at_once(tmp_path, ref, capsys):
    man = _good_manifest(tmp_path, ref)
    man["sections"][0]["spacing_um"] = 0
    man["sections"][2]["brain"] = "nobody"
    man["brains"].append({"id": "lab-3", "speces": "human"})
    p = _write(tmp_path, man)
    assert check_manifest_cli(str(p)) == 1
    out = capsys.readouterr().out
    for field in ("sections[0].spacing_um", "sections[2].brain", "brains[2].speces"):
        assert f"error: {field}: " in out
    assert "(line " in out and "3 error(s)" in out


def test_swapped_axes_warn(tmp_path, ref, capsys):
    man = _good_manifest(tmp_path, ref)
    A = np.array(man["sections"][2]["transform"]["affine"])
    man["sections"][2]["transform"]["affine"] = A[[1, 0, 2]].tolist()  # y and x swapped: a sagittal plane
    p = _write(tmp_path, man)
    assert check_manifest_cli(str(p)) == 0  # a warning, not an error
    out = capsys.readouterr().out
    assert "warning: sections[2].transform: " in out and "swapped axes" in out

@pytest.mark.skipif(not HAS_PHANTOM, reason="cytoclr.phantom not written yet")
def test_phantom_manifest_check(tmp_path, capsys):
    man = {"brains": [{"id": "p", "phantom": {"seed": 1}}],
           "phantom_series": [{"brains": ["p"], "modalities": ["nissl"], "spacing_um": 500, "y_mm": [-20, 10]}]}
    assert check_manifest_cli(str(_write(tmp_path, man))) == 0
    assert "OK (2 sections)" in capsys.readouterr().out
    man["phantom_series"][0]["y_mm"] = [-20, 300]  # far in front of the brain
    man["brains"].append({"id": "q"})
    man["phantom_series"][0]["brains"].append("q")  # not a phantom brain
    assert check_manifest_cli(str(_write(tmp_path, man))) == 1
    out = capsys.readouterr().out
    assert "error: phantom_series[0]: phantom section p/nissl/001: " in out and "misses the brain" in out
    assert "error: phantom_series[0].brains[1]: brain 'q' is not a phantom brain" in out


def test_corrupt_tiff_prints_only_our_message(tmp_path, ref):
    "tifffile logs warnings of its own about a broken file; the user sees one line of ours, nothing else."
    man = _good_manifest(tmp_path, ref)
    _break("corrupt_image", man, tmp_path)
    p = _write(tmp_path, man)
    r = subprocess.run([sys.executable, "-m", "cytoclr", "data", "check", str(p)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == "", r.stderr  # no logger lines
    bad = [ln for ln in r.stdout.splitlines() if "b.tif" in ln or "sections[1]" in ln]
    assert len(bad) == 1 and bad[0].startswith("error: sections[1].path: unreadable image"), r.stdout


def test_jpeg_tiled_pyramidal_tiff_as_scanners_write_it(tmp_path, ref, capsys):
    "A JPEG-compressed tiled pyramid (as slide scanners write it) reads like tifffile itself decodes it."
    from cytoclr.cli import main
    man = _good_manifest(tmp_path, ref)
    img = np.asarray(Image.open(tmp_path / "data" / "c.png"))  # (64, 80) uint8
    big = np.kron(img, np.ones((8, 8), np.uint8))  # (512, 640): a pyramid of three levels
    levels = [big, big[::2, ::2].copy(), big[::4, ::4].copy()]
    path = tmp_path / "data" / "scan.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(levels[0], tile=(128, 128), subifds=2, compression="jpeg", photometric="minisblack")
        for lv in levels[1:]:
            tif.write(lv, tile=(128, 128), subfiletype=1, compression="jpeg", photometric="minisblack")
    with tifffile.TiffFile(path) as t:
        assert t.pages[0].compression == tifffile.COMPRESSION.JPEG
        truth = [t.series[0].levels[i].asarray() for i in range(3)]  # tifffile's own decoding
    r = open_image(path)
    assert r.levels == [(512, 640), (256, 320), (128, 160)]
    for lv in range(3):
        np.testing.assert_array_equal(r.read(slice(0, r.levels[lv][0]), slice(0, r.levels[lv][1]), lv)[0], truth[lv])
    np.testing.assert_array_equal(r.read(slice(100, 300), slice(130, 390))[0], truth[0][100:300, 130:390])
    A = np.asarray(man["sections"][2]["transform"]["affine"], float)
    A[:, :2] /= 8  # 8x finer pixels, same tissue
    man["sections"].append({"id": "lab-2/scan", "brain": "lab-2", "path": "data/scan.tif", "sha256": path_fingerprint(path),
                            "modality": "nissl", "spacing_um": 250.0, "transform": {"affine": A.tolist()}})
    p = _write(tmp_path, man)
    assert main(["data", "check", str(p)]) == 0, capsys.readouterr().out
    sec = load_manifest(p).section("lab-2/scan")
    np.testing.assert_allclose(sec.read(slice(8, 24), slice(16, 40))[0], truth[0][8:24, 16:40] / 255.0, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- malformed input through the command


def _clean(out: str, err: str):
    for bad in ("Traceback", "internal error", "AttributeError", "TypeError", "KeyError"):
        assert bad not in out + err, out + err


@pytest.mark.parametrize("kind", list(NOT_MANIFESTS))
def test_data_check_of_a_file_that_is_not_a_manifest(tmp_path, kind, capsys):
    "One line naming the file (and the summary), exit code 1."
    from cytoclr.cli import main
    p = tmp_path / "m.yml"
    NOT_MANIFESTS[kind](p)
    assert main(["data", "check", str(p)]) == 1
    out = capsys.readouterr()
    _clean(out.out, out.err)
    errors = [ln for ln in out.out.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {p}: "), out.out


@pytest.mark.parametrize("where,value,field", WRONG_TYPES, ids=[f"{f or 'file'}={v!r}"[:50] for _, v, f in WRONG_TYPES])
def test_data_check_of_wrong_types_names_the_field(tmp_path, where, value, field, capsys):
    "The full check (files opened, phantom sections built) of a manifest with a value of the wrong type."
    from cytoclr.cli import main
    p = _wrong(tmp_path, where, value)
    assert main(["data", "check", str(p)]) == 1
    out = capsys.readouterr()
    _clean(out.out, out.err)
    assert any(ln.startswith(f"error: {field or p}: ") for ln in out.out.splitlines()), out.out


@pytest.mark.parametrize("path", ["/etc/passwd", "/bin/ls", "/tmp"])
def test_data_check_as_a_user_runs_it(path):
    "`cytoclr data check /etc/passwd` (or a binary, or a folder) in a fresh process: one line, exit code 1."
    if not Path(path).exists():
        pytest.skip(f"{path} does not exist here")
    r = subprocess.run([sys.executable, "-m", "cytoclr", "data", "check", path], capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    _clean(r.stdout, r.stderr)
    assert r.stderr == "" and r.stdout.splitlines()[0].startswith(f"error: {path}: "), r.stdout
