"Geodesic tables, batch lookup and spatial weights, against closed forms and independent exact solvers."
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial.distance import cdist

from cytoclr import geodesic as G
from cytoclr.geodesic import (SurfaceDistances, check_surface, effective_positives, geodesic_metrics, geodesic_table,
                              geodesic_weights,
                              positives_by_sigma, restrict_table, straight_line, straight_over_geodesic, surface_graph,
                              table_errors, table_submatrix, vertex_areas)
from cytoclr.core import DataError
from cytoclr.reference import ReferenceBrain


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    "Every test gets its own empty geodesic cache."
    monkeypatch.setenv("CYTOCLR_CACHE", str(tmp_path / "cache"))


def grid(n=21, spacing=1.0, jitter=0.0, rng=None, z=0.0):
    "A triangulated n x n grid in the plane z = const: vertices (n*n, 3), faces (2 (n-1)^2, 3)."
    x, y = np.meshgrid(np.arange(n) * spacing, np.arange(n) * spacing, indexing="ij")
    v = np.stack([x.ravel(), y.ravel(), np.full(n * n, z)], 1)
    if jitter:
        v[:, :2] += rng.uniform(-jitter, jitter, (n * n, 2)) * spacing
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel()
    return v, np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])


def icosphere(level, radius):
    t = (1 + 5 ** 0.5) / 2
    v = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t],
                  [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], float)
    f = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
                  [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5],
                  [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    for _ in range(level):
        e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), 1)
        ue, inv = np.unique(e, axis=0, return_inverse=True)
        mid = len(v) + inv.reshape(3, -1).T
        v = np.concatenate([v, (v[ue[:, 0]] + v[ue[:, 1]]) / 2])
        a, b, c = f.T
        f = np.concatenate([np.stack([a, mid[:, 0], mid[:, 2]], 1), np.stack([b, mid[:, 1], mid[:, 0]], 1),
                            np.stack([c, mid[:, 2], mid[:, 1]], 1), mid])
    return radius * v / np.linalg.norm(v, axis=1, keepdims=True), f


def crop(vertices, faces, centre, radius):
    "The part of a mesh within `radius` (straight line) of vertex `centre`, re-indexed."
    keep = np.linalg.norm(vertices - vertices[centre], axis=1) < radius
    f = faces[keep[faces].all(1)]
    used = np.unique(f)
    new = np.full(len(vertices), -1)
    new[used] = np.arange(len(used))
    return np.ascontiguousarray(vertices[used]), new[f], new


def table_dense(t):
    "Dense distances with inf where absent and explicit zeros kept."
    d = np.full(t.shape, np.inf)
    c = t.tocoo()
    d[c.row, c.col] = c.data
    return d


def check_contract(t, n, cutoff):
    assert isinstance(t, sp.csr_matrix) and t.shape == (n, n) and t.dtype == np.float32
    assert (t != t.T).nnz == 0  # exactly symmetric
    assert np.all(t.diagonal() == 0) and t.nnz >= n  # diagonal stored as explicit zeros
    off = t.tocoo()
    assert np.all(off.data[off.row != off.col] > 0) and t.data.max() < cutoff


# ---------------------------------------------------------------- closed forms

def test_plane_table_is_euclidean(rng):
    v, f = grid(25, 1.0, jitter=0.2, rng=rng)
    cutoff = 8.0
    t = geodesic_table(v, f, cutoff, progress=False)
    check_contract(t, len(v), cutoff)
    exact = cdist(v, v)
    d = table_dense(t)
    pairs = (exact > 0) & (exact < cutoff) & np.isfinite(d)
    rel = np.abs(d[pairs] / exact[pairs] - 1)
    assert np.median(rel) < 0.01 and np.percentile(rel, 95) < 0.03
    assert not np.any((exact < 0.9 * cutoff) & ~np.isfinite(d))  # nothing close is missing
    assert np.all(d[np.isfinite(d)] >= exact[np.isfinite(d)] - 1e-4)  # on a plane nothing is shorter than a line


