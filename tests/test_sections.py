"Sections, image readers, transforms, data_manifest.yml, `data check` and `phantom export`."
import importlib.util
import os
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import yaml
import zarr
from PIL import Image

from cytoclr.core import DataError, path_fingerprint
from cytoclr.sections import (FILL, ImageMask, ImageSection, PolygonMask, TiffReader, ZarrReader, check_affine,
                              check_manifest_cli, default_splits, export_phantom, from_reference, load_manifest,
                              mask_shape, open_image, phantom_y_positions, sections_of_split, to_reference,
                              validate_manifest, write_section_zarr)

ROOT = Path(__file__).resolve().parents[1]
HAS_PHANTOM = importlib.util.find_spec("cytoclr.phantom") is not None


# ---------------------------------------------------------------- a fake phantom (export mechanics only)
def coronal_affine(spacing_mm, x0=-80.0, y=-18.0, z0=75.0):
    "Rows go down (-z), columns go right (+x), on the plane MNI y = y."
    return np.array([[0.0, spacing_mm, x0], [0.0, 0.0, y], [-spacing_mm, 0.0, z0]])


class FakeSection:
    "Deterministic per-pixel values, so any window equals the same part of any other window."

    def __init__(self, seed, index, y_mm, spacing_um, modality, shape=(130, 170), fail_after=None):
        self.seed, self.index, self.spacing_um, self.modality = seed, index, spacing_um, modality
        self.shape, self.channels = shape, 1 if modality == "nissl" else 3
        self.channel_names = ("intensity",) if modality == "nissl" else ("transmittance", "retardation", "direction")
        self.affine = coronal_affine(spacing_um / 1000, y=y_mm)
        self.reads, self.fail_after = 0, fail_after

    def read(self, rows, cols):
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise KeyboardInterrupt  # what a killed process looks like from inside
        r = np.arange(rows.start, rows.stop)[:, None]
        c = np.arange(cols.start, cols.stop)[None, :]
        v = (np.sin(r * 0.37 + c * 0.11 + self.seed + self.index) * 0.5 + 0.5).astype(np.float32)
        if self.modality == "nissl":
            return v[None]
        return np.stack([v, 1 - v, (v * 179.0).astype(np.float32)])

    def cortex_mask(self, level=0):
        h, w = mask_shape(self.shape, level)
        k = 2 ** level
        r, c = np.meshgrid(np.arange(h) * k, np.arange(w) * k, indexing="ij")
        d2 = (r - self.shape[0] / 2) ** 2 + (c - self.shape[1] / 2) ** 2
        return (d2 < (self.shape[0] * 0.4) ** 2) & (d2 > (self.shape[0] * 0.25) ** 2)


class FakeBrain:
    built = 0

    def __init__(self, seed, ref=None, fail_after=None):
        self.seed, self.fail_after = seed, fail_after
        FakeBrain.built += 1

    def section(self, index=0, y_mm=None, spacing_um=32.0, modality="nissl", **kw):
        fail = 0 if self.fail_after is not None and index >= self.fail_after else None
        return FakeSection(self.seed, index, y_mm, spacing_um, modality, fail_after=fail)


class _Ref:
    "Just enough of a reference for `phantom_y_positions`."
    hemis = ("L",)
    mid = {"L": np.array([[0.0, -100.0, 0.0], [0.0, 70.0, 0.0]])}


