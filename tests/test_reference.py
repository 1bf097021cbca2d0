import numpy as np
import nibabel as nib
import pytest

from cytoclr.core import DataError
from cytoclr.reference import (check_mesh, load_gifti_reference, load_reference,
                               plane_contours, read_gifti_surface)


def test_embedded_reference_counts(ref):
    s = ref.summary()
    for h in "LR":
        assert s[h]["vertices"] == 32492
        assert s[h]["areas"] == 180
        assert 2.0 < s[h]["median_thickness_mm"] < 3.5
    assert len(ref.area_names) == 361 and ref.area_names[0] == "???"
    assert ref.area_names[1] == "L_V1" and ref.area_names[181] == "R_V1"
    # left areas are 1..180, right 181..360, medial wall 0
    assert ref.labels["L"].max() == 180 and ref.labels["R"].min() == 0 and ref.labels["R"][ref.labels["R"] > 0].min() == 181
    assert 0.05 < (ref.labels["L"] == 0).mean() < 0.15  # the medial wall


def test_reference_arrays_are_read_only(ref):
    with pytest.raises(ValueError):
        ref.mid["L"][0, 0] = 1.0


def _slow_locate(ref, p):
    "Brute force over every column of both hemispheres, straight from the definition."
    a = np.concatenate([ref.pial[h] for h in ref.hemis])
    b = np.concatenate([ref.white[h] for h in ref.hemis])
    ab = b - a
    out = []
    for x in p:
        t = ((x - a) * ab).sum(1) / (ab * ab).sum(1)
        foot = a + np.clip(t, 0, 1)[:, None] * ab
        d = np.linalg.norm(x - foot, axis=1)
        g = d.argmin()
        out.append((g, np.clip(t[g], 0, 1), d[g]))
    return out


def test_locate_matches_brute_force(ref, rng):
    hemi = rng.integers(0, 2, 60)
    v = rng.integers(0, 32492, 60)
    depth = rng.uniform(0, 1, 60)
    H = np.array(ref.hemis)[hemi]
    p = np.array([ref.pial[h][i] + d * (ref.white[h][i] - ref.pial[h][i]) for h, i, d in zip(H, v, depth)])
    p += rng.normal(0, 0.3, p.shape)
    loc = ref.locate(p)
    slow = _slow_locate(ref, p)
    offset = np.array([0, 32492])
    g_fast = offset[loc.hemi] + loc.vertex
    d_slow = np.array([s[2] for s in slow])
    # the KD-tree candidates find the same column or an equally close one
    assert np.allclose(loc.distance_mm, d_slow, atol=1e-6) or (np.abs(loc.distance_mm - d_slow) < 1e-6).mean() > 0.95
    agree = g_fast == np.array([s[0] for s in slow])
    assert agree.mean() > 0.95
    assert np.allclose(loc.depth[agree], np.array([s[1] for s in slow])[agree])


def test_depth_along_columns(ref, rng):
    v = rng.choice(np.flatnonzero(ref.labels["L"] > 0), 500, replace=False)
    for d in (0.05, 0.5, 0.95):
        p = ref.pial["L"][v] + d * (ref.white["L"][v] - ref.pial["L"][v])
        loc = ref.locate(p)
        assert loc.inside.mean() > 0.97
        assert np.median(np.abs(loc.depth - d)) < 0.03
        assert (loc.hemi == 0).all()


def test_medial_wall_and_far_points_are_not_cortex(ref):
    wall = np.flatnonzero(ref.labels["R"] == 0)[:200]
    loc = ref.locate(ref.mid["R"][wall])
    assert not loc.inside.any() and (loc.area == 0).all()
    far = np.array([[0.0, 0.0, 200.0], [np.nan, 0, 0], [np.inf, 1, 1]])
    lf = ref.locate(far)
    assert lf.far.all() and not lf.inside.any() and np.isnan(lf.depth).all() and (lf.vertex == -1).all()