def test_table_equals_full_graph_dijkstra(rng):
    "The spatial chunking (sub-graphs in padded boxes) changes nothing: same pairs, same distances."
    v, f = grid(30, 1.0, jitter=0.2, rng=rng)
    v[:, 2] = 3 * np.sin(v[:, 0] / 2.5) * np.cos(v[:, 1] / 3.0)  # a folded sheet
    cutoff = 7.0
    t = geodesic_table(v, f, cutoff, chunk=16, cache=False, progress=False)
    full = G.geodesic_rows(surface_graph(v, f), np.arange(len(v)), cutoff)  # (n, n) plain scipy, whole graph
    full[full >= cutoff] = np.inf
    d = table_dense(t)
    assert np.array_equal(np.isfinite(d), np.isfinite(full))
    fin = np.isfinite(full)
    assert np.allclose(d[fin], full[fin], rtol=1e-6, atol=1e-5)


def test_table_does_not_depend_on_the_number_of_workers(rng):
    v, f = grid(30, 1.0, jitter=0.2, rng=rng)
    a = geodesic_table(v, f, 6.0, chunk=32, cache=False, progress=False, workers=1)
    b = geodesic_table(v, f, 6.0, chunk=32, cache=False, progress=False, workers=2)  # forked processes
    assert (a != b).nnz == 0 and np.array_equal(a.indices, b.indices)


def test_morton_order_is_a_spatially_coherent_permutation(rng):
    v = rng.uniform(0, 100, (5000, 3))
    o = G.morton_order(v)
    assert np.array_equal(np.sort(o), np.arange(len(v)))
    step = np.linalg.norm(np.diff(v[o], axis=0), axis=1)
    assert np.median(step) < 0.5 * np.median(np.linalg.norm(np.diff(v, axis=0), axis=1))  # neighbours in order are near


def test_field_reaches_beyond_the_table_cutoff(two_planes):
    dist = SurfaceDistances(two_planes, 3.0, progress=False)
    f = dist.field("L", [0], 20.0)  # (1, n)
    v = two_planes.mid["L"]
    straight = np.linalg.norm(v - v[0], axis=1)
    assert f.shape == (1, len(v)) and np.isfinite(f).sum() > (straight < 3.0).sum()
    fin = np.isfinite(f[0])
    assert np.all(f[0, fin] >= straight[fin] - 1e-9) and np.all(f[0, fin] < 20.0)
    with pytest.raises(DataError, match="limit_mm"):
        dist.field("L", [0], -1.0)


@pytest.mark.parametrize("rings, ok", [(1, False), (3, True)])
def test_sphere_matches_great_circles(rings, ok):
    R = 50.0
    v, f = icosphere(5, R)  # 10,242 vertices, edges about 1.7 mm as on the HCP mesh
    cutoff = 20.0
    t = geodesic_table(v, f, cutoff, rings=rings, progress=False)
    rows = np.arange(0, len(v), 97)
    exact = R * np.arccos(np.clip(v[rows] @ v.T / R**2, -1, 1))  # (k, n) great circles
    d = table_dense(t[rows])
    pairs = (exact > 1e-9) & (exact < cutoff) & np.isfinite(d)
    rel = np.abs(d[pairs] / exact[pairs] - 1)
    meets = np.median(rel) <= 0.02 and np.percentile(rel, 95) <= 0.05
    assert meets == ok, (np.median(rel), np.percentile(rel, 95))  # plain Dijkstra fails the criteria, ours meets them
    if ok:
        assert not np.any((exact < 0.9 * cutoff) & ~np.isfinite(d))


def test_arc_length_is_exact_on_a_circle():
    th = np.linspace(0, np.pi, 7)
    v = np.stack([np.cos(th), np.sin(th), np.zeros(7)], 1) * 10.0
    normals = v / 10.0
    i, j = np.zeros(6, int), np.arange(1, 7)
    assert np.allclose(G.arc_lengths(v, normals, i, j), 10.0 * th[1:])
    flat = np.tile([0, 0, 1.0], (7, 1))
    assert np.allclose(G.arc_lengths(v, flat, i, j), np.linalg.norm(v[j] - v[i], axis=1))  # flat: the chord


# ---------------------------------------------------------------- the real surface vs exact solvers

