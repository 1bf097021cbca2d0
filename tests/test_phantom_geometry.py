"Phantom planes: counter-based randomness, affine, coarse geometry and its disk cache, ground truth."
import numpy as np
import pytest
from scipy import stats

from cytoclr import phantom_geometry as P
from cytoclr.core import DataError
from cytoclr.phantom import PhantomBrain
from cytoclr.phantom_geometry import hash_uniform


@pytest.fixture(scope="module")
def brain(ref):
    return PhantomBrain(1, ref=ref)


def test_hash_uniform_is_deterministic_and_uniform():
    u = hash_uniform(3, np.arange(50_000), 7)
    assert np.array_equal(u, hash_uniform(3, np.arange(50_000), 7))
    assert not np.array_equal(u, hash_uniform(4, np.arange(50_000), 7))
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02  # neighbouring keys are independent


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


def test_plane_geometry_from_the_disk_cache_is_the_computed_one(ref, tmp_path, monkeypatch):
    monkeypatch.setenv("CYTOCLR_CACHE", str(tmp_path))
    monkeypatch.delenv(P.GEOMETRY_CACHE_ENV, raising=False)
    sec = PhantomBrain(2, ref=ref).section(4, spacing_um=64)
    g = sec.geometry  # computed and written
    files = list((tmp_path / "phantom_geometry").glob("*.npz"))
    assert len(files) == 1
    fresh = PhantomBrain(2, ref=ref).section(4, spacing_um=64, modality="pli")  # another brain object, same plane
    monkeypatch.setattr(P.PhantomPlane, "_compute_geometry", lambda self: pytest.fail("computed instead of read"))
    h = fresh.geometry
    assert set(h) == set(g) and h["step"] == g["step"]
    for k in g:
        if k != "step":
            assert h[k].dtype == g[k].dtype and np.array_equal(h[k], g[k]), k
    assert np.shares_memory(h["fields"], h["flat"])
    w = (slice(200, 264), slice(300, 364))
    assert np.array_equal(fresh.read(*w), PhantomBrain(2, ref=ref).section(4, spacing_um=64, modality="pli").read(*w))


def test_plane_geometry_cache_keys_and_damage(ref, tmp_path, monkeypatch):
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


def test_the_cache_file_name_follows_the_geometry_code(ref, tmp_path, monkeypatch):
    "Geometry code moved out of cytoclr.phantom still invalidates the disk cache: its module is in the hash."
    assert {"cytoclr.phantom", "cytoclr.phantom_geometry", "cytoclr.reference"} <= set(P.GEOMETRY_CODE)
    monkeypatch.setenv("CYTOCLR_CACHE", str(tmp_path))
    monkeypatch.delenv(P.GEOMETRY_CACHE_ENV, raising=False)
    key = ("coronal", -10.0, 0.0, (0.0, 1.0, 2.0, 3.0))
    before = P.geometry_cache_path(PhantomBrain(2, ref=ref), key)
    calls = []
    real = P.source_fingerprint
    monkeypatch.setattr(P, "source_fingerprint", lambda *m: calls.append(m) or real(*m) + "changed")
    after = P.geometry_cache_path(PhantomBrain(2, ref=ref), key)
    assert calls == [P.GEOMETRY_CODE] and after != before


def test_bad_section_numbers_name_the_field(brain):
    for kw, field in ((dict(spacing_um="x"), "spacing_um"), (dict(shrinkage=0.0), "shrinkage"),
                      (dict(rotation_deg=float("nan")), "rotation_deg"), (dict(tilt_deg=(1.0, None)), "tilt_deg"),
                      (dict(y_mm=float("inf")), "y_mm")):
        with pytest.raises(DataError) as e:
            brain.section(0, **kw)
        assert e.value.field == field
