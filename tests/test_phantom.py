"Phantom brains: determinism, window consistency, geometry, cytoarchitecture, fibre architecture, bad input."
import numpy as np
import pytest
from scipy import stats

from cytoclr.phantom import (AREA_TYPES, POISSON_MU_BINS, POISSON_U_BINS, PhantomBrain, _pli, _poisson, area_base_name,
                             area_type_index, area_type_of, depth_profile, hash_uniform, laminar_profile, poisson_table,
                             profile_classification)
from cytoclr.core import DataError


@pytest.fixture(scope="module")
def brain(ref):
    return PhantomBrain(1, ref=ref)


def _cortex_centre(sec, rng, level=4):
    "A random pixel whose neighbourhood is cortex (from the level-4 mask)."
    r, c = np.nonzero(sec.cortex_mask(level))
    i = rng.integers(len(r))
    return int(r[i] * 2 ** level), int(c[i] * 2 ** level)


# -- counter-based randomness -------------------------------------------------------------------------------------
def test_hash_uniform_is_deterministic_and_uniform():
    u = hash_uniform(3, np.arange(50_000), 7)
    assert np.array_equal(u, hash_uniform(3, np.arange(50_000), 7))
    assert not np.array_equal(u, hash_uniform(4, np.arange(50_000), 7))
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02  # neighbouring keys are independent


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


# -- subjects ----------------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_different_seed_different_brain(ref, rng):
    a, b, c = PhantomBrain(5, ref=ref), PhantomBrain(5, ref=ref), PhantomBrain(6, ref=ref)
    for mod in ("nissl", "pli"):
        sa, sb, sc = (x.section(3, spacing_um=64, modality=mod) for x in (a, b, c))
        r, cc = _cortex_centre(sa, rng)
        w = (slice(r - 40, r + 40), slice(cc - 40, cc + 40))
        assert np.array_equal(sa.read(*w), sb.read(*w))
        assert not np.array_equal(sa.read(*w), sc.read(*w))
    assert a.stain == b.stain and a.stain != c.stain
    x = ref.mid["L"][::100]
    assert np.array_equal(a.deform(x), b.deform(x))
    assert np.abs(a.deform(x) - c.deform(x)).mean() > 1.0  # brains differ by millimetres


def test_deformation_rms_is_the_parameter(ref):
    x = np.concatenate([ref.mid[h][::20] for h in ref.hemis])
    for mm in (1.0, 3.0):
        d = PhantomBrain(2, ref=ref, deform_mm=mm).deform(x)
        rms = np.sqrt((d ** 2).sum(1).mean())
        assert 0.5 * mm < rms < 1.6 * mm
    assert np.abs(PhantomBrain(2, ref=ref, deform_mm=0.0).deform(x)).max() == 0


# -- sections ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing,modality,rotation,flip", [(32.0, "nissl", 0.0, False), (4.0, "nissl", 25.0, True),
                                                            (2.0, "nissl", 0.0, False), (16.0, "pli", -40.0, True),
                                                            (32.0, "pli", 0.0, False), (8.0, "pli", 0.0, True)])
def test_window_consistency(brain, rng, spacing, modality, rotation, flip):
    sec = brain.section(0, spacing_um=spacing, modality=modality, rotation_deg=rotation, flip=flip)
    r, c = _cortex_centre(sec, rng)
    big = sec.read(slice(r - 120, r + 130), slice(c - 110, c + 100))
    for dr, dc, h, w in ((0, 0, 250, 210), (13, 57, 64, 64), (200, 3, 50, 1), (121, 99, 1, 1)):
        small = sec.read(slice(r - 120 + dr, r - 120 + dr + h), slice(c - 110 + dc, c - 110 + dc + w))
        assert np.array_equal(big[:, dr:dr + h, dc:dc + w], small), (dr, dc)


def test_read_values_and_channels(brain, rng):
    n = brain.section(0, spacing_um=32)
    p = brain.section(0, spacing_um=32, modality="pli")
    assert n.channels == 1 and p.channels == 3 and p.channel_names == ("transmittance", "retardation", "direction")
    r, c = _cortex_centre(n, rng)
    w = (slice(r - 64, r + 64), slice(c - 64, c + 64))
    x, y = n.read(*w), p.read(*w)
    assert x.shape == (1, 128, 128) and y.shape == (3, 128, 128) and x.dtype == y.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.02
    assert 0 <= y[:2].min() and y[:2].max() <= 1
    assert 0 <= y[2].min() and y[2].max() < 180 and y[2].std() > 1
    assert (n.brain, n.section, n.source, n.modality) == ("phantom-1", 0, "phantom", "nissl")


