"Phantom rendering: Poisson draws, window consistency, Nissl cells, 3D-PLI fibres, the same pixels by two code paths."
import numpy as np
import pytest
from scipy import stats

from cytoclr import phantom_rendering as R
from cytoclr.phantom import PhantomBrain, area_base_name, depth_profile
from cytoclr.phantom_rendering import POISSON_MU_BINS, POISSON_U_BINS, _poisson, poisson_table
from helpers import cortex_centre


@pytest.fixture(scope="module")
def brain(ref):
    return PhantomBrain(1, ref=ref)


def test_poisson_sampler_matches_scipy(rng):
    u = rng.uniform(size=20_000)
    mu = rng.uniform(0, 8, size=20_000)
    ours = _poisson(u, mu)
    ref = stats.poisson.ppf(u, mu)  # the independent inverse CDF
    assert (ours == ref).mean() > 0.999  # equal but for float ties at the CDF steps and the far tail


def test_poisson_table_matches_scipy():
    table = poisson_table(9.0)
    mu = np.linspace(0, 9.0, POISSON_MU_BINS)[:, None]
    u = (np.arange(POISSON_U_BINS) + 0.5) / POISSON_U_BINS
    assert table.shape == (POISSON_MU_BINS, POISSON_U_BINS)
    assert (table == stats.poisson.ppf(u, mu)).mean() > 0.999
    assert np.allclose(table.mean(1), mu[:, 0], atol=0.02)  # the lookup keeps the mean count


@pytest.mark.parametrize("spacing,modality,rotation,flip", [(32.0, "nissl", 0.0, False), (4.0, "nissl", 25.0, True),
                                                            (2.0, "nissl", 0.0, False), (16.0, "pli", -40.0, True),
                                                            (32.0, "pli", 0.0, False), (8.0, "pli", 0.0, True)])
def test_window_consistency(brain, rng, spacing, modality, rotation, flip):
    sec = brain.section(0, spacing_um=spacing, modality=modality, rotation_deg=rotation, flip=flip)
    r, c = cortex_centre(sec, rng)
    big = sec.read(slice(r - 120, r + 130), slice(c - 110, c + 100))
    for dr, dc, h, w in ((0, 0, 250, 210), (13, 57, 64, 64), (200, 3, 50, 1), (121, 99, 1, 1)):
        small = sec.read(slice(r - 120 + dr, r - 120 + dr + h), slice(c - 110 + dc, c - 110 + dc + w))
        assert np.array_equal(big[:, dr:dr + h, dc:dc + w], small), (dr, dc)


def test_read_values_and_channels(brain, rng):
    n = brain.section(0, spacing_um=32)
    p = brain.section(0, spacing_um=32, modality="pli")
    assert n.channels == 1 and p.channels == 3 and p.channel_names == ("transmittance", "retardation", "direction")
    r, c = cortex_centre(n, rng)
    w = (slice(r - 64, r + 64), slice(c - 64, c + 64))
    x, y = n.read(*w), p.read(*w)
    assert x.shape == (1, 128, 128) and y.shape == (3, 128, 128) and x.dtype == y.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.02
    assert 0 <= y[:2].min() and y[:2].max() <= 1
    assert 0 <= y[2].min() and y[2].max() < 180 and y[2].std() > 1
    assert (n.brain, n.section, n.source, n.modality) == ("phantom-1", 0, "phantom", "nissl")


@pytest.mark.parametrize("spacing,flip", [(32.0, False), (32.0, True), (16.0, False)])  # 16: lattice texture
def test_pli_row_then_column_path_equals_per_pixel_lookups(brain, rng, spacing, flip):
    "On unrotated sections PLI interpolates along rows, then columns: the same image as bilinear lookups per pixel."
    sec = brain.section(0, spacing_um=spacing, modality="pli", flip=flip)
    r, c = cortex_centre(sec, rng)
    fast = sec._pli(r - 100, r + 100, c - 90, c + 110)
    slow = sec._pli(r - 100, r + 100, c - 90, c + 110, separable=False)
    assert fast.shape == slow.shape == (3, 200, 200)
    for ch in (0, 1):  # float32 rounding may move a pixel into the next depth bin: compare all but a few
        assert np.mean(np.abs(fast[ch] - slow[ch]) > 1e-4) < 0.01, ch
    d = np.abs(fast[2] - slow[2])
    d = np.minimum(d, 180 - d)[fast[1] > 0.1]
    assert d.size > 5000 and np.mean(d > 0.1) < 0.01


