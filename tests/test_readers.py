"Image readers: windows of OME-Zarr, TIFF, PNG/JPEG and NIfTI; only the chunks a window needs; files that are not images."
import os
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from cytoclr.core import DataError
from cytoclr.export import write_section_zarr
from cytoclr.readers import TiffReader, ZarrReader, open_image
from cytoclr.sections import ImageMask, ImageSection

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