def test_affine_round_trip_and_scale(brain, rng):
    for rot, flip, shrink in ((0.0, False, 1.0), (33.0, True, 0.9)):
        sec = brain.section(4, spacing_um=20, rotation_deg=rot, flip=flip, shrinkage=shrink, tilt_deg=(2.0, -1.0))
        rc = rng.uniform(0, 1000, (50, 2))
        xyz = sec.to_reference(rc)
        assert np.allclose(sec.from_reference(xyz), rc)
        assert np.allclose(xyz, rc @ sec.affine[:, :2].T + sec.affine[:, 2])
        scale = np.linalg.norm(sec.affine[:, :2], axis=0)
        assert np.allclose(scale, 0.020 / (shrink * brain.shrinkage))
        assert abs(sec.affine[:, 0] @ sec.affine[:, 1]) < 1e-12  # image axes stay orthogonal
        gt = sec.ground_truth(slice(100, 103), slice(200, 204))
        rr, cc = np.meshgrid(np.arange(100, 103), np.arange(200, 204), indexing="ij")
        assert np.allclose(gt["xyz"], sec.to_reference(np.stack([rr.ravel(), cc.ravel()], 1)).reshape(3, 4, 3))


@pytest.mark.parametrize("spacing,flip", [(32.0, False), (32.0, True), (16.0, False)])  # 16: lattice texture
def test_pli_row_then_column_path_equals_per_pixel_lookups(brain, rng, spacing, flip):
    "On unrotated sections PLI interpolates along rows, then columns: the same image as bilinear lookups per pixel."
    sec = brain.section(0, spacing_um=spacing, modality="pli", flip=flip)
    r, c = _cortex_centre(sec, rng)
    fast = _pli(sec, r - 100, r + 100, c - 90, c + 110)
    slow = _pli(sec, r - 100, r + 100, c - 90, c + 110, separable=False)
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


def test_rotation_and_flip_show_the_same_tissue(brain, rng):
    "The same reference point has the same ground truth whatever the in-plane transform."
    a = brain.section(0, spacing_um=250, tilt_deg=(0, 0))
    b = brain.section(0, spacing_um=250, tilt_deg=(0, 0), rotation_deg=70, flip=True)
    ga = a.ground_truth(slice(None), slice(None))
    r, c = np.nonzero(ga["inside"])
    i = rng.choice(len(r), 300, replace=False)
    rc_b = np.rint(b.from_reference(ga["xyz"][r[i], c[i]])).astype(int)
    ok = (rc_b >= 0).all(1) & (rc_b < b.shape).all(1)
    gb = b.ground_truth(slice(None), slice(None))
    same = gb["area"][rc_b[ok, 0], rc_b[ok, 1]] == ga["area"][r[i], c[i]][ok]
    assert ok.mean() > 0.95 and same.mean() > 0.9


def test_ground_truth_agrees_with_direct_location(brain, ref, rng):
    "Interpolated coarse geometry vs locating each pixel's homologous reference point directly."
    sec = brain.section(0, spacing_um=200)
    gt = sec.ground_truth(slice(None), slice(None))
    r, c = np.nonzero(gt["inside"])
    i = rng.choice(len(r), 2000, replace=False)
    loc = ref.locate(gt["xyz_true"][r[i], c[i]])
    assert (loc.area == gt["area"][r[i], c[i]]).mean() > 0.9
    assert loc.inside.mean() > 0.9
    assert np.median(np.abs(loc.depth - gt["depth"][r[i], c[i]])) < 0.08
    assert np.isfinite(gt["depth"][gt["inside"]]).all() and np.isnan(gt["depth"][~gt["inside"]]).all()
    assert (gt["area"][gt["inside"]] > 0).all() and (gt["area"][~gt["inside"]] == 0).all()
    # registered coordinates carry this subject's deformation as error
    err = np.linalg.norm(gt["xyz"] - gt["xyz_true"], axis=-1)
    assert 0.5 < np.median(err) < 10