@pytest.fixture(scope="module")
def hcp_patch():
    "A 45 mm patch of the real HCP left mid-thickness surface, around a vertex near the central sulcus."
    from cytoclr.reference import load_hcp_s1200
    ref = load_hcp_s1200()
    V, F = ref.mid["L"], ref.faces["L"]
    c = int(np.argmin(np.linalg.norm(V - np.array([-38.0, -22.0, 55.0]), axis=1)))
    v, f, new = crop(V, F, c, 45.0)
    return v, f, int(new[c]), geodesic_table(v, f, 30.0, cache=False, progress=False)


def test_real_surface_against_exact_geodesics(hcp_patch, rng):
    pygeodesic = pytest.importorskip("pygeodesic.geodesic")
    v, f, centre, t = hcp_patch
    cutoff = 30.0
    check_contract(t, len(v), cutoff)
    algo = pygeodesic.PyGeodesicAlgorithmExact(v, f.astype(np.int32))
    near = np.flatnonzero(np.linalg.norm(v - v[centre], axis=1) < 8)
    sources = np.r_[centre, rng.choice(near, 2, replace=False)]
    targets = np.arange(len(v), dtype=np.int32)
    exact = np.stack([algo.geodesicDistances(np.array([s], np.int32), targets, 1.05 * cutoff)[0] for s in sources])
    ours = table_dense(t[sources])
    plain = G.geodesic_rows(surface_graph(v, f, rings=1), sources, 2 * cutoff)
    pairs = (exact > 0) & (exact < cutoff)
    assert pairs.sum() > 3000
    assert not np.any((exact < 0.9 * cutoff) & ~np.isfinite(ours))  # no close pair missing
    both = pairs & np.isfinite(ours)
    rel = np.abs(ours[both] / exact[both] - 1)
    assert np.median(rel) <= 0.02 and np.percentile(rel, 95) <= 0.05, (np.median(rel), np.percentile(rel, 95))
    rel_plain = np.abs(plain[pairs] / exact[pairs] - 1)
    assert np.median(rel_plain) > 0.04  # the baseline really is worse: the criteria are not trivially met


def test_real_surface_against_edge_flip_paths(hcp_patch, rng):
    "A second, independent exact reference (potpourri3d's edge-flip geodesics) on random table pairs."
    pp3d = pytest.importorskip("potpourri3d")
    v, f, _, t = hcp_patch
    t = t.tocoo()
    off = np.flatnonzero(t.row < t.col)
    pick = rng.choice(off, 400, replace=False)
    solver = pp3d.EdgeFlipGeodesicSolver(v, f)
    exact = np.array([np.linalg.norm(np.diff(solver.find_geodesic_path(int(a), int(b)), axis=0), axis=1).sum()
                      for a, b in zip(t.row[pick], t.col[pick])])
    rel = np.abs(t.data[pick] / exact - 1)
    assert np.median(rel) <= 0.02 and np.percentile(rel, 95) <= 0.05


# ---------------------------------------------------------------- cache

def test_cache_is_reused_restricted_and_keyed_by_mesh(rng, tmp_path, monkeypatch):
    v, f = grid(15, 1.0, jitter=0.2, rng=rng)
    t1 = geodesic_table(v, f, 6.0, progress=False)
    files = list((tmp_path / "cache" / "geodesic").glob("*.npz"))
    assert len(files) == 1 and not list((tmp_path / "cache" / "geodesic").glob(".tmp-*"))

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")
    monkeypatch.setattr(G, "table_from_graph", boom)
    t2 = geodesic_table(v, f, 6.0, progress=False)
    assert (t1 != t2).nnz == 0 and np.array_equal(t1.indptr, t2.indptr)
    t3 = geodesic_table(v, f, 3.0, progress=False)  # served from the 6 mm table
    monkeypatch.undo()
    monkeypatch.setenv("CYTOCLR_CACHE", str(tmp_path / "cache"))
    direct = geodesic_table(v, f, 3.0, cache=False, progress=False)
    assert np.array_equal(t3.indptr, direct.indptr) and np.array_equal(t3.indices, direct.indices)
    assert np.allclose(t3.data, direct.data, atol=1e-6)
    v2 = v.copy()
    v2[0, 2] += 0.5  # another mesh: another key
    geodesic_table(v2, f, 6.0, progress=False)
    assert len(list((tmp_path / "cache" / "geodesic").glob("*.npz"))) == 2
    geodesic_table(v, f, 9.0, cache=False, progress=False)
    assert len(list((tmp_path / "cache" / "geodesic").glob("*.npz"))) == 2  # cache=False writes nothing


