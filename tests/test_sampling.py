"Tests of cytoclr.sampling: uniform cortex sampling, patches, dataset and batch samplers (augmentation: test_augment.py)."
import pickle

import numpy as np
import pytest
import torch

from cytoclr.augment import Augment
from cytoclr.core import DataError
from cytoclr.reference import Location
from cytoclr.sampling import (NeighbourhoodBatchSampler, PatchDataset, Samples, batch_composition, cortex_area_mm2,
                              depth_coverage, extract_patch, pairwise_distances, sample_locations, sampling_metrics,
                              span_summary, uniform_cortex_positives)


class FakeSection:
    "A tiny in-memory Section: a coronal plane at `y_mm`, pixels from an array, cortex mask from a band."

    def __init__(self, img, spacing_um=100.0, y_mm=0.0, origin=(-60.0, 70.0), mask=None, brain="b0", modality="nissl",
                 background=None):
        self.img = np.asarray(img, np.float32)  # (C, rows, cols)
        self.channels, rows, cols = self.img.shape
        self.shape = (rows, cols)
        self.spacing_um, self.modality, self.brain, self.section, self.source = spacing_um, modality, brain, 0, "fake"
        s = spacing_um / 1000
        # xyz = A @ [row, col, 1]: x grows with col, z falls with row
        self.affine = np.array([[0, s, origin[0]], [0, 0, y_mm], [-s, 0, origin[1]]])
        self._mask = mask
        if background is not None:
            self.background = background

    def read(self, rows, cols):
        return self.img[:, rows, cols].copy()

    def to_reference(self, rc):
        rc = np.asarray(rc, np.float64)
        return np.c_[rc, np.ones(len(rc))] @ self.affine.T

    def cortex_mask(self, level=0):
        s = 2 ** level
        m = self._mask if self._mask is not None else np.ones(self.shape, bool)
        return m[::s, ::s]  # ceil(rows / s), ceil(cols / s)


class FakeRef:
    "Everything is cortex of area 1 on the left hemisphere; the nearest vertex is a grid id."
    hemis = ("L",)

    def __init__(self):
        g = np.stack(np.meshgrid(np.arange(-80, 81.0), [0.0], np.arange(-60, 81.0), indexing="ij"), -1).reshape(-1, 3)
        self.mid = {"L": g}
        from scipy.spatial import cKDTree
        self._tree = cKDTree(g)

    def locate(self, xyz):
        d, v = self._tree.query(np.asarray(xyz, np.float64))
        n = len(v)
        return Location(np.zeros(n, np.int8), v.astype(np.int64), np.full(n, 0.5), np.ones(n, np.int64),
                        np.ones(n, bool), d)


@pytest.fixture
def fake_ref():
    return FakeRef()


def test_uniform_per_area_across_sections(rng, fake_ref):
    "Sections with equal tissue area get equal shares whatever their pixel count; cells are hit uniformly."
    a = FakeSection(np.zeros((1, 40, 40)), spacing_um=100.0)  # 4 x 4 mm
    b = FakeSection(np.zeros((1, 80, 80)), spacing_um=50.0)  # 4 x 4 mm, 4x the pixels
    mask = np.zeros((40, 60), bool)
    mask[:, :20] = True
    c = FakeSection(np.zeros((1, 40, 60)), spacing_um=100.0, mask=mask)  # 4 x 2 mm of cortex
    s = sample_locations([a, b, c], 20000, seed=1, ref=fake_ref, level=1)
    share = np.bincount(s.section, minlength=3) / len(s)
    np.testing.assert_allclose(share, [0.4, 0.4, 0.2], atol=0.015)
    on_c = s.rc[s.section == 2]
    assert on_c[:, 1].max() < 20 - 0.5 + 1e-9  # only inside the mask (cols 0..19)
    # uniform within a section: counts per 4x4 block of a are flat (chi-square)
    ra = s.rc[s.section == 0]
    blk = (np.floor((ra + 0.5) / 10).astype(int) * [4, 1]).sum(1)
    counts = np.bincount(blk, minlength=16)
    expected = counts.sum() / 16
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 37.7  # 99.9% quantile of chi2 with 15 dof