# ---------------------------------------------------------------- readers
def test_zarr_reader_windows_and_levels(tmp_path):
    sec = FakeSection(0, 0, 0.0, 32.0, "pli", shape=(300, 410))
    p = write_section_zarr(sec, tmp_path / "s.ome.zarr", chunk=64, name="s", block=100)
    r = open_image(p)
    assert isinstance(r, ZarrReader) and r.shape == (300, 410) and r.channels == 3 and r.dtype == np.float32
    assert r.levels == [(300, 410), (150, 205), (75, 103), (38, 52)]  # until a level fits one 64 px chunk
    full = sec.read(slice(0, 300), slice(0, 410))
    assert np.array_equal(r.read(slice(17, 211), slice(5, 399)), full[:, 17:211, 5:399])
    # level 1 is the 2x2 mean of level 0, written straight from the definition
    l1 = full.reshape(3, 150, 2, 205, 2).mean((2, 4))
    assert np.allclose(r.read(slice(0, 150), slice(0, 205), level=1), l1, atol=1e-6)
    # OME-NGFF metadata a viewer relies on
    attrs = zarr.open_group(str(p), mode="r").attrs["ome"]
    ms = attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 64.0, 64.0]
    m = open_image(p / "labels" / "cortex")
    assert m.channels == 1 and np.array_equal(m.read(slice(0, 75), slice(0, 103), level=2)[0] != 0, sec.cortex_mask(2))
    # large masks: levels above max_mask_px are not stored, finer requests are upsampled from the finest stored
    q = write_section_zarr(sec, tmp_path / "t.ome.zarr", chunk=64, max_mask_px=10_000)
    mk = ImageMask(open_image(q / "labels" / "cortex"))
    assert sorted(mk.stored_levels(sec.shape)) == [2, 3, 4]  # 75 x 103 = 7725 px is the first to fit
    assert np.array_equal(mk(sec.shape, 3), sec.cortex_mask(3))
    assert np.array_equal(mk(sec.shape, 0), np.repeat(np.repeat(sec.cortex_mask(2), 4, 0), 4, 1)[:300, :410])


def _write_pyramid_tiff(path, levels, tile=(64, 64), **kw):
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(levels[0], tile=tile, subifds=len(levels) - 1, compression="zlib", **kw)
        for lv in levels[1:]:
            tif.write(lv, tile=tile, subfiletype=1, compression="zlib", **kw)


@pytest.mark.parametrize("kind", ["gray16", "rgb_contig", "planar"])
def test_tiff_reader_tiled_pyramid(tmp_path, rng, kind):
    if kind == "gray16":
        a = rng.integers(0, 65535, (333, 517), dtype=np.uint16)
        levels, kw, want = [a, a[::2, ::2].copy()], {}, a[None]
    elif kind == "rgb_contig":
        a = rng.integers(0, 255, (333, 517, 3), dtype=np.uint8)
        levels, kw, want = [a, a[::2, ::2].copy()], {"photometric": "rgb"}, np.moveaxis(a, -1, 0)
    else:
        a = rng.random((3, 333, 517)).astype(np.float32)
        levels, kw, want = [a, a[:, ::2, ::2].copy()], {"photometric": "minisblack", "planarconfig": "separate"}, a
    p = tmp_path / "x.tif"
    _write_pyramid_tiff(p, levels, **kw)
    r = open_image(p)
    assert isinstance(r, TiffReader) and r.shape == (333, 517) and r.channels == want.shape[0]
    assert len(r.levels) == 2 and r.levels[1] == (167, 259)
    ref = tifffile.imread(p)  # the independent reader
    assert np.array_equal(np.moveaxis(ref, -1, 0) if kind == "rgb_contig" else (ref[None] if ref.ndim == 2 else ref), want)
    for rows, cols in ((slice(0, 333), slice(0, 517)), (slice(63, 65), slice(127, 300)), (slice(300, 333), slice(500, 517))):
        assert np.array_equal(r.read(rows, cols), want[:, rows, cols])
    lv1 = want[:, ::2, ::2]
    assert np.array_equal(r.read(slice(10, 150), slice(3, 259), level=1), lv1[:, 10:150, 3:259])


def test_tiff_reader_striped_and_multipage_channels(tmp_path, rng):
    a = rng.integers(0, 255, (201, 157), dtype=np.uint8)
    p = tmp_path / "striped.tif"
    tifffile.imwrite(p, a, rowsperstrip=16, compression="zlib")
    assert np.array_equal(open_image(p).read(slice(15, 190), slice(3, 150))[0], a[15:190, 3:150])
    b = rng.random((3, 120, 90)).astype(np.float32)  # one page per channel
    q = tmp_path / "pages.tif"
    with tifffile.TiffWriter(q) as tif:
        for ch in b:
            tif.write(ch, tile=(32, 32), metadata=None)
    r = open_image(q)
    assert r.channels == 3 and np.array_equal(r.read(slice(5, 100), slice(40, 90)), b[:, 5:100, 40:90])