def test_damaged_cache_is_recomputed(rng, tmp_path):
    v, f = grid(10, 1.0)
    t1 = geodesic_table(v, f, 4.0, progress=False)
    (p,) = (tmp_path / "cache" / "geodesic").glob("*.npz")
    p.write_bytes(b"not a table")
    with pytest.warns(UserWarning, match="unreadable"):
        t2 = geodesic_table(v, f, 4.0, progress=False)
    assert (t1 != t2).nnz == 0


def test_restrict_table_keeps_zero_diagonal():
    rows, cols = np.array([0, 0, 0, 1, 1, 2, 2]), np.array([0, 1, 2, 0, 1, 0, 2])
    t = sp.csr_matrix((np.array([0, 2, 5, 2, 0, 5, 0], np.float32), (rows, cols)), shape=(3, 3))
    r = restrict_table(t, 3.0)
    assert r.nnz == 5 and np.all(r.diagonal() == 0) and r[0, 1] == 2
    assert set(r[0].indices) == {0, 1} and set(r[2].indices) == {2}  # 5 mm dropped, zero diagonal stored


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("mutate, field", [
    (lambda v, f: (v, f + 1), "faces"),  # one past the last vertex
    (lambda v, f: (v, np.where(f == 0, -1, f)), "faces"),
    (lambda v, f: (np.where(np.arange(len(v))[:, None] == 3, np.nan, v), f), "vertices"),
    (lambda v, f: (v[:, :2], f), "vertices"),
    (lambda v, f: (v, f.astype(float)), "faces"),
    (lambda v, f: (v, f[:0]), "faces"),
])
def test_bad_meshes_are_refused(mutate, field):
    v, f = grid(6)
    bad_v, bad_f = mutate(v, f)
    with pytest.raises(DataError) as e:
        geodesic_table(bad_v, bad_f, 5.0, progress=False)
    assert e.value.field == field


@pytest.mark.parametrize("cutoff", [0, -1.0, float("nan"), float("inf"), "far"])
def test_bad_cutoff_is_refused(cutoff):
    v, f = grid(6)
    with pytest.raises(DataError, match="cutoff_mm"):
        geodesic_table(v, f, cutoff, progress=False)


@pytest.mark.parametrize("rings", [0, 2.5, "3", True])
def test_bad_rings_is_refused(rings):
    v, f = grid(6)
    with pytest.raises(DataError, match="rings"):
        surface_graph(v, f, rings=rings)
    with pytest.raises(DataError, match="rings"):
        geodesic_table(v, f, 3.0, rings=rings, progress=False)


# ---------------------------------------------------------------- weights

def _slow_weights(d, sigma, kind):
    out = np.zeros_like(d, dtype=float)
    for i in range(d.shape[0]):
        for j in range(d.shape[1]):
            x = d[i, j]
            if np.isfinite(x):
                out[i, j] = np.exp(-x * x / (2 * sigma * sigma)) if kind == "gaussian" else float(x < sigma)
    return out


@pytest.mark.parametrize("kind", ["gaussian", "threshold"])
@pytest.mark.parametrize("sigma", [0.5, 5.0])
def test_weights_match_formula_numpy_and_torch(rng, kind, sigma):
    d = rng.uniform(0, 15, (7, 7))
    d = (d + d.T) / 2
    d[rng.random((7, 7)) < 0.2] = np.inf
    d[0, 1] = sigma  # the threshold is strict
    np.fill_diagonal(d, 0)
    ref = _slow_weights(d, sigma, kind)
    w = geodesic_weights(d, sigma, kind)
    assert isinstance(w, np.ndarray) and w.dtype == np.float64 and np.allclose(w, ref)
    w32 = geodesic_weights(d.astype(np.float32), sigma, kind)
    assert w32.dtype == np.float32 and np.allclose(w32, ref, atol=1e-6)
    wt = geodesic_weights(torch.tensor(d, dtype=torch.float32), sigma, kind)
    assert isinstance(wt, torch.Tensor) and wt.dtype == torch.float32 and wt.device.type == "cpu"
    assert np.allclose(wt.numpy(), ref, atol=1e-6)
    assert np.all(w[~np.isfinite(d)] == 0) and w[0, 1] == (np.exp(-0.5) if kind == "gaussian" else 0.0)