def test_sub_pixel_jitter_and_fields(fake_ref):
    a = FakeSection(np.zeros((1, 64, 64)), spacing_um=100.0, brain="B7")
    s = sample_locations([a], 3000, seed=3, ref=fake_ref, level=2)
    assert len(s) == 3000 and s.rc.shape == (3000, 2) and s.xyz.shape == (3000, 3)
    frac = (s.rc + 0.5) % 1
    assert frac.std() > 0.25  # continuous positions, not pixel centres
    np.testing.assert_allclose(s.xyz, a.to_reference(s.rc))
    assert set(s.brain) == {"B7"} and (s.area == 1).all() and (s.hemi == 0).all()
    sub = s[np.arange(10)]
    assert len(sub) == 10 and len(s[5]) == 1


def test_sampling_is_seeded(fake_ref):
    a = FakeSection(np.zeros((1, 64, 64)))
    s1 = sample_locations([a], 500, seed=4, ref=fake_ref)
    s2 = sample_locations([a], 500, seed=4, ref=fake_ref)
    s3 = sample_locations([a], 500, seed=5, ref=fake_ref)
    np.testing.assert_array_equal(s1.rc, s2.rc)
    assert not np.allclose(s1.rc, s3.rc)


def test_real_reference_rejects_points_outside_cortex(ref):
    "A coronal plane through the real reference: kept points are all in (or next to) the cortex."
    img = np.zeros((1, 1300, 1500), np.float32)
    sec = FakeSection(img, spacing_um=100.0, y_mm=-18.0, origin=(-75.0, 80.0))  # whole slice is 'mask'
    s = sample_locations([sec], 2000, seed=0, ref=ref, level=3)
    loc = ref.locate(s.xyz)
    assert (loc.inside | (loc.distance_mm <= 3.0)).all() and (s.hemi >= 0).all()
    assert set(np.unique(s.hemi)) == {0, 1}
    np.testing.assert_allclose(np.linalg.norm(s.surface_xyz - s.xyz, axis=1).max(), 5, atol=5)  # near its vertex
    assert (s.area[loc.inside] > 0).all()


def test_sampling_bad_input(fake_ref):
    a = FakeSection(np.zeros((1, 16, 16)), mask=np.zeros((16, 16), bool))
    with pytest.raises(DataError, match="empty"):
        sample_locations([a], 10, seed=0, ref=fake_ref)
    with pytest.raises(DataError, match="no sections"):
        sample_locations([], 10, seed=0, ref=fake_ref)
    with pytest.raises(DataError, match="n must be"):
        sample_locations([FakeSection(np.zeros((1, 16, 16)))], 0, seed=0, ref=fake_ref)


def test_samples_save_load(tmp_path, fake_ref):
    s = sample_locations([FakeSection(np.zeros((1, 32, 32)))], 50, seed=0, ref=fake_ref)
    p = s.save(tmp_path / "s.npz")
    t = Samples.load(p)
    np.testing.assert_array_equal(s.rc, t.rc)
    np.testing.assert_array_equal(s.brain, t.brain)
    with pytest.raises(DataError, match="not found"):
        Samples.load(tmp_path / "missing.npz")


# --- patches -------------------------------------------------------------------------------------

def test_extract_patch_inside_and_border(rng):
    img = rng.random((2, 50, 60)).astype(np.float32)
    sec = FakeSection(img, background=[7.0, 9.0])
    p = extract_patch(sec, (20.3, 30.6), 10)
    assert p.shape == (2, 10, 10) and p.dtype == np.float32
    np.testing.assert_array_equal(p, img[:, 15:25, 26:36])  # centre pixel (20, 31) at index 5
    q = extract_patch(sec, (1.0, 58.0), 8)  # rows -3..4, cols 54..61
    np.testing.assert_array_equal(q[:, 3:, :6], img[:, 0:5, 54:60])
    assert (q[0, :3] == 7).all() and (q[1, :, 6:] == 9).all()
    far = extract_patch(sec, (500.0, 500.0), 4)
    assert (far[0] == 7).all()


def test_extract_patch_default_fill_is_empty_glass(rng):
    sec = FakeSection(rng.random((1, 10, 10)) - 2)  # nissl: bright glass (1.0) outside
    p = extract_patch(sec, (0, 0), 6)
    assert (p[:, :3] == 1).all() and (p[:, 3:, 3:] < -1).all()
    pli = FakeSection(rng.random((3, 10, 10)) + 5, modality="pli")  # transmittance 1, retardation 0, direction 0
    q = extract_patch(pli, (9, 9), 6)
    np.testing.assert_array_equal(q[:, -2:, 0], [[1, 1], [0, 0], [0, 0]])
    odd = FakeSection(rng.random((2, 10, 10)), modality="other")
    assert (extract_patch(odd, (0, 0), 6)[:, 0] == 0).all()