def test_cortex_mask_matches_ground_truth(brain):
    sec = brain.section(2, spacing_um=150)
    gt = sec.ground_truth(slice(None), slice(None))
    assert np.array_equal(sec.cortex_mask(0), gt["inside"])
    m2 = sec.cortex_mask(2)
    assert m2.shape == (-(-sec.shape[0] // 4), -(-sec.shape[1] // 4))
    assert 0.05 < m2.mean() < 0.5 and abs(m2.mean() - gt["inside"].mean()) < 0.05


# -- cytoarchitecture --------------------------------------------------------------------------------------------
def test_cell_density_follows_the_profile(brain, rng):
    "Cells drawn in a window vs the profile's density integrated over it (exact layer formula, not the table)."
    sec = brain.section(0, spacing_um=8, tilt_deg=(0, 0))
    for _ in range(3):
        r, c = _cortex_centre(sec, rng)
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
    r, c = _cortex_centre(sec, rng)
    cl = sec.cells(slice(r - 200, r + 200), slice(c - 200, c + 200))
    assert np.allclose(np.linalg.norm(cl["direction"], axis=1), 1)
    giant = cl["kind"] == 3
    assert (cl["layer"][giant] == 4).all()
    types = np.array(brain.area_types)[cl["area"][giant]]
    assert (types == "agranular").all()


def _type_patches(brain, planes, per_type, rng, size=64, spacing=32.0):
    "Nissl and PLI patches with their ground truth, centred on mid-depth cortex of each area type."
    types = area_type_index(brain)
    out = []
    for idx in planes:
        low = brain.section(idx, spacing_um=256, tilt_deg=(0, 0))
        gt = low.ground_truth(slice(None), slice(None))
        t = np.where(gt["inside"] & (np.abs(np.nan_to_num(gt["depth"], nan=9) - 0.5) < 0.2), types[gt["area"]], -1)
        secs = {m: brain.section(idx, spacing_um=spacing, tilt_deg=(0, 0), modality=m) for m in ("nissl", "pli")}
        for k in range(len(AREA_TYPES)):
            r, c = np.nonzero(t == k)
            for j in rng.choice(len(r), min(per_type, len(r)), replace=False):
                rc = np.rint(secs["nissl"].from_reference(gt["xyz"][r[j], c[j]][None])[0]).astype(int) - size // 2
                if (rc < 0).any() or (rc + size > secs["nissl"].shape).any():
                    continue
                w = (slice(rc[0], rc[0] + size), slice(rc[1], rc[1] + size))
                out.append((k, secs["nissl"].read(*w)[0], secs["pli"].read(*w), secs["nissl"].ground_truth(*w)))
    return out


def test_depth_profiles_separate_the_area_types(brain, rng):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    patches = _type_patches(brain, [-150, -20, 40], 12, rng)
    y = np.array([k for k, *_ in patches])
    X = np.array([depth_profile(n, gt["depth"], 10) for k, n, p, gt in patches])
    X = np.where(np.isnan(X), np.nanmean(X, 0), X)
    assert len(np.unique(y)) == len(AREA_TYPES)
    acc = cross_val_score(LogisticRegression(C=10.0, max_iter=2000), X, y, cv=4).mean()
    chance = np.bincount(y).max() / len(y)
    assert acc > chance + 0.25, (acc, chance)


def test_profile_classification_scores_separable_noise_and_bad_input(rng):
    y = np.repeat(np.arange(3), 20)
    signal = np.eye(3)[y] @ rng.normal(size=(3, 10)) * 5  # three well-separated class profiles
    X = signal + rng.normal(size=(60, 10))
    X[::7, 3] = np.nan  # empty depth bins are imputed, not fatal
    r = profile_classification(X, y)
    assert r["accuracy"] > 0.95 and r["chance"] == pytest.approx(1 / 3) and r["n"] == 60 and r["folds"] == 4
    noise = profile_classification(rng.normal(size=(60, 10)), y)
    assert noise["accuracy"] < 0.6  # labels carry no information: near the 1/3 chance level
    with pytest.raises(DataError, match="2 classes"):
        profile_classification(X[:3], [0, 1, 1])
    with pytest.raises(DataError, match="one label each"):
        profile_classification(X, y[:10])


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


# -- area types and bad input -------------------------------------------------------------------------------------
def test_area_types_from_names():
    assert area_type_of("L_V1_ROI") == "koniocortex" and area_type_of("R_3b_ROI") == "koniocortex"
    assert area_type_of("L_4_ROI") == "agranular" and area_type_of("L_EC_ROI") == "limbic"
    assert area_type_of("L_46_ROI") == "granular"
    p = laminar_profile("koniocortex")
    assert np.argmax(p["density"]) == 3  # layer IV
    with pytest.raises(DataError, match="area_type"):
        laminar_profile("neocortex")


def test_bad_parameters_name_the_parameter(brain, ref):
    with pytest.raises(DataError, match="spacing_um"):
        brain.section(0, spacing_um=0)
    with pytest.raises(DataError, match="spacing_um"):
        brain.section(0, spacing_um=-2.0)
    with pytest.raises(DataError, match="modality"):
        brain.section(0, modality="mri")
    with pytest.raises(DataError, match="axis"):
        brain.section(0, axis="oblique")
    with pytest.raises(DataError, match="y_mm"):
        brain.section(0, y_mm=500.0)
    sec = brain.section(0, spacing_um=200)
    with pytest.raises(DataError, match="rows"):
        sec.read(slice(-5, 10), slice(0, 10))
    with pytest.raises(DataError, match="cols"):
        sec.read(slice(0, 10), slice(sec.shape[1] - 5, sec.shape[1] + 5))
    with pytest.raises(DataError, match="rows"):
        sec.read(slice(10, 10), slice(0, 10))
    with pytest.raises(DataError, match="level"):
        sec.cortex_mask(-1)
    with pytest.raises(DataError, match="deform_mm"):
        PhantomBrain(1, ref=ref, deform_mm=-1)
    with pytest.raises(DataError, match="geometry_mm"):
        PhantomBrain(1, ref=ref, geometry_mm=0)
    with pytest.raises(DataError, match="colour"):
        PhantomBrain(1, ref=ref, colour=3)
    with pytest.raises(DataError, match="seed"):
        PhantomBrain(-1, ref=ref)


# -- plane geometry kept on disk across processes -----------------------------------------------------------------
def test_plane_geometry_from_the_disk_cache_is_the_computed_one(ref, tmp_path, monkeypatch):
    from cytoclr import phantom as P
    monkeypatch.setenv("CYTOCLR_CACHE", str(tmp_path))
    monkeypatch.delenv(P.GEOMETRY_CACHE_ENV, raising=False)
    sec = PhantomBrain(2, ref=ref).section(4, spacing_um=64)
    g = sec.geometry  # computed and written
    files = list((tmp_path / "phantom_geometry").glob("*.npz"))
    assert len(files) == 1
    fresh = PhantomBrain(2, ref=ref).section(4, spacing_um=64, modality="pli")  # another brain object, same plane
    monkeypatch.setattr(P.PhantomSection, "_compute_geometry", lambda self: pytest.fail("computed instead of read"))
    h = fresh.geometry
    assert set(h) == set(g) and h["step"] == g["step"]
    for k in g:
        if k != "step":
            assert h[k].dtype == g[k].dtype and np.array_equal(h[k], g[k]), k
    assert np.shares_memory(h["fields"], h["flat"])
    w = (slice(200, 264), slice(300, 364))
    assert np.array_equal(fresh.read(*w), PhantomBrain(2, ref=ref).section(4, spacing_um=64, modality="pli").read(*w))


def test_plane_geometry_cache_keys_and_damage(ref, tmp_path, monkeypatch):
    from cytoclr import phantom as P
    monkeypatch.setenv("CYTOCLR_CACHE", str(tmp_path))
    monkeypatch.delenv(P.GEOMETRY_CACHE_ENV, raising=False)
    a, b, c = PhantomBrain(2, ref=ref), PhantomBrain(3, ref=ref), PhantomBrain(2, ref=ref, deform_mm=1.0)
    key = ("coronal", -10.0, 0.0, (0.0, 1.0, 2.0, 3.0))
    paths = {P.geometry_cache_path(x, key) for x in (a, b, c)} | {P.geometry_cache_path(a, key[:1] + (-12.0,) + key[2:])}
    assert len(paths) == 4  # subject, variation and plane each change the file
    sec = a.section(5, spacing_um=64)
    want = sec.geometry
    (path,) = (tmp_path / "phantom_geometry").glob("*.npz")
    path.write_bytes(b"not a zip file")  # a damaged file is computed again and replaced
    again = PhantomBrain(2, ref=ref).section(5, spacing_um=64).geometry
    assert np.array_equal(again["flat"], want["flat"]) and np.load(path)["flat"].shape == want["flat"].shape
    monkeypatch.setenv(P.GEOMETRY_CACHE_ENV, "0")
    assert P.geometry_cache_path(a, key) is None
