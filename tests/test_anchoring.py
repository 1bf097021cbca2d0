"Anchoring: retrieval, top-k accuracy, scores with intervals, the near-duplicate rule, frames and their space."
import math

import numpy as np
import pytest
import torch

from cytoclr.anchoring import (Frame, anchor_errors, anchoring_scores, chance_anchoring, cosine_topk, encoder_space,
                               evaluate_anchoring, frame_sections, image_features, nearest_in_frame, pooled_scores, rank_of, retrieve, section_plane, standardise, topk_accuracy,
                               usable_frame, weights_fingerprint)
from cytoclr.core import DataError, read_json, write_json_atomic
from cytoclr.readers import recorded_spacing
from cytoclr.sampling import Samples


def test_cosine_topk_is_the_libraries_one():
    import cytoclr.core
    assert cosine_topk is cytoclr.core.cosine_topk


def test_topk_accuracy_on_hand_made_cases():
    idx = np.array([[3, 1, 2], [0, 4, 5], [7, 8, 9], [2, 2, 2]])
    nearest = np.array([1, 0, 6, 2])
    np.testing.assert_allclose(topk_accuracy(idx, nearest, ks=(1, 2, 3)), [0.5, 0.75, 0.75])
    np.testing.assert_array_equal(rank_of(idx, nearest), [1, 0, 3, 0])  # absent: k; repeats: the first


def _slow_scores(err, rank, outlier):
    "The headline numbers straight from their definitions."
    return {"top1": np.mean(rank < 1), "top5": np.mean(rank < 5), "top10": np.mean(rank < 10),
            "median_error_mm": np.median(err), "p90_error_mm": np.percentile(err, 90), "within_5mm": np.mean(err < 5),
            "within_10mm": np.mean(err < 10), "outlier_fraction": np.mean(err > outlier)}


def test_anchoring_scores_against_the_definitions(rng):
    err, rank = rng.exponential(8, 400), rng.integers(0, 60, 400)
    groups = rng.integers(0, 5, 400)
    sc = anchoring_scores(err, rank, groups, outlier_mm=10, kmax=50, n_boot=300, seed=1)
    for k, v in _slow_scores(err, rank, 10).items():
        assert sc[k] == pytest.approx(v), k
        lo, hi = sc["ci95"][k]
        assert lo <= hi
    assert len(sc["topk_curve"]) == 50 and sc["topk_curve"][0] == pytest.approx(sc["top1"])
    assert sc["topk_curve"][9] == pytest.approx(sc["top10"]) and sc["n"] == 400 and sc["sections"] == 5
    one = anchoring_scores(err, rank, np.zeros(400), n_boot=50)  # a single section: no spread to resample
    assert one["ci95"]["within_5mm"][0] == pytest.approx(one["ci95"]["within_5mm"][1])
    with pytest.raises(DataError, match="not finite"):
        anchoring_scores(np.r_[err[:-1], np.inf], rank, groups)
    with pytest.raises(DataError, match="one length"):
        anchoring_scores(err, rank[:-1], groups)


def test_bootstrap_replicates_weight_whole_sections(rng):
    "An interval over sections is wider than one over patches when sections differ."
    g = np.repeat(np.arange(6), 100)
    err = np.where(g % 2 == 0, 2.0, 20.0) + rng.normal(0, 0.1, 600)  # half the sections good, half bad
    sc = anchoring_scores(err, np.zeros(600, int), g, n_boot=500, seed=0)
    lo, hi = sc["ci95"]["within_5mm"]
    assert lo < 0.35 and hi > 0.65  # the share depends on which sections are drawn


def _planes_world(rng, n_frame=3000):
    "Frame patches on coronal planes every 2 mm; test patches on the plane y = 0; homologous = registered + 1 mm in z."
    ys = np.arange(-20, 21, 2.0)
    fx = np.column_stack([rng.uniform(-50, 50, n_frame), rng.choice(ys, n_frame), rng.uniform(-40, 40, n_frame)])
    qx = np.column_stack([rng.uniform(-50, 50, 200), np.zeros(200), rng.uniform(-40, 40, 200)])
    frame = Frame(xyz=fx, hemi=(fx[:, 0] > 0).astype(np.int8), section=np.zeros(n_frame, np.int64), rc=np.zeros((n_frame, 2)),
                  brain=np.array(["b"] * n_frame), section_ids=["f"], xyz_true=fx + [0, 0, 1.0])
    q = Frame(xyz=qx, hemi=(qx[:, 0] > 0).astype(np.int8), section=np.zeros(200, np.int64), rc=np.zeros((200, 2)),
              brain=np.array(["b"] * 200), section_ids=["t"], xyz_true=qx + [0, 0, 1.0])
    plane = (np.zeros(3), np.array([0, 1.0, 0]))
    return frame, q, [plane]