# --- dataset and batches -------------------------------------------------------------------------

def _small(fake_ref, n=64, channels=1, modality="nissl"):
    rng = np.random.default_rng(0)
    img = rng.random((channels, 120, 120)).astype(np.float32)
    if modality == "pli":
        img[2] *= 180
    secs = [FakeSection(img, modality=modality, brain=f"b{i}") for i in range(2)]
    return secs, sample_locations(secs, n, seed=0, ref=fake_ref)


def test_dataset_items_and_determinism(fake_ref):
    secs, s = _small(fake_ref)
    ds = PatchDataset(secs, s, 32, views=2, augment=Augment("nissl"), seed=1)
    a, b = ds[3], ds[3]
    assert a["image"].shape == (2, 1, 32, 32) and a["image"].dtype == torch.float32
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"][0], a["image"][1])
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["image"], a["image"])
    assert a["index"] == 3 and a["xyz"].shape == (3,) and a["section"] == int(s.section[3])
    plain = PatchDataset(secs, s, 32)
    np.testing.assert_array_equal(plain[5]["image"].numpy(), extract_patch(secs[s.section[5]], s.rc[5], 32))
    pickle.dumps(ds)  # workers need a picklable dataset


def test_dataloader_workers_match_main_process(fake_ref):
    secs, s = _small(fake_ref, channels=3, modality="pli")
    ds = PatchDataset(secs, s, 24, views=2, augment=Augment("pli"), seed=2)
    main = torch.stack([d["image"] for b in (range(4), range(4, 8)) for d in ds.__getitems__(b)])
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    got = torch.cat([b["image"] for b in dl])[:8]
    assert torch.equal(main, got) and got.shape == (8, 2, 3, 24, 24)  # workers give the main process's batches
    items = torch.stack([ds[i]["image"] for i in range(8)])
    assert torch.allclose(items[:, :, :2], got[:, :, :2], atol=1e-4)  # ... which are the items, batched


def test_dataset_bad_input(fake_ref):
    secs, s = _small(fake_ref)
    with pytest.raises(DataError, match="views"):
        PatchDataset(secs, s, 32, views=3)
    with pytest.raises(DataError, match="PLI"):
        PatchDataset(secs, s, 32, augment=Augment("pli"))


def _cloud(rng, n=3000):
    "Samples scattered on a 100 x 100 mm sheet (one hemisphere) and a second sheet for hemisphere 1."
    xyz = np.c_[rng.uniform(0, 100, n), rng.uniform(0, 100, n), np.zeros(n)]
    hemi = (rng.random(n) < 0.3).astype(np.int8)
    return Samples(section=rng.integers(0, 10, n), rc=np.zeros((n, 2)), xyz=xyz, hemi=hemi,
                   vertex=np.arange(n), area=np.ones(n, np.int64), brain=np.array([f"b{i % 3}" for i in range(n)]),
                   depth=np.full(n, 0.5), surface_xyz=xyz.copy())


def test_neighbourhood_batches_have_close_pairs(rng):
    s = _cloud(rng)
    b, k, r = 128, 7, 5.0
    smp = NeighbourhoodBatchSampler(s, b, k=k, radius_mm=r, distance="euclidean", seed=0)
    uni = NeighbourhoodBatchSampler(s, b, k=0, seed=0)
    nb, ub = smp.batch(0), uni.batch(0)
    assert len(nb) == b == len(np.unique(nb)) and len(ub) == b == len(np.unique(ub))
    # every seed has its neighbours within r (brute force)
    seeds = nb[:smp.m]
    d = pairwise_distances(s, nb, "euclidean")
    close_n = (d[:smp.m] < r).sum(1) - 1
    expect = np.minimum(k, ((np.linalg.norm(s.xyz[seeds][:, None] - s.xyz[None], axis=2) < r)
                            & (s.hemi[seeds][:, None] == s.hemi[None])).sum(1) - 1)
    assert (close_n >= expect).all()
    close = lambda m: ((m < 5.0).sum(1) - 1).mean()  # partners closer than 5 mm per sample
    pn, pu = close(d), close(pairwise_distances(s, ub, "euclidean"))
    assert pn > 4 * max(pu, 0.5)


