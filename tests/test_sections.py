"Sections and transforms: the `Section` interface, `ImageSection`, masks, `check_affine` (and fakes the other data tests share)."
import pickle

import numpy as np
import pytest
import tifffile
from PIL import Image

from cytoclr.core import DataError
from cytoclr.readers import open_image
from cytoclr.sections import (FILL, ImageMask, ImageSection, PolygonMask, check_affine, from_reference, to_reference)

from helpers import coronal_affine


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




def test_pli_tissue_mask_keeps_the_cortex(tmp_path):
    "PLI transmittance has three classes (white matter, grey matter, glass): the mask must keep grey matter too."
    from cytoclr.export import write_section_tiff
    from cytoclr.phantom import PhantomBrain
    from cytoclr.readers import open_image
    from cytoclr.sections import TissueMask
    sec = PhantomBrain(0).section(y_mm=-20.0, spacing_um=256.0, modality="pli")
    img, _ = write_section_tiff(sec, tmp_path / "pli.tif", mask=False)
    tissue = TissueMask(open_image(img), "pli")(sec.shape, 0)
    cortex = sec.cortex_mask(0)
    assert tissue[cortex].mean() > 0.9  # a two-class threshold keeps about 2% of it
    assert tissue.mean() < 0.6  # and glass stays out