@pytest.mark.parametrize("d, sigma, kind, match", [
    (np.array([1.0, np.nan]), 1.0, "gaussian", "NaN"),
    (np.array([1.0, -2.0]), 1.0, "gaussian", "negative"),
    (torch.tensor([1.0, float("nan")]), 1.0, "threshold", "NaN"),
    (np.array([1.0]), 0.0, "gaussian", "sigma_mm"),
    (np.array([1.0]), -3.0, "gaussian", "sigma_mm"),
    (torch.tensor([1.0]), float("nan"), "gaussian", "sigma_mm"),
    (np.array([1.0]), 1.0, "cosine", "kind"),
])
def test_bad_weight_input_is_refused(d, sigma, kind, match):
    with pytest.raises(DataError, match=match):
        geodesic_weights(d, sigma, kind)


def test_effective_positives_excludes_the_diagonal(rng):
    w = rng.random((5, 5))
    expect = np.array([sum(w[i, j] for j in range(5) if j != i) for i in range(5)])
    assert np.allclose(effective_positives(w), expect)
    assert np.allclose(effective_positives(torch.tensor(w)).numpy(), expect)


def test_one_table_per_process(two_planes):
    "Every SurfaceDistances of a process (the batch sampler's, the loss's) shares one copy of a table."
    a, b = SurfaceDistances(two_planes, 3.0, progress=False), SurfaceDistances(two_planes, 3.0, progress=False)
    assert a.table(0) is b.table(0)


# ---------------------------------------------------------------- batches on a reference

@pytest.fixture
def two_planes():
    "A toy reference: two flat 'hemispheres' 2 mm apart (close in space, no path between them)."
    vl, f = grid(12, 1.0)
    vr = vl.copy()
    vl[:, 0] -= 13.0  # x in [-13, -2]
    vr[:, 0] += 0.0  # x in [0, 11]
    up = np.array([0, 0, 1.0])
    mk = lambda v, s: {"L": v[0] + s * up, "R": v[1] + s * up}
    n = len(vl)
    return ReferenceBrain(name="planes", white=mk((vl, vr), -1), pial=mk((vl, vr), 1), mid=mk((vl, vr), 0),
                          faces={"L": f.copy(), "R": f.copy()}, labels={"L": np.ones(n, np.int64), "R": np.full(n, 2)},
                          area_names=["???", "L_a", "R_a"])


def test_batch_lookup_matches_pairwise_reads(two_planes, rng):
    ref = two_planes
    cutoff = 5.0
    dist = SurfaceDistances(ref, cutoff, progress=False)
    n = 60
    hemi = rng.integers(0, 2, n)
    vert = rng.integers(0, 144, n)
    vert[5], hemi[5] = vert[4], hemi[4]  # a repeated vertex
    D = dist.geodesic(hemi, vert)
    assert D.shape == (n, n) and D.dtype == np.float32
    tabs = {h: table_dense(dist.table(h)) for h in ref.hemis}
    for i in range(n):
        for j in range(n):
            if hemi[i] != hemi[j]:
                expect = np.inf  # no path across hemispheres, although the planes are 2 mm apart
            else:
                expect = tabs[ref.hemis[hemi[i]]][vert[i], vert[j]]
            assert D[i, j] == np.float32(expect), (i, j)
    assert np.all(np.diag(D) == 0) and D[4, 5] == 0
    assert np.isfinite(D).sum() > n + 20  # the check saw finite off-diagonal pairs
    # names work as well as indices
    assert np.array_equal(dist.geodesic(np.array(ref.hemis)[hemi], vert), D)
    # straight line: same points, same rules
    E = dist.straight_line(hemi, vert)
    xyz = np.stack([ref.mid[ref.hemis[h]][v] for h, v in zip(hemi, vert)])
    e = cdist(xyz, xyz)
    e[(hemi[:, None] != hemi[None]) | (e >= cutoff)] = np.inf
    assert np.allclose(E, e) and np.array_equal(np.isfinite(E), np.isfinite(e))
    assert np.array_equal(dist.matrix(hemi, vert, "euclidean"), E)
    # on a plane the geodesic is never shorter than the straight line
    fin = np.isfinite(D) & np.isfinite(E)
    assert np.all(D[fin] >= E[fin] - 1e-4)