def test_sampler_ranks_are_disjoint_and_reproducible(rng):
    s = _cloud(rng, 2000)
    mk = lambda r, seed=0: NeighbourhoodBatchSampler(s, 64, k=3, radius_mm=5, distance="euclidean", seed=seed,
                                                     rank=r, world_size=2)
    a, b = mk(0), mk(1)
    assert len(a) == 2000 // (16 * 2)
    seeds_a = np.concatenate([a.batch(t)[:a.m] for t in range(len(a))])
    seeds_b = np.concatenate([b.batch(t)[:b.m] for t in range(len(b))])
    assert len(np.intersect1d(seeds_a, seeds_b)) == 0
    assert len(np.unique(np.r_[seeds_a, seeds_b])) == len(seeds_a) + len(seeds_b)
    np.testing.assert_array_equal(mk(0).batch(3), a.batch(3))
    a.set_epoch(1)
    assert not np.array_equal(mk(0).batch(3), a.batch(3))
    assert [len(x) for x in mk(1)] == [64] * len(b)


def test_sampler_with_dataloader(fake_ref):
    secs, s = _small(fake_ref, n=200)
    smp = NeighbourhoodBatchSampler(s, 16, k=3, radius_mm=20, distance="euclidean", seed=0, steps=3)
    dl = torch.utils.data.DataLoader(PatchDataset(secs, s, 16), batch_sampler=smp, num_workers=0)
    batches = list(dl)
    assert len(batches) == 3 and batches[0]["image"].shape == (16, 1, 16, 16)


def test_sampler_bad_input(rng):
    s = _cloud(rng, 100)
    with pytest.raises(DataError, match="batch_size"):
        NeighbourhoodBatchSampler(s, 1000)
    with pytest.raises(DataError, match="radius"):
        NeighbourhoodBatchSampler(s, 16, radius_mm=0, distance="euclidean")
    with pytest.raises(DataError, match="rank"):
        NeighbourhoodBatchSampler(s, 16, rank=2, world_size=2, distance="euclidean")


class SheetRef:
    "Two flat 40 x 40 mm triangulated sheets (1 mm grid) as the hemispheres' mid-thickness surfaces."
    hemis = ("L", "R")

    def __init__(self, n=41):
        g = np.stack(np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float), indexing="ij"), -1).reshape(-1, 2)
        v = np.c_[g, np.zeros(len(g))]
        a = (np.arange(n - 1)[:, None] * n + np.arange(n - 1)[None]).ravel()
        f = np.r_[np.c_[a, a + 1, a + n], np.c_[a + 1, a + n + 1, a + n]]
        self.mid = {"L": v, "R": v + [100.0, 0, 0]}
        self.faces = {"L": f, "R": f.copy()}


def test_geodesic_pairs_on_a_flat_sheet(rng, tmp_path, monkeypatch):
    "On a plane the geodesic is the straight line; pair and matrix lookups agree; hemispheres never meet."
    monkeypatch.setenv("CYTOCLR_CACHE", str(tmp_path))
    from cytoclr.sampling import GeodesicPairs, resolve_distance
    sref = SheetRef()
    n = 400
    hemi = (rng.random(n) < 0.5).astype(np.int8)
    vertex = rng.integers(0, 41 * 41, n)
    surf = np.where(hemi[:, None] == 0, sref.mid["L"][vertex], sref.mid["R"][vertex])
    s = Samples(section=np.zeros(n, np.int64), rc=np.zeros((n, 2)), xyz=surf.copy(), hemi=hemi, vertex=vertex,
                area=np.ones(n, np.int64), brain=np.array(["b"] * n), depth=np.full(n, 0.5), surface_xyz=surf)
    name, fn = resolve_distance("auto", sref, cutoff_mm=12.0)
    assert name == "geodesic" and isinstance(fn, GeodesicPairs)
    idx = np.arange(60)
    m = pairwise_distances(s, idx, fn)
    ii, jj = np.meshgrid(idx, idx, indexing="ij")
    np.testing.assert_allclose(fn(s, ii.ravel(), jj.ravel()).reshape(60, 60), m, rtol=1e-5)
    e = pairwise_distances(s, idx, "euclidean")
    both = np.isfinite(m) & (e > 0)
    assert both.sum() > 20 and np.median(m[both] / e[both]) < 1.03 and (m[both] >= e[both] * 0.99).all()
    assert np.isinf(m[hemi[idx][:, None] != hemi[idx][None]]).all()
    assert np.isinf(m[np.isfinite(e) & (e > 13)]).all()  # beyond the cutoff: no pair
    shared = resolve_distance(fn.surface)[1]  # a SurfaceDistances is shared, not rebuilt
    assert shared.surface is fn.surface
    smp = NeighbourhoodBatchSampler(s, 64, k=3, radius_mm=4.0, distance=fn.surface, seed=0)
    assert smp.distance_name == "geodesic"
    b = smp.batch(0)
    d = pairwise_distances(s, b, fn)
    seeds = b[:smp.m]
    partner = (d[:smp.m] < 4.0).sum(1) - 1
    brute = (pairwise_distances(s, np.r_[seeds, np.arange(n)], fn)[:smp.m, smp.m:] < 4.0).sum(1) - 1
    assert (partner >= np.minimum(3, brute)).all() and partner.sum() > 0