def test_pli_direction_turns_with_the_image(brain, rng):
    "The same tissue shows the same fibre axis in 3D whatever the in-plane rotation and flip of the image."
    a = brain.section(0, spacing_um=250, tilt_deg=(0, 0), modality="pli")
    b = brain.section(0, spacing_um=250, tilt_deg=(0, 0), modality="pli", rotation_deg=70, flip=True)
    pa, pb = a.read(slice(None), slice(None)), b.read(slice(None), slice(None))
    r, c = np.nonzero(pa[1] > 0.4)
    i = rng.choice(len(r), 500, replace=False)
    rc_b = np.rint(b.from_reference(a.to_reference(np.stack([r[i], c[i]], 1)))).astype(int)
    ok = (rc_b >= 0).all(1) & (rc_b < b.shape).all(1)
    r, c, rc_b = r[i][ok], c[i][ok], rc_b[ok]
    unit = lambda s, k: s.affine[:, k] / np.linalg.norm(s.affine[:, k])  # image axes in 3D
    phi = np.deg2rad(pa[2, r, c])
    v = np.cos(phi)[:, None] * unit(a, 1) - np.sin(phi)[:, None] * unit(a, 0)  # counter-clockwise from columns
    want = np.rad2deg(np.arctan2(-(v @ unit(b, 0)), v @ unit(b, 1))) % 180
    d = np.abs(pb[2, rc_b[:, 0], rc_b[:, 1]] - want)
    d = np.minimum(d, 180 - d)
    assert ok.sum() > 400 and np.median(d) < 5, np.median(d)


def test_cell_density_follows_the_profile(brain, rng):
    "Cells drawn in a window vs the profile's density integrated over it (exact layer formula, not the table)."
    sec = brain.section(0, spacing_um=8, tilt_deg=(0, 0))
    for _ in range(3):
        r, c = cortex_centre(sec, rng)
        w = (slice(r - 150, r + 150), slice(c - 150, c + 150))
        cells = sec.cells(*w)
        rr, cc = np.meshgrid(np.arange(r - 150, r + 150), np.arange(c - 150, c + 150), indexing="ij")
        f, area = sec._interp(*sec._plane(rr.ravel().astype(float), cc.ravel().astype(float)))
        gt = sec.ground_truth(*w)
        inside = gt["inside"].ravel()
        lv = brain.layer_values(np.where(inside, area, 0), f[:, 3], np.clip(f[:, 0], 0, 1))
        expected = (lv["density"] * inside).sum() * sec.mm_per_px ** 2
        observed = (cells["kind"] > 0).sum()
        assert expected > 300
        assert abs(observed - expected) < 0.1 * expected, (observed, expected)
        assert (cells["layer"][cells["kind"] > 0] >= 0).all()


def test_pyramids_point_to_the_pia_and_giants_live_in_agranular_layer_v(brain, rng):
    sec = brain.section(0, spacing_um=4, tilt_deg=(0, 0))
    r, c = cortex_centre(sec, rng)
    cl = sec.cells(slice(r - 200, r + 200), slice(c - 200, c + 200))
    assert np.allclose(np.linalg.norm(cl["direction"], axis=1), 1)
    giant = cl["kind"] == 3
    assert (cl["layer"][giant] == 4).all()
    types = np.array(brain.area_types)[cl["area"][giant]]
    assert (types == "agranular").all()