def test_no_usable_frame_patch_lies_within_the_gap(rng):
    frame, q, planes = _planes_world(rng)
    group, valid, gap = usable_frame(frame, q, planes, 4.0)
    assert gap >= 4.0 and not valid[0][np.abs(frame.xyz[:, 1]) < 4].any() and valid[0][np.abs(frame.xyz[:, 1]) >= 4].all()
    _, valid_h, _ = usable_frame(frame, q, planes, 4.0, same_hemisphere=True)
    for g in (0, 1):  # (section 0, hemisphere g)
        assert (frame.hemi[valid_h[g]] == g).all()


def test_perfect_features_find_the_closest_usable_patch(rng):
    "Features that encode position: the anchor is the closest usable frame patch, so its error is the best achievable."
    frame, q, planes = _planes_world(rng)
    code = lambda x: np.concatenate([np.sin(x / 3.0), np.cos(x / 3.0), np.sin(x / 7.0), np.cos(x / 7.0)], 1)
    r = evaluate_anchoring(q, frame, planes, 4.0, code(q.xyz), code(frame.xyz), n_boot=20)
    best = evaluate_anchoring(q, frame, planes, 4.0, baseline="best_achievable", n_boot=20)
    assert r["registered"]["median_error_mm"] < best["registered"]["median_error_mm"] * 1.5 + 0.5
    assert r["min_gap_mm"] >= 4.0 and best["registered"]["top1"] == 1.0
    assert set(r) >= {"registered", "homologous", "errors", "ranks", "indices"}
    chance = evaluate_anchoring(q, frame, planes, 4.0, baseline="chance", n_boot=20)
    assert chance["registered"]["median_error_mm"] > 3 * r["registered"]["median_error_mm"]
    with pytest.raises(DataError, match="baseline"):
        evaluate_anchoring(q, frame, planes, 4.0, baseline="oracle")
    with pytest.raises(DataError, match="features"):
        evaluate_anchoring(q, frame, planes, 4.0)


def test_retrieve_and_nearest_respect_the_groups(rng):
    qf, ff = rng.normal(size=(6, 4)), rng.normal(size=(10, 4))
    valid = np.zeros((2, 10), bool)
    valid[0, :5], valid[1, 5:] = True, True
    group = np.array([0, 0, 0, 1, 1, 1])
    idx, sim = retrieve(qf, ff, group, valid, k=7)
    assert (idx[:3, :5] < 5).all() and (idx[:3, 5:] == -1).all() and (idx[3:, :5] >= 5).all()
    ref_idx, _ = cosine_topk(qf[:3], ff[:5], 5)
    np.testing.assert_array_equal(idx[:3, :5], ref_idx)
    n, d = nearest_in_frame(qf[:, :3], ff[:, :3], group, valid)
    for i in range(6):
        cand = np.flatnonzero(valid[group[i]])
        dd = np.linalg.norm(ff[cand, :3] - qf[i, :3], axis=1)
        assert n[i] == cand[dd.argmin()] and d[i] == pytest.approx(dd.min())


def test_pooled_scores_equal_one_evaluation_of_the_union(rng):
    frame, q, planes = _planes_world(rng)
    r = anchor_errors(q, frame, planes, 4.0, baseline="best_achievable")
    a = pooled_scores([(r, q.section)], "registered", n_boot=30)
    half = np.arange(len(q)) < 100
    parts = []
    for sel in (half, ~half):
        sub = {"errors": {"registered": r["errors"]["registered"][sel]}, "ranks": {"registered": r["ranks"]["registered"][sel]}}
        parts.append((sub, q.section[sel]))
    b = pooled_scores(parts, "registered", n_boot=30)
    assert a["median_error_mm"] == pytest.approx(b["median_error_mm"]) and a["within_5mm"] == b["within_5mm"]
    assert pooled_scores(parts, "homologous") is None


def test_chance_ranks_are_uniform(rng):
    frame, q, planes = _planes_world(rng, 500)
    group, valid, _ = usable_frame(frame, q, planes, 4.0)
    _, rank = chance_anchoring(q.xyz, frame.xyz, group, valid, seed=0, kmax=10_000)
    assert abs(np.mean(rank) / valid[0].sum() - 0.5) < 0.1