def test_phantom_section_integration(ref):
    "On a real (coarse) phantom section: samples lie in its cortex, areas come from its ground truth, patches read."
    from cytoclr.phantom import PhantomBrain
    # 128 um pixels and 512 um mask cells (level 2): coarser Nissl pixels need a much larger Poisson table (5 s at 256 um)
    sec = PhantomBrain(0, ref=ref).section(0, y_mm=-18.0, spacing_um=128.0, modality="nissl")
    s = sample_locations([sec], 300, seed=0, ref=ref, level=2)
    r, c = np.rint(s.rc).astype(int).T
    gt = [sec.ground_truth(slice(a, a + 1), slice(b, b + 1)) for a, b in zip(r[:50], c[:50])]
    np.testing.assert_array_equal(s.area[:50], [g["area"][0, 0] for g in gt])
    assert (s.area > 0).mean() > 0.8 and set(s.brain) == {sec.brain}
    p = extract_patch(sec, s.rc[0], 16)
    assert p.shape == (1, 16, 16) and np.isfinite(p).all() and 0 <= p.min() <= p.max() <= 1
    far = extract_patch(sec, (-100.0, -100.0), 8)  # outside the image: empty glass
    assert (far == 1).all()


def test_dataset_batches_equal_items_and_cache(fake_ref):
    secs, s = _small(fake_ref, n=40)
    a = PatchDataset(secs, s, 16, views=2, augment=Augment("nissl"), seed=1)
    b = PatchDataset(secs, s, 16, views=2, augment=Augment("nissl"), seed=1, cache=True, progress=False)
    assert b.crops.dtype == np.float16 and b.crops.shape == (40, 1, a.crop_px, a.crop_px)
    items = torch.stack([a[i]["image"] for i in range(10)])
    batch = torch.stack([d["image"] for d in b.__getitems__(range(10))])
    assert batch.shape == (10, 2, 1, 16, 16)
    np.testing.assert_allclose(batch.numpy(), items.numpy(), atol=2e-3)  # float16 crops
    np.testing.assert_allclose(b.patch(3), a.patch(3), atol=2e-3)
    dl = torch.utils.data.DataLoader(b, batch_sampler=[[0, 1, 2], [3, 4]])
    got = [x["image"].shape for x in dl]  # a DataLoader calls __getitems__ and collates as usual
    assert got == [(3, 2, 1, 16, 16), (2, 2, 1, 16, 16)]


# --- the numbers chapter 3 reports ---------------------------------------------------------------

def test_cortex_area_counts_labelled_triangles_only():
    class Ref:
        hemis = ("L", "R")
        mid = {"L": np.array([[0, 0, 0], [3, 0, 0], [0, 4, 0], [9, 9, 0.0]]), "R": np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0.0]])}
        faces = {"L": np.array([[0, 1, 2], [1, 2, 3]]), "R": np.array([[0, 1, 2]])}
        labels = {"L": np.array([1, 1, 2, 0]), "R": np.array([1, 1, 1])}
    assert cortex_area_mm2(Ref()) == pytest.approx(6.0 + 2.0)  # the face with an unlabelled vertex does not count


def test_uniform_cortex_positives_by_hand():
    u = uniform_cortex_positives(11, sigma_mm=2.0, radius_mm=3.0, area_mm2=100.0)
    assert u["effective"] == pytest.approx(10 * 2 * np.pi * 4 / 100) and u["close"] == pytest.approx(10 * np.pi * 9 / 100)


class _Fixed:
    "A sampler stand-in: the given batches."
    def __init__(self, batches):
        self.batches = [np.asarray(b) for b in batches]

    def __len__(self):
        return len(self.batches)

    def batch(self, t):
        return self.batches[t]


