"""Image readers: windows of OME-Zarr, TIFF, PNG/JPEG and NIfTI; only the chunks a window needs; files that are not
images; an image presented at another pixel size (Resampled) and the pixel sizes checkpoints and frames record."""
import math
import os
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from scipy.ndimage import map_coordinates
from skimage.measure import block_reduce

from cytoclr.core import DataError
from cytoclr.export import write_section_zarr
from cytoclr.readers import (ImageReader, Resampled, TiffReader, ZarrReader, nearest_spacing, open_image,
                             recorded_spacing, spacing_record)
from cytoclr.sections import ImageMask, ImageSection, TissueMask, mask_shape

from helpers import FakeSection, coronal_affine

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


def _not_an_image(tmp_path, kind):
    "A file (or store) whose name says image but whose bytes do not."
    junk = np.random.default_rng(0).bytes(3000)
    if kind == "zarr_dir":
        p = tmp_path / "x.zarr"
        p.mkdir()
        (p / "zarr.json").write_bytes(junk)
    elif kind == "zarr_bad_metadata":  # valid JSON of the wrong shape: multiscales a string, not a list
        p = tmp_path / "y.ome.zarr"
        g = zarr.open_group(str(p), mode="w")
        g.attrs["ome"] = {"version": "0.5", "multiscales": "not a list"}
    elif kind == "empty_dir":
        p = tmp_path / "empty.zarr"
        p.mkdir()
    elif kind == "zarr_file":
        p = tmp_path / "f.zarr"
        p.write_bytes(junk)
    else:
        p = tmp_path / f"x.{kind}"
        p.write_bytes(junk)
    return p


@pytest.mark.parametrize("kind", ["tif", "png", "jpg", "nii", "zarr_dir", "zarr_bad_metadata", "empty_dir", "zarr_file"])
def test_files_that_are_not_images_raise_dataerror_naming_the_file(tmp_path, kind):
    p = _not_an_image(tmp_path, kind)
    with pytest.raises(DataError) as e:
        open_image(p)
    assert type(e.value) is DataError and e.value.file is not None and p.name in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "a.bmp").write_bytes(b"BM")
    with pytest.raises(DataError, match="unknown image format"):
        open_image(tmp_path / "a.bmp")
    with pytest.raises(DataError, match="file not found"):
        open_image(tmp_path / "nope.tif")



# ---------------------------------------------------------------- another pixel size
class ArrayReader(ImageReader):
    "An in-memory pyramid [(c, h, w) per level] that records every window it is asked for as (level, r0, r1, c0, c1)."

    def __init__(self, levels, path="mem.tif"):
        self.arrays, self.path = [np.asarray(a) for a in levels], Path(path)
        self.shape, self.channels, self.dtype = self.arrays[0].shape[1:], self.arrays[0].shape[0], self.arrays[0].dtype
        self.levels = [a.shape[1:] for a in self.arrays]
        self.reads = []

    def read(self, rows, cols, level=0):
        assert 0 <= rows.start <= rows.stop <= self.levels[level][0] and 0 <= cols.start <= cols.stop <= self.levels[level][1]
        self.reads.append((level, rows.start, rows.stop, cols.start, cols.stop))
        return self.arrays[level][:, rows, cols].copy()


def area_reference(img, f, out_shape):
    "Area averaging straight from its definition: each output pixel the overlap-weighted mean of the source pixels."
    def weights(n_in, n_out):  # (n_out, n_in): overlap of [i f, (i + 1) f) with [y, y + 1), normalised per row
        i, y = np.arange(n_out)[:, None], np.arange(n_in)[None, :]
        W = np.maximum(0.0, np.minimum(np.minimum((i + 1) * f, y + 1), n_in) - np.maximum(i * f, y))
        return W / W.sum(1, keepdims=True)
    Wr, Wc = weights(img.shape[1], out_shape[0]), weights(img.shape[2], out_shape[1])
    return Wr @ img.astype(np.float64) @ Wc.T  # (c, n_out rows, n_out cols)


