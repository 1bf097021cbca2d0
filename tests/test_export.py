"`cytoclr phantom export`: files and manifest, atomic, resumable, byte-identical; the round trip chapter 2 reports."
from pathlib import Path

import numpy as np
import pytest

from cytoclr.core import DataError
from cytoclr.export import (MAX_TILT_DEG, ROUND_TRIP_MAX_ABS_DIFF, _to_uint8, data_metrics, default_splits,
                            export_phantom, export_phantom_cli, phantom_y_positions, round_trip_differences,
                            round_trip_pairs, write_section_tiff)
from cytoclr.manifest import load_manifest
from cytoclr.manifest_check import check_manifest_cli, validate_manifest
from cytoclr.readers import open_image
from cytoclr.sections import _to_float

from helpers import HAS_PHANTOM, FakeBrain, _Ref


class ExportBrain(FakeBrain):
    "The fake phantom, defined in this module: the export fingerprints the module of its brain factory."
    calls = []  # the keywords of every `section` call beyond the plane and the pixel size

    def section(self, index=0, y_mm=None, spacing_um=32.0, modality="nissl", **kw):
        ExportBrain.calls.append({k: v for k, v in kw.items() if k != "axis"})
        return super().section(index, y_mm, spacing_um, modality, **kw)

def test_default_splits():
    s = default_splits(["a", "b", "c"], 10)
    assert s["unseen_brains"] == ["c"] and s["test"]["index"] == [5] and s["validation"]["index"] == [2]
    assert sorted(s["train"]["index"] + s["test"]["index"] + s["validation"]["index"]) == list(range(10))
    assert default_splits(["a"], 1) == {"train": {"brains": ["a"], "index": [0]}}


# ---------------------------------------------------------------- phantom export mechanics (fake phantom)
def _export(out, **kw):
    args = dict(brains=2, sections=3, spacing_um=32.0, modality="both", seed=5, chunk=64, progress=False, ref=_Ref(),
                brain_factory=ExportBrain)
    args.update(kw)
    return export_phantom(out, **args)