def test_v1_retardation_shows_the_stria_of_gennari(brain, ref):
    V1 = [i for i, n in enumerate(ref.area_names) if area_base_name(n) == "V1"]
    sec = brain.section(-150, spacing_um=32, tilt_deg=(0, 0), modality="pli")
    low = brain.section(-150, spacing_um=256, tilt_deg=(0, 0)).ground_truth(slice(None), slice(None))
    r, c = np.nonzero(np.isin(low["area"], V1))
    rc = np.rint(sec.from_reference(low["xyz"][r[len(r) // 2], c[len(c) // 2]][None])[0]).astype(int)
    w = (slice(rc[0] - 150, rc[0] + 150), slice(rc[1] - 150, rc[1] + 150))
    img, gt = sec.read(*w), sec.ground_truth(*w)
    in_v1 = np.isin(gt["area"], V1)
    assert in_v1.sum() > 2000
    prof = depth_profile(np.where(in_v1, img[1], np.nan), gt["depth"], 10)
    peak = int(np.nanargmax(prof[2:8])) + 2
    iv = brain.layer_values(np.array([V1[0]]), np.zeros(1), np.array([0.5]))["bounds"][0, 2:4]
    assert iv[0] - 0.1 <= (peak + 0.5) / 10 <= iv[1] + 0.1  # the band sits at layer IV
    assert prof[peak] > 1.5 * prof[1] and prof[peak] > 1.5 * prof[8]
    other = np.isin(gt["area"], [i for i, t in enumerate(brain.area_types) if t == "granular"])
    if other.sum() > 500:  # the band is weaker in granular neighbours
        po = depth_profile(np.where(other, img[1], np.nan), gt["depth"], 10)
        assert prof[peak] > po[peak] + 0.1


def test_strips_render_the_same_bits_as_one_window(brain, rng, monkeypatch):
    "A large window is rendered in strips of rows (`READ_TILE_PX`): the same bits as in one piece."
    for spacing, modality in ((32.0, "nissl"), (32.0, "pli"), (4.0, "nissl")):
        sec = brain.section(1, spacing_um=spacing, modality=modality)
        r, c = cortex_centre(sec, rng)
        w = (slice(r - 40, r + 41), slice(c - 30, c + 30))
        whole = sec.read(*w)
        monkeypatch.setattr(R, "READ_TILE_PX", 7 * 60)  # strips of 7 rows
        strips = sec.read(*w)
        monkeypatch.undo()
        assert whole.dtype == strips.dtype == np.float32 and np.array_equal(whole, strips), (spacing, modality)


def test_giant_cells_have_the_giant_diameter(brain, rng):
    sec = brain.section(0, spacing_um=4, tilt_deg=(0, 0))
    r, c = cortex_centre(sec, rng)
    cl = sec.cells(slice(r - 200, r + 200), slice(c - 200, c + 200))
    d = cl["diameter_um"][cl["kind"] == 3]
    assert ((d >= 0.75 * R.GIANT_UM) & (d <= 1.25 * R.GIANT_UM)).all()


def test_texture_decorrelates_at_coarse_spacing(brain):
    "The prose's claim: at 32 um/px neighbouring pixels see nearly independent texture (0.03), at 4 um/px nearly the same."
    rho = {}
    for sp in (32.0, 4.0):
        s = brain.section(0, spacing_um=sp, modality="pli")
        r0, c0 = (np.array(s.shape) * [0.3, 0.25]).astype(int)
        rho[sp] = R.texture_neighbour_correlation(s, slice(r0, r0 + 200), slice(c0, c0 + 200))
    assert abs(rho[32.0]) < 0.1 and rho[4.0] > 0.9, rho
    # by hand on a tiny window: the Pearson correlation of the texture's left and right neighbours
    s = brain.section(0, spacing_um=32.0, modality="pli")
    _, _, a, b = s._pixels(10, 13, 20, 24)
    t = s._value_noise(a, b, R.TEXTURE_MM, 31).reshape(3, 4).astype(np.float64)
    x, y = t[:, :-1].ravel(), t[:, 1:].ravel()
    want = ((x - x.mean()) * (y - y.mean())).sum() / np.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert R.texture_neighbour_correlation(s, slice(10, 13), slice(20, 24)) == pytest.approx(want, rel=1e-5)