def linear_reference(img, w):
    "Bilinear interpolation by scipy at the source positions of the output pixel centres (edges: nearest)."
    r, c = np.meshgrid(np.arange(w.shape[0]), np.arange(w.shape[1]), indexing="ij")
    src = w.to_source(np.stack([r.ravel(), c.ravel()], 1))  # (n, 2)
    return np.stack([map_coordinates(ch.astype(np.float64), src.T, order=1, mode="nearest").reshape(w.shape)
                     for ch in img])


@pytest.mark.parametrize("target_um", [64.0, 48.0, 100.0, 20.0, 16.0])  # shrink 2x, 1.5x, 3.125x; enlarge 1.6x, 2x
def test_resampled_windows_equal_the_whole_image_resampled(tmp_path, rng, target_um):
    "A tiled TIFF (64 px tiles) at 32 um: windows anywhere (edges, across tiles) are the same part of the whole image."
    a = rng.random((2, 203, 157)).astype(np.float32)
    p = tmp_path / "a.tif"
    tifffile.imwrite(p, a, tile=(64, 64), photometric="minisblack", planarconfig="separate")
    w = Resampled(open_image(p), 32.0, target_um)
    f = target_um / 32.0
    assert w.shape == tuple(math.ceil(n / f) for n in a.shape[1:]) and w.dtype == np.float32 and w.channels == 2
    whole = w.read(slice(0, w.shape[0]), slice(0, w.shape[1]))
    want = area_reference(a, f, w.shape) if f >= 1 else linear_reference(a, w)
    np.testing.assert_allclose(whole, want, rtol=0, atol=1e-6)
    H, W = w.shape
    for rows, cols in ((slice(0, 7), slice(0, W)), (slice(H - 9, H), slice(W - 5, W)), (slice(19, 45), slice(30, 41)),
                       (slice(H // 2, H // 2 + 1), slice(0, 1)), (slice(3, 3), slice(0, 4))):
        assert np.array_equal(w.read(rows, cols), whole[:, rows, cols])  # bit for bit
    w.tile_px = 50  # the same whole image, resampled in many tiles
    assert np.array_equal(w.read(slice(0, H), slice(0, W)), whole)


def test_resampled_shrinking_by_two_is_the_2x2_mean_and_keeps_the_dtype(rng):
    a = rng.integers(0, 65535, (1, 120, 90), dtype=np.uint16)
    w = Resampled(ArrayReader([a]), 10.0, 20.0)
    got = w.read(slice(0, 60), slice(0, 45))
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got[0], np.rint(block_reduce(a[0].astype(np.float64), (2, 2), np.mean)))
    b = np.full((3, 50, 50), 7, np.uint8)  # a constant stays itself at any pixel size, whole-number dtype or not
    for t in (13.0, 10.0, 5.5):
        assert (Resampled(ArrayReader([b]), 10.0, t).read(slice(0, 5), slice(0, 5)) == 7).all()


def test_resampled_at_the_same_pixel_size_is_the_identity(tmp_path, rng):
    a = rng.integers(0, 255, (333, 517), dtype=np.uint8)
    p = tmp_path / "x.tif"
    _write_pyramid_tiff(p, [a, a[::2, ::2].copy()])
    r = open_image(p)
    w = Resampled(r, 32.0, 32.0)
    assert w.shape == r.shape and w.dtype == r.dtype and w.channels == r.channels
    for rows, cols in ((slice(0, 333), slice(0, 517)), (slice(63, 65), slice(127, 300)), (slice(300, 333), slice(500, 517))):
        assert np.array_equal(w.read(rows, cols), r.read(rows, cols))
    np.testing.assert_allclose(w.to_source([[0, 0], [10.5, 3]]), [[0, 0], [10.5, 3]])


def test_resampled_reads_the_coarsest_pyramid_level_at_least_as_fine_as_the_target(rng, monkeypatch):
    monkeypatch.setattr(Resampled, "coarsest_side", 16)  # a pyramid of its own down to 16 px
    l0 = rng.random((1, 256, 200))
    lv = [l0, l0.reshape(1, 128, 2, 100, 2).mean((2, 4)), l0.reshape(1, 64, 4, 50, 4).mean((2, 4))]
    expect = {(25.0, 0): (1, 1.25), (40.0, 0): (2, 1.0), (15.0, 0): (0, 1.5), (5.0, 0): (0, 0.5), (15.0, 1): (1, 1.5),
              (10.0, 2): (2, 1.0), (80.0, 0): (2, 2.0)}
    for (t, level), (k, f) in expect.items():
        r = ArrayReader(lv)
        w = Resampled(r, 10.0, t)
        assert w.source_level(level) == pytest.approx((k, f))
        H, W = w.levels[level]
        w.read(slice(0, H), slice(0, W), level)
        assert {rd[0] for rd in r.reads} == {k}, (t, level, r.reads)
    w = Resampled(ArrayReader(lv), 10.0, 40.0)  # a level at the target pixel size is read as it is
    assert np.array_equal(w.read(slice(3, 60), slice(0, 50)), lv[2][:, 3:60])
    odd = [np.zeros((1, 101, 203)), np.zeros((1, 51, 102)), np.zeros((1, 25, 50))]  # ceil- and floor-sized levels
    assert [Resampled(ArrayReader(odd), 1.0, t).source_level(0)[0] for t in (1.9, 2.0, 3.9, 4.0)] == [0, 1, 1, 2]
    w = Resampled(ArrayReader(odd), 1.0, 4.0)  # the floor-sized level is one source pixel short: the edge repeats
    assert w.shape == (26, 51) and w.read(slice(0, 26), slice(0, 51)).shape == (1, 26, 51)


def test_resampled_reads_only_what_a_window_needs(rng):
    "A window reads the source under it (plus the pixels its edges touch); a large one in bounded tiles."
    r = ArrayReader([rng.random((1, 900, 700))])
    w = Resampled(r, 10.0, 15.0)
    w.read(slice(100, 140), slice(200, 264))
    assert r.reads == [(0, 150, 210, 300, 396)]  # rows 100..139 cover source rows [150, 210)
    r.reads.clear()
    w.tile_px = 64
    w.read(slice(0, w.shape[0]), slice(0, w.shape[1]))
    assert max(max(r1 - r0, c1 - c0) for _, r0, r1, c0, c1 in r.reads) <= w.tile_px + 2
    covered = np.zeros(r.shape, int)
    for _, r0, r1, c0, c1 in r.reads:
        covered[r0:r1, c0:c1] += 1
    assert covered.min() >= 1 and covered.max() <= 4  # every source pixel read, none more than a tile corner's 4 times


def test_resampled_keeps_a_nan_inside_the_pixels_that_cover_it():
    a = np.ones((1, 12, 12), np.float32)
    a[0, 5, 5] = np.nan
    got = Resampled(ArrayReader([a]), 1.0, 3.0).read(slice(0, 4), slice(0, 4))[0]
    assert np.isnan(got[1, 1]) and np.isfinite(np.delete(got.ravel(), 5)).all() and np.nanmax(got) == 1


@pytest.mark.parametrize("source_um", [float("nan"), float("inf"), 0.0, -32.0, "abc", None, True])
def test_resampled_refuses_a_pixel_size_that_is_not_one(source_um):
    with pytest.raises(DataError) as e:
        Resampled(ArrayReader([np.zeros((1, 100, 100))]), source_um, 32.0)
    assert e.value.field == "--spacing-um" and "\n" not in str(e.value)


def test_resampled_refuses_enlarging_beyond_twice_and_results_smaller_than_a_patch():
    r = ArrayReader([np.zeros((1, 300, 200), np.uint8)])
    assert Resampled(r, 32.0, 16.0).shape == (600, 400)  # enlarging 2x: allowed
    with pytest.raises(DataError, match="enlarging by more than 2x") as e:
        Resampled(r, 32.0, 15.0)
    assert e.value.field == "--spacing-um" and e.value.file == r.path
    assert Resampled(r, 32.0, 12.0, max_enlarge=3).shape == (800, 534)
    with pytest.raises(DataError, match="smaller than one 64-px patch") as e:
        Resampled(r, 32.0, 128.0, min_px=64)  # 75 x 50 px
    assert e.value.field == "--spacing-um"
    with pytest.raises(DataError, match="smaller than") as e:
        Resampled(r, 1.0, 1000.0, min_px=2, field="spacing_um")  # 1 x 1 px
    assert e.value.field == "spacing_um"
    with pytest.raises(ValueError, match="not inside"):
        Resampled(r, 32.0, 64.0).read(slice(0, 151), slice(0, 10))


def test_resampled_pixel_positions_map_to_the_source_and_back(rng):
    w = Resampled(ArrayReader([np.zeros((1, 100, 100))]), 10.0, 20.0)
    np.testing.assert_allclose(w.to_source([[0, 0], [3, 7]]), [[0.5, 0.5], [6.5, 14.5]])  # centres of 2 x 2 blocks
    rc = rng.random((5, 2)) * 50
    np.testing.assert_allclose(w.from_source(w.to_source(rc)), rc)


def test_a_section_and_its_tissue_mask_work_on_a_resampled_image(tmp_path):
    "A dark disc on bright glass, 16 um, pyramidal TIFF: presented at 40 um it is read, masked and thresholded."
    r_, c_ = np.mgrid[:400, :600]
    disc = (r_ - 200) ** 2 + (c_ - 300) ** 2 < 150 ** 2
    a = np.where(disc, 60, 240).astype(np.uint8)
    p = tmp_path / "disc.tif"
    _write_pyramid_tiff(p, [a, a.reshape(200, 2, 300, 2).mean((1, 3)).astype(np.uint8)])
    src = ArrayReader([open_image(p).read(slice(0, 400), slice(0, 600)),
                       open_image(p).read(slice(0, 200), slice(0, 300), 1)], path=p)
    w = Resampled(src, 16.0, 40.0, min_px=64)
    sec = ImageSection(w, "nissl", 40.0, None, mask=TissueMask(w, "nissl"), id="disc")
    assert sec.shape == (160, 240) and sec.read(slice(-5, 20), slice(0, 30)).dtype == np.float32
    m = sec.cortex_mask(1)
    assert m.shape == mask_shape(sec.shape, 1)
    rr, cc = np.mgrid[:80, :120]
    truth = ((rr + 0.5) * 2 * 2.5 - 200) ** 2 + ((cc + 0.5) * 2 * 2.5 - 300) ** 2 < 150 ** 2
    assert np.mean(m == truth) > 0.98
    assert {rd[0] for rd in src.reads} == {1}  # the mask came from the source's 32 um level, not its full resolution


def test_the_pixel_size_record_and_reading_it_back():
    assert spacing_record([32, 32.0], patch_px=64) == {"spacing_um": 32.0, "patch_px": 64, "patch_mm": 64 * 32.0 / 1000}
    assert spacing_record([64.0, 16.0]) == {"spacing_um": [16.0, 64.0]}
    assert spacing_record([], patch_px=64) == {}
    rec = spacing_record([64.0, 16.0, 64.0], patch_px=128)
    assert rec["patch_mm"] == [128 * 16.0 / 1000, 128 * 64.0 / 1000] and recorded_spacing(rec) == (16.0, 64.0)
    assert recorded_spacing({"spacing_um": 32}) == (32.0,) and recorded_spacing({}) is None
    assert recorded_spacing(None) is None and recorded_spacing({"patch_px": 64}) is None  # written before: unknown
    assert recorded_spacing({"parts": [{"spacing_um": 20.0}, {"spacing_um": [20.0, 40.0]}]}) == (20.0, 40.0)
    assert recorded_spacing({"parts": [{"spacing_um": 20.0}, {"grid_mm": 2.0}]}) is None  # one part unknown
    for bad in ([0.0], [float("nan")], ["x"]):
        with pytest.raises(DataError) as e:
            spacing_record(bad)
        assert e.value.field == "spacing_um"
    with pytest.raises(DataError, match="must be > 0") as e:
        recorded_spacing({"spacing_um": -1}, file="f.json")
    assert e.value.field == "spacing_um" and e.value.file == "f.json"
    assert nearest_spacing([20.0, 40.0], 32.0) == 40.0 and nearest_spacing([20.0, 40.0], 28.0) == 20.0
    assert nearest_spacing((16.0,), 1000.0) == 16.0
    with pytest.raises(DataError, match="no recorded pixel size"):
        nearest_spacing([], 32.0)