def test_locate_chunking_is_consistent(ref, rng):
    p = rng.uniform([-60, -90, -30], [60, 60, 70], size=(3000, 3))
    a, b = ref.locate(p), ref.locate(p, chunk=777)
    for f in ("hemi", "vertex", "area", "inside"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert ref.locate(np.zeros((0, 3))).inside.shape == (0,)
    with pytest.raises(DataError, match=r"\(n, 3\)") as e:
        ref.locate(np.zeros((4, 2)))
    assert type(e.value) is DataError and e.value.field == "xyz"
    with pytest.raises(DataError, match=r"\(n, 3\)"):
        ref.white_matter(np.zeros(3))


def test_plane_contours_on_a_tetrahedron():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    f = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    seg = plane_contours(v, f, axis=2, value=0.5)
    assert seg.shape == (3, 2, 3)
    assert np.allclose(seg[..., 2], 0.5)


# --- GIfTI references -------------------------------------------------------------------------

def _write_surf(path, v, f):
    img = nib.gifti.GiftiImage(darrays=[
        nib.gifti.GiftiDataArray(np.asarray(v, np.float32), intent="NIFTI_INTENT_POINTSET"),
        nib.gifti.GiftiDataArray(np.asarray(f, np.int32), intent="NIFTI_INTENT_TRIANGLE")])
    nib.save(img, str(path))


def _write_labels(path, lab, names):
    table = nib.gifti.GiftiLabelTable()
    for k, n in names.items():
        lbl = nib.gifti.GiftiLabel(key=k)
        lbl.label = n
        table.labels.append(lbl)
    img = nib.gifti.GiftiImage(labeltable=table, darrays=[nib.gifti.GiftiDataArray(np.asarray(lab, np.int32), intent="NIFTI_INTENT_LABEL")])
    nib.save(img, str(path))


@pytest.fixture
def sphere_files(tmp_path):
    "A small closed 'cortex': two concentric icosahedra (white inside pial), labelled by hemisphere of z."
    t = (1 + 5 ** 0.5) / 2
    v = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t],
                  [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], float)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    f = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6],
                  [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10],
                  [8, 6, 7], [9, 8, 1]])
    _write_surf(tmp_path / "white.surf.gii", 40 * v, f)
    _write_surf(tmp_path / "pial.surf.gii", 43 * v, f)
    lab = (v[:, 2] > 0).astype(int) + 1
    _write_labels(tmp_path / "areas.label.gii", lab, {0: "???", 1: "south", 2: "north"})
    return tmp_path, v, f


def test_gifti_reference_round_trip(sphere_files):
    root, v, f = sphere_files
    ref = load_reference({"name": "ball", "hemispheres": {"L": {"white": "white.surf.gii", "pial": "pial.surf.gii",
                                                                 "labels": "areas.label.gii"}}}, root=root)
    assert ref.name == "ball" and ref.n_vertices == {"L": 12}
    assert set(ref.area_names) == {"???", "L_south", "L_north"}
    loc = ref.locate(41.5 * v)
    assert loc.inside.all() and np.allclose(loc.depth, 0.5)
    assert np.allclose(ref.mid["L"], 41.5 * v, atol=1e-4)