@pytest.mark.parametrize("kind", ["gaussian", "threshold"])
@pytest.mark.parametrize("metric", ["geodesic", "euclidean"])
def test_batch_weights_equal_weights_of_distances(two_planes, rng, kind, metric):
    dist = SurfaceDistances(two_planes, 5.0, progress=False)
    hemi = np.r_[rng.integers(0, 2, 40), 0, 0, -1]
    vert = np.r_[rng.integers(0, 144, 40), 7, 7, -1]  # a vertex twice and a far sample
    w = dist.weights(hemi, vert, 2.0, kind, metric=metric, allow_far=True, dtype=torch.float64)
    expect = geodesic_weights(dist.matrix(hemi, vert, metric, allow_far=True).astype(np.float64), 2.0, kind)
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float64
    assert np.allclose(w.numpy(), expect) and w[40, 41] == 1.0 and effective_positives(w)[42] == 0
    assert (w.numpy()[~np.eye(43, dtype=bool)] > 0).sum() > 10  # not trivially all zero


def test_far_samples_are_refused_or_flagged(two_planes):
    dist = SurfaceDistances(two_planes, 5.0, progress=False)
    hemi, vert = np.array([0, 0, -1]), np.array([3, 4, -1])
    with pytest.raises(DataError, match="far from the cortex"):
        dist.geodesic(hemi, vert)
    D = dist.geodesic(hemi, vert, allow_far=True)
    assert np.all(np.isinf(D[2, :2])) and np.all(np.isinf(D[:2, 2])) and np.isfinite(D[0, 1])
    w = geodesic_weights(D, 2.0)
    assert effective_positives(w)[2] == 0  # a far sample has no positives, it is not silently close
    with pytest.raises(DataError, match="exceed"):
        dist.geodesic(np.array([0, 1]), np.array([0, 144]))
    with pytest.raises(DataError, match="unknown hemispheres"):
        dist.geodesic(np.array(["L", "X"]), np.array([0, 1]))
    with pytest.raises(DataError, match="kind"):
        dist.matrix(hemi[:2], vert[:2], kind="manhattan")


def test_from_xyz_locates_points(two_planes):
    ref = two_planes
    dist = SurfaceDistances(ref, 5.0, progress=False)
    xyz = np.stack([ref.mid["L"][10], ref.mid["L"][11], ref.mid["R"][10]]) + [0, 0, 0.3]
    D, loc = dist.from_xyz(xyz)
    assert list(loc.vertex) == [10, 11, 10] and list(loc.hemi) == [0, 0, 1]
    assert np.isclose(D[0, 1], 1.0, atol=1e-6) and np.isinf(D[0, 2])
    with pytest.raises(DataError, match="far from the cortex"):
        dist.from_xyz(np.array([[500.0, 0, 0], [0, 0, 0]]))


def test_table_submatrix_handles_duplicates_and_absent_pairs():
    t = sp.csr_matrix((np.array([0, 1.5, 1.5, 0, 0], np.float32), (np.array([0, 0, 1, 1, 2]), np.array([0, 1, 0, 1, 2]))),
                      shape=(3, 3))
    d = table_submatrix(t, np.array([1, 0, 2, 1]))
    expect = np.array([[0, 1.5, np.inf, 0], [1.5, 0, np.inf, 1.5], [np.inf, np.inf, 0, np.inf], [0, 1.5, np.inf, 0]])
    assert np.array_equal(d, expect.astype(np.float32))


def test_check_surface_returns_clean_arrays():
    v, f = grid(4)
    cv, cf = check_surface(v.astype(np.float32), f.astype(np.int32))
    assert cv.dtype == np.float64 and cf.dtype == np.int64 and cv.flags.c_contiguous