def test_png_jpeg_nifti_readers(tmp_path, rng):
    g = rng.integers(0, 255, (40, 60), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    assert np.array_equal(open_image(tmp_path / "g.png").read(slice(3, 30), slice(10, 60))[0], g[3:30, 10:60])
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    r = open_image(tmp_path / "c.jpg")
    want = np.moveaxis(np.asarray(Image.open(tmp_path / "c.jpg")), -1, 0)
    assert r.channels == 3 and np.array_equal(r.read(slice(0, 40), slice(5, 20)), want[:, :, 5:20])
    n = rng.random((50, 70)).astype(np.float32)
    nib.save(nib.Nifti1Image(n, np.eye(4)), tmp_path / "s.nii.gz")
    assert np.array_equal(open_image(tmp_path / "s.nii.gz").read(slice(10, 20), slice(0, 70))[0], n[10:20])
    v = rng.random((50, 70, 1, 1, 3)).astype(np.float32)  # NIfTI vector image: (i, j, k, t, channels)
    nib.save(nib.Nifti1Image(v, np.eye(4)), tmp_path / "v.nii")
    r = open_image(tmp_path / "v.nii")
    assert r.channels == 3 and np.array_equal(r.read(slice(1, 9), slice(2, 4)), np.moveaxis(v[1:9, 2:4, 0, 0], -1, 0))


def test_windowed_tiff_read_touches_only_needed_tiles(tmp_path, monkeypatch):
    "A 16k x 16k uint16 image (512 MB decoded): a window decodes only its tiles and allocates only its size."
    N, T = 16384, 256
    tile = (np.arange(T * T, dtype=np.uint16) % 7).reshape(T, T)  # compresses fast
    p = tmp_path / "big.tif"
    tifffile.imwrite(p, (tile for _ in range((N // T) ** 2)), shape=(N, N), dtype=np.uint16, tile=(T, T),
                     compression="zlib", bigtiff=True)
    r = open_image(p)
    with tifffile.TiffFile(p) as tif:
        tile_at = {int(o): i for i, o in enumerate(tif.pages[0].dataoffsets)}
    calls = []
    real_pread = os.pread

    def counting(fd, n, offset):
        calls.append(tile_at[offset])
        return real_pread(fd, n, offset)

    r.read(slice(0, 1), slice(0, 1))  # open handles outside the measurement
    monkeypatch.setattr(os, "pread", counting)
    tracemalloc.start()
    w = r.read(slice(1000, 2024), slice(5000, 6024))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(w[0], np.tile(tile, (5, 5))[1000 - 768:2024 - 768, 5000 - 4864:6024 - 4864])
    rows, cols = range(1000 // T, 2023 // T + 1), range(5000 // T, 6023 // T + 1)
    assert sorted(calls) == sorted(ty * (N // T) + tx for ty in rows for tx in cols)  # exactly the 5 x 5 tiles
    assert peak < 12 * 2 ** 20, peak  # the window is 2 MB; the file 512 MB


def test_windowed_zarr_read_touches_only_needed_chunks(tmp_path, monkeypatch):
    "A 40k x 40k zarr level (3.2 GB decoded): reading a window fetches exactly the chunks it overlaps."
    from zarr.storage import LocalStore
    p = tmp_path / "big.zarr"
    z = zarr.create_array(str(p), shape=(1, 40000, 40000), chunks=(1, 512, 512), dtype="uint16", fill_value=0)
    z[0, 1024:3072, 1024:3072] = 7
    r = open_image(p)
    assert r.shape == (40000, 40000)
    keys = []
    real_get = LocalStore.get

    async def counting_get(self, key, *a, **k):
        keys.append(key)
        return await real_get(self, key, *a, **k)

    monkeypatch.setattr(LocalStore, "get", counting_get)
    tracemalloc.start()
    w = r.read(slice(1500, 2500), slice(1500, 2600))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (w == 7).all() and w.shape == (1, 1000, 1100)
    assert sorted(keys) == sorted(f"c/0/{i}/{j}" for i in range(2, 5) for j in range(2, 6))  # 3 x 4 chunks
    assert peak < 30 * 2 ** 20, peak


# ---------------------------------------------------------------- corrupt files
def _tiff_with_bad_tile(path, rng):
    a = rng.integers(0, 255, (256, 256), dtype=np.uint8)
    tifffile.imwrite(path, a, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        off = tif.pages[0].dataoffsets[5]
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\x00garbage-not-zlib\xff" * 2)
    return a


def test_corrupt_tile_raises_dataerror_naming_the_file(tmp_path, rng):
    p = tmp_path / "broken_section.tif"
    _tiff_with_bad_tile(p, rng)
    sec = ImageSection(open_image(p), "nissl", 20.0, coronal_affine(0.02), id="b/1", field="sections[0]")
    sec.read(slice(0, 64), slice(0, 64))  # tile 0 is fine
    with pytest.raises(DataError) as e:
        sec.read(slice(64, 128), slice(64, 128))  # tile 5 is corrupt
    msg = str(e.value)
    assert "broken_section.tif" in msg and "sections[0]" in msg and "b/1" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no decoder traceback chained on


def test_corrupt_zarr_chunk_raises_dataerror(tmp_path):
    sec = FakeSection(1, 0, 0.0, 32.0, "nissl", shape=(128, 128))
    p = write_section_zarr(sec, tmp_path / "s.ome.zarr", chunk=64)
    chunk = sorted(q for q in (p / "0" / "c").rglob("*") if q.is_file())[-1]
    chunk.write_bytes(b"not zstd at all")
    r = open_image(p)
    s = ImageSection(r, "nissl", 32.0, coronal_affine(0.032), id="z")
    with pytest.raises(DataError, match="s.ome.zarr"):
        s.read(slice(0, 128), slice(0, 128))


def test_truncated_png_raises_dataerror(tmp_path, rng):
    p = tmp_path / "t.png"
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DataError, match="t.png"):
        open_image(p).read(slice(0, 64), slice(0, 64))


# ---------------------------------------------------------------- sections and transforms
def test_affine_round_trip_against_formula(rng):
    A = rng.normal(0, 1, (3, 3))
    rc = rng.uniform(0, 1000, (50, 2))
    xyz = to_reference(A, rc)
    slow = np.array([A @ np.array([r, c, 1.0]) for r, c in rc])
    assert np.allclose(xyz, slow)
    assert np.allclose(from_reference(A, xyz), rc, atol=1e-6)
    # off-plane points project onto the plane: moving along the normal does not change (row, col)
    normal = np.cross(A[:, 0], A[:, 1])
    assert np.allclose(from_reference(A, xyz + 3.0 * normal / np.linalg.norm(normal)), rc, atol=1e-6)


@pytest.mark.parametrize("A,msg", [
    ([[1, 2, 0], [2, 4, 0], [3, 6, 0]], "degenerate"),  # parallel steps
    ([[0, 1, 0], [0, 0, 0], [0, 0, 0]], "degenerate"),  # zero step
    ([[np.nan, 1, 0], [1, 0, 0], [0, 0, 1]], "non-finite"),
    ([[1, 0], [0, 1]], "3x3"),
])
def test_check_affine_rejects_degenerate(A, msg):
    out, errors, _ = check_affine(A)
    assert out is None and msg in errors[0]


def test_check_affine_warns_on_units():
    _, errors, warnings = check_affine(coronal_affine(20.0), spacing_um=20.0)  # um where mm were meant
    assert not errors and "mm and um" in warnings[0]
    assert check_affine(coronal_affine(0.02), spacing_um=20.0)[2] == []


def test_image_section_values_padding_and_pickle(tmp_path):
    a = np.array([[0, 255], [128, 64]], np.uint8)
    Image.fromarray(a).save(tmp_path / "n.png")
    s = ImageSection(open_image(tmp_path / "n.png"), "nissl", 1000.0, coronal_affine(1.0))
    w = s.read(slice(-1, 3), slice(0, 2))
    assert w.dtype == np.float32 and w.shape == (1, 4, 2)
    assert np.allclose(w[0, 1:3], a / 255.0) and (w[0, [0, 3]] == FILL["nissl"][0]).all()
    d = np.stack([a, a, np.array([[0, 255], [128, 64]], np.uint8)], -1)
    tifffile.imwrite(tmp_path / "p.tif", d, photometric="rgb", tile=(16, 16))
    p = ImageSection(open_image(tmp_path / "p.tif"), "pli", 1000.0, coronal_affine(1.0))
    v = p.read(slice(0, 2), slice(0, 2))
    assert np.allclose(v[2], a * 180.0 / 256.0) and v[2].max() < 180  # direction in [0, 180)
    q = pickle.loads(pickle.dumps(p))  # data-loader workers receive sections by pickling
    assert np.array_equal(q.read(slice(0, 2), slice(0, 2)), v)
    with pytest.raises(DataError, match="channel"):
        ImageSection(open_image(tmp_path / "n.png"), "pli", 1.0, coronal_affine(1.0))


def test_polygon_and_image_masks():
    poly = PolygonMask([[9.5, 19.5], [9.5, 59.5], [29.5, 59.5], [29.5, 19.5]])  # pixel centres rows 10..29, cols 20..59
    m = poly((40, 80), 0)
    r, c = np.mgrid[0:40, 0:80]
    assert np.array_equal(m, (r >= 10) & (r <= 29) & (c >= 20) & (c <= 59))
    assert poly((40, 80), 2).shape == (10, 20)

    class Stored:  # a mask image with only level 0 stored
        path, levels = "mask.png", [(40, 80)]

        def read(self, rows, cols, level=0):
            return m[None, rows, cols].astype(np.uint8)

    im = ImageMask(Stored(), band_px=12)  # read in bands of 12 rows
    assert np.array_equal(im((40, 80), 0), m) and np.array_equal(im((40, 80), 3), m[::8, ::8])
    assert np.array_equal(im((40, 80), 2), m[::4, ::4])
    with pytest.raises(DataError, match="no level of the image"):
        im((41, 80), 0)

    class Coarse:  # only level 2 stored: finer levels are nearest-neighbour upsampled
        path, levels = "mask.png", [(10, 20)]

        def read(self, rows, cols, level=0):
            return m[None, ::4, ::4][:, rows, cols].astype(np.uint8)

    up = ImageMask(Coarse())((39, 79), 0)  # an image of 39 x 79 px has a 10 x 20 level-2 mask too
    r, c = np.mgrid[0:39, 0:79]
    assert np.array_equal(up, m[::4, ::4][r // 4, c // 4])


# ---------------------------------------------------------------- manifests
def _good_manifest(tmp_path, ref):
    "Three file sections (OME-Zarr, tiled TIFF, PNG + mask) on a coronal plane through the reference, and a manifest."
    s_mm, H, W = 2.0, 64, 80
    A = coronal_affine(s_mm, x0=-80.0, y=-18.0, z0=78.0)
    rr, cc = np.mgrid[0:H, 0:W]
    mask = ref.locate(to_reference(A, np.stack([rr.ravel(), cc.ravel()], 1))).inside.reshape(H, W)
    assert mask.mean() > 0.05
    img = np.where(mask, 0.3, 0.9).astype(np.float32)
    d = tmp_path / "data"
    d.mkdir()
    g = zarr.open_group(str(d / "a.ome.zarr"), mode="w")
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}],
                                                         "datasets": [{"path": "0"}]}]}
    g.create_array("0", shape=(1, H, W), chunks=(1, 32, 32), dtype="float32")[:] = img[None]
    tifffile.imwrite(d / "b.tif", np.stack([img, img, img * 100], 0).astype(np.float32), tile=(32, 32),
                     photometric="minisblack", planarconfig="separate")
    Image.fromarray((img * 255).astype(np.uint8)).save(d / "c.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(d / "c_mask.png")
    aff = A.tolist()
    man = {
        "reference": {"name": "hcp-s1200"},
        "brains": [{"id": "lab-1"}, {"id": "lab-2", "description": "the held-out brain"}],
        "sections": [
            {"id": "lab-1/a", "brain": "lab-1", "path": "data/a.ome.zarr", "sha256": path_fingerprint(d / "a.ome.zarr"),
             "modality": "nissl", "spacing_um": 2000.0, "transform": {"affine": aff}, "index": 1},
            {"id": "lab-1/b", "brain": "lab-1", "path": "data/b.tif", "sha256": path_fingerprint(d / "b.tif"),
             "modality": "pli", "spacing_um": 2000.0, "transform": {"affine": aff}},
            {"id": "lab-2/c", "brain": "lab-2", "path": "data/c.png", "sha256": path_fingerprint(d / "c.png"),
             "modality": "nissl", "spacing_um": 2000.0, "transform": {"affine": aff},
             "mask": {"path": "data/c_mask.png", "sha256": path_fingerprint(d / "c_mask.png")}},
        ],
        "splits": {"train": ["lab-1/a"], "test": {"brains": "lab-1", "modality": "pli"}, "unseen_brains": ["lab-2"]},
    }
    return man


def _write(tmp_path, man, name="data_manifest.yml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(man, sort_keys=False))
    return p


def test_good_manifest_passes(tmp_path, ref, capsys):
    man = _good_manifest(tmp_path, ref)
    p = _write(tmp_path, man)
    assert check_manifest_cli(str(p)) == 0
    out = capsys.readouterr().out
    assert "OK (3 sections)" in out and "error" not in out and "warning" not in out
    m = load_manifest(p)
    assert [s.id for s in sections_of_split(m, "train")] == ["lab-1/a"]
    assert [s.id for s in m.split("test")] == ["lab-1/b"]
    assert [s.id for s in m.split("unseen_brain")] == ["lab-2/c"]
    b = m.section("lab-1/b")
    assert b.channels == 3 and b.read(slice(0, 4), slice(0, 4)).shape == (3, 4, 4)
    # without a mask in the manifest, the cortex mask comes from the reference through the transform
    c, a = m.section("lab-2/c"), pickle.loads(pickle.dumps(m.section("lab-1/a")))  # picklable for loader workers
    assert np.array_equal(c.cortex_mask(0), a.cortex_mask(0))


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


def test_pairing_defaults_and_override(tmp_path, ref):
    man = _good_manifest(tmp_path, ref)
    assert load_manifest(_write(tmp_path, man)).pairing == {"max_distance_mm": 0.5, "max_angle_deg": 5.0}
    man["pairing"] = {"max_distance_mm": 2}
    assert load_manifest(_write(tmp_path, man)).pairing == {"max_distance_mm": 2.0, "max_angle_deg": 5.0}


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


def test_default_manifest_loads():
    m = load_manifest(ROOT / "data_manifest.yml")
    assert len(m.brains) >= 3 and m.reference is not None
    train = {s.id for s in m.split("train")}
    for sp in ("validation", "test", "unseen_brain"):
        ids = set(m.split_ids(sp))
        assert ids and not ids & train
    unseen = set(m.splits["unseen_brains"])
    assert unseen and not any(m.entries[i].brain in unseen for i, e in enumerate(m.entries) if e.id in train)
    assert {s.modality for s in m.split("train")} == {"nissl", "pli"}
    assert all(s.modality == "pli" for s in m.split("train", modality="pli"))
    assert validate_manifest(ROOT / "data_manifest.yml", deep=False) == []


def test_default_splits():
    s = default_splits(["a", "b", "c"], 10)
    assert s["unseen_brains"] == ["c"] and s["test"]["index"] == [5] and s["validation"]["index"] == [2]
    assert sorted(s["train"]["index"] + s["test"]["index"] + s["validation"]["index"]) == list(range(10))
    assert default_splits(["a"], 1) == {"train": {"brains": ["a"], "index": [0]}}


# ---------------------------------------------------------------- phantom export mechanics (fake phantom)
def _export(out, **kw):
    args = dict(brains=2, sections=3, spacing_um=32.0, modality="both", seed=5, chunk=64, progress=False, ref=_Ref(),
                brain_factory=FakeBrain)
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

    class Killed(FakeBrain):
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


def test_export_cli_validates_arguments(tmp_path, capsys):
    from cytoclr.cli import main
    code = main(["phantom", "export", "--out", str(tmp_path / "o"), "--brains", "0"])
    assert code == 2 and "--brains" in capsys.readouterr().err


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
def test_default_manifest_phantom_sections():
    m = load_manifest(ROOT / "data_manifest.yml")
    s = m.split("test", modality="pli")[0]
    assert s.channels == 3 and s.modality == "pli" and s.spacing_um == 64.0
    w = s.read(slice(1000, 1064), slice(1000, 1064))
    assert w.shape == (3, 64, 64) and w.dtype == np.float32


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


def test_unknown_split_is_a_data_error():
    m = load_manifest(Path(__file__).resolve().parents[1] / "data_manifest.yml")
    with pytest.raises(DataError, match="unknown split 'tset'") as e:
        m.split_ids("tset")
    assert type(e.value) is DataError and e.value.field == "split"