def test_gifti_reference_errors_name_the_file(sphere_files):
    root, v, f = sphere_files
    _write_surf(root / "short.surf.gii", 43 * v[:10], [[0, 1, 2]])
    with pytest.raises(DataError, match="short.surf.gii.*vertex-corresponding"):
        load_gifti_reference("x", {"L": {"white": "white.surf.gii", "pial": "short.surf.gii"}}, root=root)
    bad = 43 * v
    bad[3] = np.nan
    _write_surf(root / "nan.surf.gii", bad, f)
    with pytest.raises(DataError, match="nan.surf.gii.*non-finite"):
        read_gifti_surface(root / "nan.surf.gii")
    _write_surf(root / "faces.surf.gii", 43 * v, np.where(f == 11, 12, f))
    with pytest.raises(DataError, match="faces.surf.gii.*faces index vertices outside"):
        read_gifti_surface(root / "faces.surf.gii")
    _write_labels(root / "few.label.gii", np.ones(5), {1: "a"})
    with pytest.raises(DataError, match="few.label.gii.*one label per vertex"):
        load_gifti_reference("x", {"L": {"white": "white.surf.gii", "pial": "pial.surf.gii", "labels": "few.label.gii"}}, root=root)
    with pytest.raises(DataError, match="missing.surf.gii: file not found"):
        read_gifti_surface(root / "missing.surf.gii")
    (root / "corrupt.surf.gii").write_text("<not gifti")
    with pytest.raises(DataError, match="corrupt.surf.gii.*not a readable GIfTI"):
        read_gifti_surface(root / "corrupt.surf.gii")
    with pytest.raises(DataError, match="missing required field 'pial'"):
        load_gifti_reference("x", {"L": {"white": "white.surf.gii"}}, root=root)
    with pytest.raises(DataError, match="unknown embedded reference"):
        load_reference({"name": "colin27"})


def test_check_mesh_flags_negative_faces():
    with pytest.raises(DataError, match="faces"):
        check_mesh(np.zeros((3, 3)), np.array([[0, 1, -1]]))


def test_white_matter_inside_the_white_surface(ref, rng):
    v = rng.choice(np.flatnonzero(ref.labels["L"] > 0), 500, replace=False)
    col = ref.white["L"][v] - ref.pial["L"][v]
    col /= np.linalg.norm(col, axis=1, keepdims=True)
    assert ref.white_matter(ref.white["L"][v] + 2.5 * col).mean() > 0.95  # below the white surface
    assert ref.white_matter(ref.pial["L"][v] - 2.5 * col).mean() < 0.05  # above the pia
    far = np.array([[0.0, 0.0, 200.0], [np.nan, 0, 0], [np.inf, 0, 0], [-300.0, 0, 0]])
    assert not ref.white_matter(far).any()
    assert (ref.white_matter(far, fraction=True) == 0).all()
    # deep white matter is far from every column (locate cannot tell it from outside), but white_matter can
    g = np.stack(np.meshgrid(np.arange(-70, 71, 4.0), np.arange(-100, 71, 4.0), np.arange(-45, 81, 4.0)), -1).reshape(-1, 3)
    far, wm = ref.locate(g).far, ref.white_matter(g)
    assert (far & wm).sum() > 20 and (far & ~wm).sum() > 1000  # deep white matter and the outside, both "far"
    w = np.concatenate([ref.white[h] for h in ref.hemis])
    assert (g[far & wm] > w.min(0)).all() and (g[far & wm] < w.max(0)).all()  # deep white matter lies inside the brain


def test_white_matter_fraction_agrees_with_the_mask(ref, rng):
    p = rng.uniform([-70, -100, -45], [70, 70, 80], size=(5000, 3))
    f = ref.white_matter(p, fraction=True)
    assert ((f >= 0.5) == ref.white_matter(p)).mean() > 0.97
    assert f.min() >= 0 and f.max() <= 1


def test_voxelise_interior_of_a_cube():
    "A closed cube surface: its interior voxels are filled, the outside is not."
    from cytoclr.reference import voxelise_interior
    v = np.array([[x, y, z] for x in (0, 10) for y in (0, 10) for z in (0, 10)], float)
    f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                  [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    mask, origin = voxelise_interior(v, f, voxel_mm=1.0)
    inside = np.floor((np.array([5.0, 5.0, 5.0]) - origin)).astype(int)
    assert mask[tuple(inside)] and not mask[0, 0, 0]
    assert abs(mask.sum() - 11 ** 3) <= 11 ** 3 * 0.35  # the shell voxels count too
    with pytest.raises(DataError, match="voxel_mm"):
        voxelise_interior(v, f, voxel_mm=0)