# ---------------------------------------------------------------- the numbers chapter 4 reports
def test_straight_line_against_the_formula(rng):
    a, b = rng.normal(size=(7, 3)), rng.normal(size=(5, 3))
    ha, hb = rng.integers(0, 2, 7), rng.integers(0, 2, 5)
    slow = np.array([[np.sqrt(((a[i] - b[j]) ** 2).sum()) if ha[i] == hb[j] else np.inf for j in range(5)] for i in range(7)])
    np.testing.assert_allclose(straight_line(a, b, ha, hb), slow)
    np.testing.assert_allclose(straight_line(torch.tensor(a), torch.tensor(b), ha, hb).numpy(), slow)
    np.testing.assert_allclose(straight_line(a[:5], b, ha[:5], hb, pairs=True), np.diag(slow[:5]))


def test_table_errors_by_hand():
    exact = np.array([1.0, 2.0, 4.0, 9.0, 12.0])
    ours = np.array([1.1, 2.0, np.inf, 9.9, np.inf])  # the 4 mm pair is missing; 12 mm lies beyond the cutoff
    plain = np.array([1.2, 3.0, 5.0, 9.0, 12.0])
    err, missing = table_errors(exact, {"plain": plain, "ours": ours}, cutoff_mm=10.0)
    assert missing == 1  # only 4 mm: 12 mm is beyond 0.9 x cutoff
    np.testing.assert_allclose(err["ours"], [0.1, 0.0, 0.1])  # pairs 1, 2 and 9 mm
    np.testing.assert_allclose(err["plain"], [0.2, 0.5, 0.0])


def test_straight_over_geodesic_by_hand():
    g = np.array([[4.0, 5.0, 20.0], [40.0, 41.0, 10.0]])
    s = np.array([[4.0, 4.0, 10.0], [36.0, 1.0, 10.0]])
    np.testing.assert_allclose(straight_over_geodesic(g, s, 5, 40), [0.8, 0.5, 0.9, 1.0])


def test_vertex_areas_and_positives_by_sigma_by_hand():
    class Ref:
        hemis = ("L", "R")
        mid = {"L": np.array([[0, 0, 0], [3, 0, 0], [0, 4, 0.0]]), "R": np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0.0]])}
        faces = {"L": np.array([[0, 1, 2]]), "R": np.array([[0, 1, 2]])}
        labels = {"L": np.array([1, 1, 0]), "R": np.array([2, 2, 2])}
    p = vertex_areas(Ref())
    # a third of each face per vertex: L 2, 2, (0: no area); R 1/6 each; normalised by 4.5
    np.testing.assert_allclose(p, np.array([2, 2, 0, 1 / 6, 1 / 6, 1 / 6]) / 4.5)
    d = np.array([[0, 1.0, np.inf], [1.0, 0, 2.0], [np.inf, 2.0, 0]])
    got = positives_by_sigma(d, [1.0, 2.0])
    e1, e2 = np.exp(-0.5), np.exp(-2.0)  # sigma 1: d = 1 -> exp(-1/2), d = 2 -> exp(-2)
    assert got[0] == pytest.approx((e1 + (e1 + e2) + e2) / 3)
    assert got[1] == pytest.approx((np.exp(-1 / 8) * 2 + np.exp(-0.5) * 2) / 3)
    assert positives_by_sigma(d, [1.5], "threshold") == [pytest.approx(2 / 3)]


def test_geodesic_metrics_by_hand():
    t = sp.csr_matrix(np.array([[0, 1.0, 0], [1.0, 0, 2.0], [0, 2.0, 0]]))  # 4 pairs on 3 vertices
    err = {"plain Dijkstra": np.array([0.1, 0.3]), "heat method": np.array([0.2]), "ours": np.array([0.0, 0.01, 0.02])}
    m = geodesic_metrics(30.0, 3, {"L": 1.5, "R": 2.0}, err, 0, {"L": t, "R": t}, np.array([0.8, 1.0]), {"b": 1})["geodesic"]
    assert m["cutoff_mm"] == 30.0 and m["rings"] == 3 and m["table_seconds"] == 3.5
    assert m["median_rel_error"] == 0.01 and m["p95_rel_error"] == pytest.approx(0.019)
    assert m["plain_dijkstra_median_rel_error"] == pytest.approx(0.2) and m["heat_method_median_rel_error"] == 0.2
    assert m["missing_within_0.9_cutoff"] == 0 and m["pairs_per_vertex"] == pytest.approx(4 / 3)
    assert m["straight_over_geodesic_5_40mm_mean"] == pytest.approx(0.9) and m["effective_positives"] == {"b": 1}