def test_batch_composition_by_hand():
    # four samples on a line at x = 0, 1, 3, 10 mm; sections 0, 1, 0, 1; brains a, a, b, b
    n = 4
    xyz = np.c_[[0.0, 1.0, 3.0, 10.0], np.zeros(n), np.zeros(n)]
    s = Samples(section=np.array([0, 1, 0, 1]), rc=np.zeros((n, 2)), xyz=xyz, hemi=np.zeros(n, np.int8),
                vertex=np.arange(n), area=np.ones(n, np.int64), brain=np.array(["a", "a", "b", "b"]),
                depth=np.full(n, 0.5), surface_xyz=xyz)
    got = batch_composition(s, _Fixed([[0, 1, 2, 3], [0, 3]]), "euclidean", radius_mm=2.5, sigma_mm=1.0, n_batches=5)
    # batch 1: partners closer than 2.5 mm: 0-1, 1-2 -> per sample 1, 2, 1, 0 (mean 1); pairs (ordered) 0-1, 1-0, 1-2,
    # 2-1 all cross sections; 0-1 and 1-0 stay in brain a, 1-2 and 2-1 cross brains (1/2). Batch 2: no partners.
    w = lambda d: np.exp(-d * d / 2)
    eff1 = np.mean([w(1) + w(3) + w(10), w(1) + w(2) + w(9), w(3) + w(2) + w(7), w(10) + w(9) + w(7)])
    eff2 = w(10)
    assert got["n_batches"] == 2 and got["close"] == pytest.approx((1.0 + 0.0) / 2)
    assert got["effective"] == pytest.approx((eff1 + eff2) / 2)
    assert got["other_section"] == 1.0 and got["other_brain"] == 0.5


class _Depths(FakeSection):
    "A section whose ground-truth depth grows by 0.1 per column (0 at column 0)."
    def ground_truth(self, rows, cols):
        r = np.arange(self.shape[0])[rows]
        c = np.arange(self.shape[1])[cols]
        return {"depth": np.broadcast_to(0.1 * c[None, :], (len(r), len(c))).astype(float)}


def test_depth_coverage_by_hand():
    sec = _Depths(np.zeros((1, 40, 40)), spacing_um=1000.0)  # 1 mm per pixel
    n = 2
    s = Samples(section=np.zeros(n, np.int64), rc=np.array([[20.0, 5.0], [20.0, 30.0]]), xyz=np.zeros((n, 3)),
                hemi=np.zeros(n, np.int8), vertex=np.arange(n), area=np.ones(n, np.int64), brain=np.array(["a"] * n),
                depth=np.full(n, 0.5), surface_xyz=np.zeros((n, 3)))
    seen, spans = depth_coverage([sec], s, [3.0, 11.0], 3)
    # 3 mm: columns c-2..c+2 (h = round(1.5) = 2) -> range 0.4; 11 mm: h = round(5.5) = 6 -> columns 0..11 around
    # column 5 (clipped at the image's edge: 0 to 1.1, spans) and 24..36 around column 30 (2.4 to 3.6)
    np.testing.assert_allclose(seen, [[0.4, 1.1], [0.4, 1.2], [0, 0]])
    assert spans.tolist() == [[False, True], [False, False], [False, False]]
    assert span_summary([3.0, 11.0], seen, spans) == {
        "3mm": {"depth_range_seen": pytest.approx(0.8 / 3), "spans": 0.0},
        "11mm": {"depth_range_seen": pytest.approx(2.3 / 3), "spans": pytest.approx(1 / 3)}}


def test_sampling_metrics_by_hand():
    n = 3
    s = Samples(section=np.zeros(n, np.int64), rc=np.zeros((n, 2)), xyz=np.zeros((n, 3)), hemi=np.zeros(n, np.int8),
                vertex=np.arange(n), area=np.ones(n, np.int64), brain=np.array(["a"] * n), depth=np.full(n, 0.5),
                surface_xyz=np.zeros((n, 3)))
    rows = [dict(batch=8, batches="uniform", effective=0.5, close=1.0, other_section=0.25, other_brain=0.0, n_batches=2)]
    m = sampling_metrics(s, 1.5, "geodesic", 100.0, {"4mm": {}}, rows, {"crop_ms": 2.0})["sampling"]
    assert m == {"n_locations": 3, "sample_seconds": 1.5, "distance": "geodesic", "cortex_area_mm2": 100.0,
                 "spans_cortex": {"4mm": {}}, "speed": {"crop_ms": 2.0},
                 "positives": {"uniform_8": {"effective": 0.5, "close": 1.0, "other_section": 0.25, "other_brain": 0.0}}}