def test_a_frame_records_the_pixel_size_of_its_patches_and_old_frames_load(tmp_path, rng):
    from types import SimpleNamespace as S
    smp = Samples(section=np.array([0, 0, 2, 2]), rc=rng.normal(size=(4, 2)), xyz=rng.normal(size=(4, 3)),
                  hemi=np.zeros(4, np.int8), vertex=np.zeros(4, np.int64), area=np.zeros(4, np.int64),
                  brain=np.array(["b"] * 4), depth=np.zeros(4), surface_xyz=np.zeros((4, 3)))
    secs = [S(id="s0", spacing_um=32.0), S(id="s1", spacing_um=8.0), S(id="s2", spacing_um=32)]  # s1 has no patch
    f = Frame.from_samples(smp, secs, meta={"patch_px": 64, "grid_mm": 2.0})
    assert f.meta == {"spacing_um": 32.0, "patch_px": 64, "patch_mm": 64 * 32.0 / 1000, "grid_mm": 2.0}
    f.save(tmp_path / "fr")
    assert Frame.load(tmp_path / "fr").meta == f.meta and recorded_spacing(Frame.load(tmp_path / "fr").meta) == (32.0,)
    assert Frame.from_samples(smp, secs, meta={"spacing_um": 20.0}).meta == {"spacing_um": 20.0}  # the caller's wins
    mixed = Frame.from_samples(smp, [secs[0], secs[1], S(id="s2", spacing_um=16.0)])
    assert mixed.meta == {"spacing_um": [16.0, 32.0]} and recorded_spacing(mixed.meta) == (16.0, 32.0)
    assert Frame.from_samples(smp, [S(id="a"), S(id="b"), S(id="c")]).meta == {}  # sections that do not know theirs
    info = read_json(tmp_path / "fr" / "frame.json", None)  # a frame saved before pixel sizes were recorded
    write_json_atomic(tmp_path / "fr" / "frame.json", {**info, "meta": {"patch_px": 64, "grid_mm": 2.0}})
    old = Frame.load(tmp_path / "fr")
    assert len(old) == 4 and recorded_spacing(old.meta) is None
    assert recorded_spacing({"parts": [f.meta, mixed.meta]}) == (16.0, 32.0)  # frames concatenated (cytoclr anchor)
    assert recorded_spacing({"parts": [f.meta, old.meta]}) is None


def test_frame_save_load_and_the_embedding_space(tmp_path, rng):
    f = Frame(xyz=rng.normal(size=(5, 3)), hemi=np.zeros(5, np.int8), section=np.arange(5) % 2, rc=rng.normal(size=(5, 2)),
              brain=np.array(["b"] * 5), section_ids=["s0", "s1"], xyz_true=rng.normal(size=(5, 3)), meta={"patch_px": 64})
    g = f.with_features(rng.normal(size=(5, 8)), {"kind": "encoder", "weights": "abc"})
    g.save(tmp_path / "fr")
    h = Frame.load(tmp_path / "fr")
    np.testing.assert_allclose(h.xyz, f.xyz)
    assert h.section_ids == ["s0", "s1"] and h.meta == {"patch_px": 64} and h.space["weights"] == "abc"
    np.testing.assert_allclose(np.linalg.norm(h.features, axis=1), 1, atol=1e-3)  # unit rows in float16
    h.check_space({"kind": "encoder", "weights": "abc"})
    with pytest.raises(DataError, match="another encoder"):
        h.check_space({"kind": "encoder", "weights": "xyz"})
    with pytest.raises(DataError, match="no reference frame"):
        Frame.load(tmp_path / "nothing")
    assert len(g.subset(np.array([0, 2]))) == 2


def test_weights_fingerprint_sees_the_weights():
    from cytoclr.models import build_encoder
    torch.manual_seed(0)
    a = build_encoder("quick", width=0.25)
    torch.manual_seed(0)
    b = build_encoder("quick", width=0.25)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert encoder_space(a, "nissl", "geodesic")["weights"] != encoder_space(b, "nissl", "geodesic")["weights"]


def test_image_features_are_rotation_invariant(rng):
    x = rng.random((3, 1, 32, 32)).astype(np.float32)
    a = image_features(x, "nissl")
    b = image_features(np.rot90(x, 1, axes=(2, 3)).copy(), "nissl")  # the same patches, turned
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    p = np.concatenate([rng.random((2, 2, 16, 16)), rng.random((2, 1, 16, 16)) * 180], 1).astype(np.float32)
    assert image_features(p, "pli").shape == (2, 16 * 4 + 1)
    f, g = standardise(a, b)
    assert np.allclose(f.mean(0), 0, atol=1e-4)
    with pytest.raises(DataError):
        image_features(x[0], "nissl")