def _tree(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def test_export_round_trip_and_determinism(tmp_path):
    p = _export(tmp_path / "a")
    _export(tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")  # same seed: byte-identical files, manifest included
    problems = [q for q in validate_manifest(p, deep=False)]
    assert problems == []
    m = load_manifest(p)
    assert len(m.entries) == 2 * 3 * 2 and m.splits["unseen_brains"] == ["phantom-6"]
    ys = phantom_y_positions(_Ref(), 3)
    for e, s in zip(m.entries, m.sections):
        brain, mod, idx = e.id.split("/")
        orig = FakeBrain(int(brain.split("-")[1])).section(int(idx), ys[int(idx)], 32.0, mod)
        assert s.shape == orig.shape and s.channels == orig.channels
        for rows, cols in ((slice(0, 130), slice(0, 170)), (slice(33, 97), slice(50, 161))):
            assert np.array_equal(s.read(rows, cols), orig.read(rows, cols))
        for level in range(3):
            assert np.array_equal(s.cortex_mask(level), orig.cortex_mask(level))
        assert np.array_equal(s.affine, orig.affine)  # exact: YAML keeps every float digit
        assert np.allclose(s.to_reference([[10, 20]]), orig.affine @ [10, 20, 1])


def test_export_is_atomic_and_resumes(tmp_path, capsys):
    out = tmp_path / "x"

    class Killed(ExportBrain):
        def __init__(self, seed, ref=None):
            super().__init__(seed, ref, fail_after=1 if seed == 6 else None)  # killed while writing its 2nd section

    with pytest.raises(KeyboardInterrupt):
        _export(out, brain_factory=Killed)
    assert not (out / "data_manifest.yml").exists()  # nothing that looks complete
    assert not list(out.rglob(".tmp-*"))
    done = sorted(p.name for p in out.rglob("*.ome.zarr"))
    assert done == sorted([f"{m}_{i:03d}.ome.zarr" for m in ("nissl", "pli") for i in range(3)] + ["nissl_000.ome.zarr"])
    FakeBrain.built = 0
    _export(out)  # resume: only the second brain is rendered
    assert FakeBrain.built == 1
    _export(tmp_path / "clean")
    assert _tree(out) == _tree(tmp_path / "clean")
    # a store damaged after the export is noticed by its checksum and rewritten on the next run
    victim = sorted(q for q in (out / "phantom-5" / "nissl_001.ome.zarr" / "0" / "c").rglob("*") if q.is_file())[0]
    victim.write_bytes(b"x")
    assert check_manifest_cli(str(out / "data_manifest.yml")) == 1
    assert "checksum mismatch" in capsys.readouterr().out
    FakeBrain.built = 0
    _export(out)
    assert FakeBrain.built == 1 and _tree(out) == _tree(tmp_path / "clean")
    with pytest.raises(DataError, match="other parameters"):
        _export(out, sections=4)


@pytest.mark.parametrize("kw,field", [({"brains": 0}, "--brains"), ({"sections": 2.5}, "--sections"),
                                      ({"spacing_um": -1.0}, "--spacing-um"), ({"spacing_um": float("nan")}, "--spacing-um"),
                                      ({"modality": "dapi"}, "--modality"), ({"format": "png"}, "--format")])
def test_export_cli_validates_arguments(tmp_path, kw, field):
    "`export_phantom_cli` takes the command's options as keywords; a bad one is a DataError naming the option."
    with pytest.raises(DataError) as e:
        export_phantom_cli(out=tmp_path / "o", **kw)
    assert e.value.field == field
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_export_out_that_cannot_be_a_folder_is_refused(tmp_path):
    "A file where the folder should be (or below a file) is a DataError on --out, not an OSError."
    f = tmp_path / "a_file"
    f.write_text("x")
    for out in (f, f / "sub"):
        with pytest.raises(DataError, match="cannot be made a folder") as e:
            export_phantom_cli(out=out, brains=1, sections=1)
        assert e.value.field == "--out" and e.value.file == out


def test_export_cli_keywords_are_the_options(tmp_path, capsys):
    "The keyword names are the attribute names of the command's parsed options (the CLI passes them one by one)."
    import inspect
    from cytoclr.cli import build_parser
    args = build_parser().parse_args(["phantom", "export", "--out", str(tmp_path / "o")])
    options = {k for k in vars(args) if k not in ("command", "phantom_command")}
    assert set(inspect.signature(export_phantom_cli).parameters) == options


def test_data_metrics_values():
    "What chapter 2 writes under `data`: counts of the manifest, the largest round-trip difference."
    class Man:
        entries, brains = [object()] * 5, {"a": {}, "b": {}}
    diffs = {"s1": 0.0, "s2": 0.25, "s3": 0.125}
    assert data_metrics(Man(), diffs) == {"manifest_sections": 5, "manifest_brains": 2, ROUND_TRIP_MAX_ABS_DIFF: 0.25}


def test_round_trip_differences_by_hand():
    class E:
        def __init__(self, i):
            self.id = i
    a = np.zeros((1, 2, 2), np.float32)
    b = a.copy()
    b[0, 1, 0] = -0.5
    assert round_trip_differences([(E("x"), None, None, a, a), (E("y"), None, None, a, b)]) == {"x": 0.0, "y": 0.5}


# ---------------------------------------------------------------- the real phantom
@pytest.mark.skipif(not HAS_PHANTOM, reason="cytoclr.phantom not written yet")
def test_phantom_round_trip_through_files(tmp_path, ref, capsys):
    from cytoclr.phantom import PhantomBrain
    p = export_phantom(tmp_path / "ph", brains=1, sections=1, spacing_um=400.0, modality="both", seed=3,
                       chunk=64, progress=False, ref=ref)
    m = load_manifest(p)
    brain = PhantomBrain(seed=3, ref=ref)
    ys = [e["provenance"]["phantom"]["y_mm"] for e in m.data["sections"]]
    for e, s, y in zip(m.entries, m.sections, ys):
        orig = brain.section(index=e.index, y_mm=y, spacing_um=400.0, modality=e.modality)
        assert s.shape == tuple(orig.shape) and s.channels == orig.channels
        H, W = s.shape
        for rows, cols in ((slice(0, H), slice(0, W)), (slice(H // 3, H // 3 + 40), slice(W // 5, W // 5 + 50))):
            assert np.array_equal(s.read(rows, cols), np.asarray(orig.read(rows, cols), np.float32))
        assert np.array_equal(s.affine, np.asarray(orig.affine, float))
        rc = np.array([[0.0, 0.0], [H / 2, W / 3]])
        assert np.allclose(s.to_reference(rc), orig.to_reference(rc))
        for level in range(3):
            assert np.array_equal(s.cortex_mask(level), np.asarray(orig.cortex_mask(level), bool))
    assert check_manifest_cli(str(p)) == 0
    assert "warning" not in capsys.readouterr().out  # the exported transforms put the masks on the cortex


@pytest.mark.skipif(not HAS_PHANTOM, reason="cytoclr.phantom not written yet")
def test_phantom_export_is_byte_identical(tmp_path, ref):
    for d in ("a", "b"):
        export_phantom(tmp_path / d, brains=1, sections=1, spacing_um=1000.0, modality="pli", seed=7, chunk=64,
                       progress=False, ref=ref)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


@pytest.mark.skipif(not HAS_PHANTOM, reason="cytoclr.phantom not written yet")
def test_round_trip_pairs_of_an_export_are_identical(tmp_path, ref):
    "The exported files hold exactly the procedural pixels: chapter 2's round_trip_max_abs_diff is 0."
    p = export_phantom(tmp_path / "ph", brains=1, sections=1, spacing_um=1000.0, modality="both", seed=2, chunk=64,
                       progress=False, ref=ref)
    disk = load_manifest(p)
    pairs = round_trip_pairs(disk, spacing_um=1000.0)
    assert [e.modality for e, *_ in pairs] == ["nissl", "pli"]
    assert all(a.shape == b.shape and a.dtype == np.float32 for *_, a, b in pairs)
    assert data_metrics(disk, round_trip_differences(pairs)) == {"manifest_sections": 2, "manifest_brains": 1,
                                                                  ROUND_TRIP_MAX_ABS_DIFF: 0.0}


# ---------------------------------------------------------------- sections as a lab receives them (fake phantom)
CUT = dict(rotation_deg=30.0, flip=True, tilt_deg=(6.0, -4.0))


def test_export_cut_options_reach_the_phantom(tmp_path):
    "Rotation, flip and tilt go to every `section` call and into the provenance; a default export passes none."
    ExportBrain.calls = []
    _export(tmp_path / "plain")
    assert ExportBrain.calls and all(c == {} for c in ExportBrain.calls)  # exactly the calls of before
    ExportBrain.calls = []
    p = _export(tmp_path / "cut", format="tiff", **CUT)
    assert ExportBrain.calls == [CUT] * 12
    m = load_manifest(p)
    for s in m.data["sections"]:
        assert {k: s["provenance"]["phantom"][k] for k in CUT} == {**CUT, "tilt_deg": [6.0, -4.0]}
    assert "--rotation-deg 30 --flip --tilt-deg 6 -4\n" in p.read_text().splitlines(keepends=True)[0]
    with pytest.raises(DataError, match="other parameters"):  # the options are part of what the folder holds
        _export(tmp_path / "cut", format="tiff", rotation_deg=31.0, flip=True, tilt_deg=(6.0, -4.0))


def test_explicit_defaults_write_the_default_export(tmp_path):
    "The new keywords at their defaults write byte for byte what an export without them writes (state file included)."
    _export(tmp_path / "a", format="tiff")
    _export(tmp_path / "b", format="tiff", rotation_deg=0.0, flip=False, tilt_deg=None, compression="lossless", masks=True)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_jpeg_export_without_masks(tmp_path):
    """`compression="jpeg"`: every level of every image is 8-bit JPEG tiles that `open_image` and the manifest read
    back close to the rendered values; `masks=False`: no mask files and no `mask` entries, the manifest still valid."""
    import tifffile
    p = _export(tmp_path / "j", format="tiff", compression="jpeg", masks=False)
    assert not list((tmp_path / "j").rglob("*_mask.tif"))
    assert validate_manifest(p, deep=False) == []
    m = load_manifest(p)
    ys = phantom_y_positions(_Ref(), 3)
    for e, s, raw in zip(m.entries, m.sections, m.data["sections"]):
        assert "mask" not in raw and e.mask is None
        with tifffile.TiffFile(e.path) as tif:
            pages = [tif.pages[0], *tif.pages[0].pages]  # level 0 and its sub-resolution levels
            assert len(pages) >= 2 and all(q.compression == tifffile.COMPRESSION.JPEG and q.dtype == np.uint8 for q in pages)
        img = open_image(e.path)
        assert img.dtype == np.uint8 and img.levels[0] == (130, 170)
        brain, mod, idx = e.id.split("/")
        orig = FakeBrain(int(brain.split("-")[1])).section(int(idx), ys[int(idx)], 32.0, mod)
        want = orig.read(slice(0, 130), slice(0, 170))
        grey = np.abs(img.read(slice(0, 130), slice(0, 170)).astype(float) - _to_uint8(want, mod))
        assert grey.mean() < 3.0 and grey.max() <= 40  # measured: mean 1.1-1.4, max 10-12 grey levels
        got = s.read(slice(0, 130), slice(0, 170))  # through the manifest: values again
        assert got.dtype == np.float32 and np.abs(got[:2] - want[:2]).mean() < 3 / 255
        assert np.array_equal(s.affine, orig.affine)


def test_zarr_export_without_masks(tmp_path):
    "`masks=False` with OME-Zarr: stores without `labels`, manifest entries without `mask`, still a valid manifest."
    p = _export(tmp_path / "z", modality="nissl", masks=False)
    stores = sorted((tmp_path / "z").rglob("*.ome.zarr"))
    assert len(stores) == 6 and not any((q / "labels").exists() for q in stores)
    assert validate_manifest(p, deep=False) == []
    assert all(e.mask is None for e in load_manifest(p).entries)


def test_to_uint8_inverts_the_readers():
    "`_to_uint8` is the inverse of how readers turn 8-bit images into values (PLI direction: steps of 180/256 deg)."
    u = np.random.default_rng(0).integers(0, 256, size=(3, 40, 50)).astype(np.uint8)
    for mod, c in (("nissl", 1), ("pli", 3)):
        assert np.array_equal(_to_uint8(_to_float(u[:c], mod), mod), u[:c])
    assert _to_uint8(np.array([[[0.0]], [[1.0]], [[180.0]]], np.float32), "pli").ravel().tolist() == [0, 255, 0]
    with pytest.raises(DataError, match="cannot hold") as e:
        _to_uint8(np.full((1, 2, 2), 1.5, np.float32), "nissl")
    assert e.value.field == "compression"


@pytest.mark.parametrize("kw,field", [
    ({"rotation_deg": float("nan")}, "--rotation-deg"), ({"rotation_deg": "left"}, "--rotation-deg"),
    ({"flip": "yes"}, "--flip"), ({"tilt_deg": (3.0,)}, "--tilt-deg"), ({"tilt_deg": (1.0, 2.0, 3.0)}, "--tilt-deg"),
    ({"tilt_deg": (MAX_TILT_DEG + 1, 0.0)}, "--tilt-deg"), ({"tilt_deg": (0.0, float("inf"))}, "--tilt-deg"),
    ({"compression": "png"}, "--compression"), ({"compression": "jpeg", "format": "zarr"}, "--compression"),
    ({"positions": [1.0, float("nan")]}, "--positions"), ({"positions": []}, "--positions"),
    ({"no_mask": "no"}, "--no-mask")])
def test_export_refuses_bad_section_options(tmp_path, kw, field):
    "A bad rotation, tilt, flip, compression, position or mask option is a DataError naming it, before any file."
    kw = {"format": "tiff", **kw}
    with pytest.raises(DataError) as e:
        export_phantom_cli(out=tmp_path / "o", **kw)
    assert e.value.field == field
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- sections as a lab receives them (the real phantom)
@pytest.mark.skipif(not HAS_PHANTOM, reason="cytoclr.phantom not written yet")
def test_phantom_cut_export_keeps_the_true_affine(tmp_path, ref, capsys):
    """A rotated, mirrored, tilted export without masks: its manifest holds the affine `PhantomBrain.section` gives
    with the same arguments (ground truth), the pixels are the procedural ones, and the manifest checks clean."""
    from cytoclr.phantom import PhantomBrain
    p = export_phantom(tmp_path / "cut", brains=1, sections=1, spacing_um=1000.0, modality="pli", seed=2, chunk=64,
                       progress=False, ref=ref, format="tiff", masks=False, **CUT)
    disk = load_manifest(p)
    (e,), (s,) = disk.entries, disk.sections
    y = disk.data["sections"][0]["provenance"]["phantom"]["y_mm"]
    brain = PhantomBrain(seed=2, ref=ref)
    want = brain.section(index=0, y_mm=y, spacing_um=1000.0, modality="pli", **CUT)
    assert want.tilt_deg == CUT["tilt_deg"] and np.array_equal(s.affine, np.asarray(want.affine, float))
    plain = brain.section(index=0, y_mm=y, spacing_um=1000.0, modality="pli")
    assert np.abs(s.affine - plain.affine).max() > 0.1  # really another cut than the default one
    pairs = round_trip_pairs(disk, spacing_um=1000.0)  # recreates the cut from the provenance
    assert round_trip_differences(pairs) == {e.id: 0.0}
    assert not list((tmp_path / "cut").rglob("*_mask.tif")) and s.cortex_mask(2).any()  # mask from the reference
    assert check_manifest_cli(str(p)) == 0


@pytest.mark.skipif(not HAS_PHANTOM, reason="cytoclr.phantom not written yet")
@pytest.mark.parametrize("modality", ["nissl", "pli"])
def test_phantom_jpeg_round_trip_error(tmp_path, ref, modality):
    """JPEG tiles of a rendered phantom section (quality JPEG_QUALITY) read back by `open_image`: the error in grey
    levels (0..255) and, for PLI direction, in degrees (circular), below bounds measured on larger sections."""
    import tifffile
    from cytoclr.phantom import PhantomBrain
    sec = PhantomBrain(seed=3, ref=ref).section(index=0, y_mm=-20.0, spacing_um=64.0, modality=modality,
                                                region_mm=((-12.0, 12.0), (20.0, 44.0)), **CUT)
    path, mask = write_section_tiff(sec, tmp_path / "s.tif", chunk=128, compression="jpeg", mask=False)
    assert mask is None and tifffile.TiffFile(path).pages[0].compression == tifffile.COMPRESSION.JPEG
    H, W = sec.shape
    want = np.asarray(sec.read(slice(0, H), slice(0, W)), np.float32)
    raw = open_image(path).read(slice(0, H), slice(0, W))
    grey = np.abs(raw.astype(float) - _to_uint8(want, modality))
    print(f"{modality} {H}x{W}: JPEG error in grey levels per channel, mean {grey.mean((1, 2)).round(2)}, "
          f"max {grey.max((1, 2))}")
    assert (grey.mean((1, 2)) < 4.0).all() and grey.max() <= 40  # measured at 128 um: mean 2.7-2.9, max 18-20
    if modality == "pli":
        d = np.abs((_to_float(raw, "pli")[2] - want[2] + 90) % 180 - 90)[want[1] > 0.05]  # where there are fibres
        print(f"direction error: mean {d.mean():.2f}, max {d.max():.1f} degrees")
        assert d.mean() < 3.0 and d.max() < 30  # measured at 128 um: mean 1.8, max 13.9 degrees