def test_phantom_frames_leave_out_the_planes_near_test_planes(ref):
    from cytoclr.manifest import load_manifest
    from pathlib import Path
    man = load_manifest(Path(__file__).resolve().parents[1] / "data_manifest.yml")
    tests = [s for s in man.split("test", "nissl") if s.brain == "phantom-0"]
    fs = frame_sections(man, "phantom-0", "nissl", tests, step_mm=2.0, min_gap_mm=4.0)
    ys = np.array([s.y_mm for s in fs])
    test_ys = np.array([s.build().y_mm for s in tests])
    assert np.abs(ys[:, None] - test_ys[None]).min() >= 4.0 and len(fs) > 30
    assert np.allclose(np.diff(ys)[np.diff(ys) < 3], 2.0)  # every 2 mm where nothing is left out
    plane = section_plane(tests[0])
    assert abs(np.linalg.norm(plane[1]) - 1) < 1e-9
    sag = [s for s in man.split("test", "pli") if getattr(s, "series", None) == "sagittal"]
    own = frame_sections(man, "phantom-0", "pli", sag, series_frames=("sagittal",))
    assert all(s.series == "sagittal" for s in own) and not {s.id for s in own} & {s.id for s in sag}
    with pytest.raises(DataError, match="no test sections"):
        frame_sections(man, "phantom-0", "nissl", [])


def test_compare_scores_reads_direction_and_intervals():
    from cytoclr.anchoring import compare_scores
    a = {"within_10mm": 0.3, "median_error_mm": 20.0, "ci95": {"within_10mm": [0.25, 0.35], "median_error_mm": [18, 22]}}
    b = {"within_10mm": 0.1, "median_error_mm": 21.0, "ci95": {"within_10mm": [0.05, 0.15], "median_error_mm": [19, 25]}}
    assert compare_scores(a, b, "within_10mm") == "better, intervals apart"
    assert compare_scores(b, a, "within_10mm") == "worse, intervals apart"
    assert compare_scores(a, b, "median_error_mm") == "better, intervals overlap"  # lower error is better
    assert compare_scores(a, a, "median_error_mm") == "equal"
    with pytest.raises(DataError, match="no score"):
        compare_scores(a, b, "top7")


class _FoldDistances:
    "A stub of `SurfaceDistances.from_xyz`: straight-line distances, and a surface distance that doubles across x = 0."

    def from_xyz(self, xyz, kind="geodesic", allow_far=False):
        d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
        if kind == "geodesic":  # the two banks of a fold at x = 0: a path must go round it
            across = (xyz[:, None, 0] < 0) != (xyz[None, :, 0] < 0)
            d = np.where(across, 3.0 * d + 4.0, d)
        return d, None


def test_weight_disagreement_against_the_formula():
    from cytoclr.anchoring import weight_disagreement
    rng = np.random.default_rng(3)
    xyz = rng.uniform(-6, 6, (30, 3))
    got = weight_disagreement(_FoldDistances(), xyz, sigma_mm=2.0)
    geo, _ = _FoldDistances().from_xyz(xyz)
    line, _ = _FoldDistances().from_xyz(xyz, "euclidean")
    diff = line_sum = short = geo_sum = 0.0
    pairs = 0
    for i in range(30):  # straight from the definition, pair by pair
        for j in range(30):
            if i == j:
                continue
            wg, wl = math.exp(-geo[i, j] ** 2 / 8.0), math.exp(-line[i, j] ** 2 / 8.0)
            diff += abs(wg - wl)
            line_sum += wl
            geo_sum += wg
            short += wl if geo[i, j] >= 2 * line[i, j] else 0.0
            pairs += wl > 1e-3
    assert np.isclose(got["relative_difference"], diff / line_sum)
    assert np.isclose(got["line_mass_on_shortcuts"], short / line_sum)
    assert np.isclose(got["geo_over_line_mass"], geo_sum / line_sum)
    assert got["pairs"] == pairs and got["n"] == 30
    assert 0 < got["line_mass_on_shortcuts"] < 1  # the fold really separates some close pairs
    one_bank = weight_disagreement(_FoldDistances(), np.abs(xyz), sigma_mm=2.0)  # no pair crosses the fold
    assert one_bank["relative_difference"] == 0 and one_bank["line_mass_on_shortcuts"] == 0


def test_weight_disagreement_refuses_bad_input():
    from cytoclr.anchoring import weight_disagreement
    with pytest.raises(DataError, match="xyz"):
        weight_disagreement(_FoldDistances(), np.zeros((1, 3)), 2.0)
    with pytest.raises(DataError, match="shortcut_ratio"):
        weight_disagreement(_FoldDistances(), np.zeros((3, 3)), 2.0, shortcut_ratio=1.0)
    with pytest.raises(DataError, match="within reach"):
        weight_disagreement(_FoldDistances(), np.array([[0, 0, 0], [500.0, 0, 0]]), 2.0, kind="threshold")
