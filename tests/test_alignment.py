"""Tests of cytoclr.alignment: exact recovery, heavy outliers, weights, a slow exhaustive reference, input and plausibility
checks, placing and scoring test sections (chapter 10's numbers)."""
import itertools
import math

import numpy as np
import pytest

from cytoclr.alignment import (_needed_trials, affine_residuals, alignment_metrics, alignment_summary,
                               anchors_before_after, fit_affine_ransac, plane_angle_deg, point_error_mm,
                               pooled_before_after, ransac_affine, recall_precision, synthetic_pairs)
from cytoclr.anchoring import Frame, anchoring_scores
from cytoclr.core import DataError, MetricKeys as K


def scores(inliers, truth):
    "(recall, precision) of an inlier mask against the true one."
    tp = (inliers & truth).sum()
    return tp / truth.sum(), tp / max(inliers.sum(), 1)


def slow_ransac(uv, xyz, thr, refinements=10):
    "Straight from the definition: every triple, the largest consensus (ties: smallest inlier SSE), then refits."
    H = np.column_stack([uv, np.ones(len(uv))])  # (n, 3)
    best = (-1, 0.0, None)
    for tri in itertools.combinations(range(len(uv)), 3):
        M = H[list(tri)]
        e1, e2 = M[1, :2] - M[0, :2], M[2, :2] - M[0, :2]
        longest = max(e1 @ e1, e2 @ e2, (e2 - e1) @ (e2 - e1))
        if abs(e1[0] * e2[1] - e1[1] * e2[0]) <= 1e-3 * longest:  # collinear: no affine
            continue
        X = np.linalg.solve(M, xyz[list(tri)])  # [u v 1] @ X = xyz
        r = [float(np.linalg.norm(H[i] @ X - xyz[i])) for i in range(len(uv))]
        count = sum(ri < thr for ri in r)
        sse = sum(ri * ri for ri in r if ri < thr)
        if count > best[0] or (count == best[0] and sse < best[1]):
            best = (count, sse, X)
    count, _, X = best
    inl = np.linalg.norm(H @ X - xyz, axis=1) < thr
    for _ in range(refinements):
        X = np.linalg.lstsq(H[inl], xyz[inl], rcond=None)[0]
        new = np.linalg.norm(H @ X - xyz, axis=1) < thr
        if np.array_equal(new, inl):
            break
        inl = new
    return count, X.T, inl


def test_exact_recovery_without_noise(rng):
    uv, xyz, A, truth = synthetic_pairs(500, outlier_share=0.0, noise_mm=0.0, seed=1)
    A_fit, inl = fit_affine_ransac(uv, xyz, 1.0, spacing_um=32.0)
    assert inl.all()
    np.testing.assert_allclose(A_fit, A, rtol=0, atol=1e-9)
    from cytoclr.sections import to_reference  # the same convention as Section.affine
    np.testing.assert_allclose(to_reference(A_fit, uv), xyz, atol=1e-8)
    fit = ransac_affine(uv, xyz, 1.0)
    assert fit.trials == 256 and fit.residuals.max() < 1e-8  # clean data: one batch, then the rule says stop
    # exact with half of the pairs wrong, too
    uv, xyz, A, truth = synthetic_pairs(500, outlier_share=0.5, noise_mm=0.0, seed=2)
    A_fit, inl = fit_affine_ransac(uv, xyz, 1.0, seed=3)
    np.testing.assert_array_equal(inl, truth)
    np.testing.assert_allclose(A_fit, A, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seventy_percent_outliers(seed):
    uv, xyz, A, truth = synthetic_pairs(4000, outlier_share=0.7, noise_mm=0.7, seed=seed)
    fit = ransac_affine(uv, xyz, 3.0, spacing_um=32.0, seed=seed)
    recall, precision = scores(fit.inliers, truth)
    assert recall > 0.95 and precision > 0.95, (recall, precision)
    assert np.median(point_error_mm(fit.A, A, uv)) < 1.0
    assert plane_angle_deg(fit.A, A) < 1.0
    assert fit.trials <= 2 * 256  # w ~ 0.3 needs ~250 triples at confidence 0.999
    A2, inl2 = fit_affine_ransac(uv, xyz, 3.0, spacing_um=32.0, seed=seed)  # deterministic for a seed
    np.testing.assert_array_equal(A2, fit.A)
    np.testing.assert_array_equal(inl2, fit.inliers)


def test_eighty_five_percent_outliers_with_more_trials():
    uv, xyz, A, truth = synthetic_pairs(4000, outlier_share=0.85, noise_mm=0.7, seed=4)
    fit = ransac_affine(uv, xyz, 3.0, confidence=0.9999, max_trials=20_000, spacing_um=32.0, seed=5)
    recall, precision = scores(fit.inliers, truth)
    assert recall > 0.95 and precision > 0.95, (recall, precision)
    assert np.median(point_error_mm(fit.A, A, uv)) < 1.0
    assert fit.trials > 1000  # the adaptive rule asked for (many) more samples than at 70%


def test_stopping_rule():
    assert _needed_trials(0.3, 0.999) == math.ceil(math.log(0.001) / math.log(1 - 0.027))
    assert _needed_trials(0.0, 0.999) == math.inf and _needed_trials(1.0, 0.999) == 0
    uv, xyz, _, _ = synthetic_pairs(1000, outlier_share=0.8, noise_mm=0.5, seed=6)  # w ~ 0.2: the rule asks ~860
    fit = ransac_affine(uv, xyz, 3.0, max_trials=700, batch=256, seed=0)
    assert fit.trials == 700  # capped by max_trials, the last batch trimmed


def test_weights_favour_true_matches(rng):
    "A larger coherent decoy (another section plane, low similarity) beats the true matches unless weighted."
    uv_t, xyz_t, A_t, _ = synthetic_pairs(400, outlier_share=0.0, noise_mm=0.5, seed=7)
    uv_d, xyz_d, A_d, _ = synthetic_pairs(700, outlier_share=0.0, noise_mm=0.5, seed=8)
    uv_o, xyz_o, _, _ = synthetic_pairs(900, outlier_share=1.0, seed=9)
    uv, xyz = np.concatenate([uv_t, uv_d, uv_o]), np.concatenate([xyz_t, xyz_d, xyz_o])
    truth = np.r_[np.ones(400, bool), np.zeros(1600, bool)]
    decoy = np.r_[np.zeros(400, bool), np.ones(700, bool), np.zeros(900, bool)]
    w = np.where(truth, rng.uniform(0.8, 1.0, len(uv)), rng.uniform(0.0, 0.2, len(uv)))  # similarity
    assert plane_angle_deg(A_t, A_d) > 5
    _, inl = fit_affine_ransac(uv, xyz, 2.0, seed=1)
    assert scores(inl, decoy)[0] > 0.95  # unweighted: the largest consensus is the decoy
    A_w, inl_w = fit_affine_ransac(uv, xyz, 2.0, weights=w, seed=1)
    recall, precision = scores(inl_w, truth)
    assert recall > 0.95 and precision > 0.95
    assert np.median(point_error_mm(A_w, A_t, uv_t)) < 0.5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("noise, offset", [(0.25, 5.0), (0.4, 1.0)])  # the second: consensus sets compete
def test_matches_exhaustive_reference(seed, noise, offset):
    r = np.random.default_rng(seed)
    uv, xyz, A, truth = synthetic_pairs(12, outlier_share=0.35, noise_mm=noise, seed=seed)
    xyz[~truth] = xyz[~truth] + r.normal(scale=offset, size=((~truth).sum(), 3))  # outliers only a few mm off
    count, A_ref, inl_ref = slow_ransac(uv, xyz, 1.0)
    fit = ransac_affine(uv, xyz, 1.0, batch=4096, min_inliers=3, seed=seed)  # 4096 draws cover all 220 triples
    assert fit.score == count
    np.testing.assert_array_equal(fit.inliers, inl_ref)
    np.testing.assert_allclose(fit.A, A_ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("change, field", [
    (lambda uv, xyz: (uv[:, :1], xyz), "uv"),
    (lambda uv, xyz: (np.c_[uv, uv[:, 0]], xyz), "uv"),
    (lambda uv, xyz: (uv, xyz[:, :2]), "xyz"),
    (lambda uv, xyz: (uv, xyz[:-1]), "xyz"),
    (lambda uv, xyz: (np.where(np.arange(len(uv))[:, None] == 3, np.nan, uv), xyz), "uv"),
    (lambda uv, xyz: (uv, np.where(np.arange(len(xyz))[:, None] == 5, np.inf, xyz)), "xyz"),
    (lambda uv, xyz: (uv[:2], xyz[:2]), "uv"),
    (lambda uv, xyz: (np.c_[uv[:, 0], 2 * uv[:, 0] + 1], xyz), "uv"),  # collinear pixels
    (lambda uv, xyz: (np.array([["a", "b"]] * len(uv)), xyz), "uv"),
])
def test_bad_input_names_the_field(change, field):
    uv, xyz, _, _ = synthetic_pairs(50, seed=0)
    with pytest.raises(DataError) as e:
        fit_affine_ransac(*change(uv, xyz), 3.0)
    assert e.value.field == field


@pytest.mark.parametrize("kwargs, field", [
    (dict(threshold_mm=0.0), "threshold_mm"), (dict(threshold_mm=-1.0), "threshold_mm"),
    (dict(threshold_mm=float("nan")), "threshold_mm"),
    (dict(weights=np.ones(49)), "weights"), (dict(weights=-np.ones(50)), "weights"), (dict(weights=np.zeros(50)), "weights"),
    (dict(confidence=1.0), "confidence"), (dict(max_trials=0), "max_trials"), (dict(batch=0), "batch"),
    (dict(min_inliers=2), "min_inliers"), (dict(spacing_um=-32.0), "spacing_um"), (dict(shrinkage=(1.2, 1.5)), "shrinkage"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    uv, xyz, _, _ = synthetic_pairs(50, seed=0)
    kwargs = {"threshold_mm": 3.0, **kwargs}
    with pytest.raises(DataError) as e:
        fit_affine_ransac(uv, xyz, **kwargs)
    assert e.value.field == field


def test_implausible_results_raise():
    uv, xyz, A, _ = synthetic_pairs(1000, outlier_share=0.5, noise_mm=0.5, seed=10)
    fit_affine_ransac(uv, xyz, 3.0, spacing_um=32.0)  # the declared pixel size: fine
    fit_affine_ransac(uv, xyz, 3.0, spacing_um=36.0)  # 11% off: within the default shrinkage
    with pytest.raises(DataError) as e:  # mm and um mixed up, or the wrong level of a pyramid
        fit_affine_ransac(uv, xyz, 3.0, spacing_um=64.0)
    assert e.value.field == "spacing_um"
    msg = str(e.value)
    assert "0.032" in msg and "0.064" in msg and "inliers" in msg and "%" in msg
    with pytest.raises(DataError, match="min_inliers"):  # nothing agrees
        fit_affine_ransac(uv, np.random.default_rng(0).uniform(-70, 70, (1000, 3)), 0.5)
    # non-collinear pixels mapped onto one line: parallel row and column steps
    line = np.outer(uv[:, 0] + uv[:, 1], [0.032, 0.0, 0.0])
    with pytest.raises(DataError, match="parallel"):
        fit_affine_ransac(uv, line, 1.0)


def test_plane_angle_by_hand():
    A1 = np.array([[1.0, 0, 5], [0, 1, 6], [0, 0, 7]])  # the plane z = 7: normal e_z
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    A2 = np.array([[0.5, 0, 0], [0, 2 * c, 0], [0, 2 * s, 0]])  # tilted 30 degrees about x, other scales
    assert plane_angle_deg(A1, A2) == pytest.approx(30.0, abs=1e-9)
    assert plane_angle_deg(A2, A1) == pytest.approx(30.0, abs=1e-9)
    assert plane_angle_deg(A1, A1[:, [1, 0, 2]]) == pytest.approx(0.0, abs=1e-6)  # flipped normal: same plane
    A3 = np.array([[0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])  # the plane x = 0
    assert plane_angle_deg(A1, A3) == pytest.approx(90.0, abs=1e-9)
    with pytest.raises(DataError):
        plane_angle_deg(A1, np.array([[1.0, 2.0, 0], [0, 0, 0], [0, 0, 0]]))


def test_point_error_by_hand():
    A = np.array([[0.032, 0.0, -60.0], [0.0, 0.0, 10.0], [0.0, -0.032, 70.0]])
    shifted = A.copy()
    shifted[:, 2] += [1.0, 2.0, 2.0]  # a pure translation of 3 mm
    uv = np.array([[0.0, 0.0], [100.0, 2000.0], [3000.0, 17.0]])
    np.testing.assert_allclose(point_error_mm(shifted, A, uv), [3.0, 3.0, 3.0])
    scaled = A.copy()
    scaled[0, 0] += 0.001  # 1 um more per row along x
    np.testing.assert_allclose(point_error_mm(scaled, A, uv), [0.0, 0.1, 3.0])
    np.testing.assert_allclose(affine_residuals(A, uv, uv @ A[:, :2].T + A[:, 2] + [0, 3.0, 4.0]), 5.0)


# ---------------------------------------------------------------- placing sections from anchors
def test_place_section_with_a_perfect_encoder(rng):
    "Features that encode position exactly: every patch finds its own place, the fit is the true affine."
    from cytoclr.alignment import place_section
    A = np.array([[0.0, 0.05, -60.0], [0.002, 0.0, -20.0], [-0.05, 0.0, 70.0]])
    uv = rng.uniform(0, 2000, (400, 2))
    xyz = uv @ A[:, :2].T + A[:, 2]
    frame_xyz = np.concatenate([xyz + rng.normal(0, 0.3, xyz.shape), rng.uniform(-70, 70, (600, 3))])
    code = lambda p: np.concatenate([np.sin(p / 7.0), np.cos(p / 7.0), np.sin(p / 3.1), np.cos(p / 3.1)], 1)
    pl = place_section(uv, code(xyz), code(frame_xyz), frame_xyz, threshold_mm=2.0, spacing_um=50.0)
    assert plane_angle_deg(pl.A, A) < 0.5 and np.median(point_error_mm(pl.A, A, uv)) < 0.5
    assert (pl.matches == np.arange(400)).mean() > 0.95 and pl.inliers.mean() > 0.95
    assert pl.indices.shape[0] == 400 and pl.history[0]["inliers"] > 300


def test_reanchoring_improves_a_noisy_encoder(rng):
    "40% right anchors, the rest random: the fit finds the plane, re-anchoring near it fixes most wrong anchors."
    from cytoclr.alignment import place_section
    A = np.array([[0.0, 0.064, -70.0], [0.003, 0.0, -18.0], [-0.064, 0.0, 75.0]])
    gy, gx = np.meshgrid(np.arange(0, 2000, 45.0), np.arange(0, 2200, 45.0), indexing="ij")
    frame_uv = np.stack([gy.ravel(), gx.ravel()], 1)
    frame_xyz = frame_uv @ A[:, :2].T + A[:, 2] + np.array([0, 0.0, 0])
    feats = rng.normal(size=(len(frame_xyz), 32))
    idx = rng.choice(len(frame_xyz), 500, replace=False)
    uv, q = frame_uv[idx] + rng.uniform(-10, 10, (500, 2)), feats[idx] + 0.3 * rng.normal(size=(500, 32))
    wrong = rng.random(500) < 0.6
    q[wrong] = rng.normal(size=(wrong.sum(), 32))  # these match nothing in particular
    before = np.argmax((q / np.linalg.norm(q, axis=1, keepdims=True)) @ (feats / np.linalg.norm(feats, axis=1, keepdims=True)).T, 1)
    err_before = np.linalg.norm(frame_xyz[before] - (uv @ A[:, :2].T + A[:, 2]), axis=1)
    pl = place_section(uv, q, feats, frame_xyz, threshold_mm=4.0, spacing_um=64.0, rounds=3)
    err_after = np.linalg.norm(frame_xyz[pl.matches] - (uv @ A[:, :2].T + A[:, 2]), axis=1)
    assert plane_angle_deg(pl.A, A) < 1.0
    assert np.mean(err_after < 5) > np.mean(err_before < 5) + 0.3  # re-anchoring near the plane fixes wrong anchors
    assert pl.history[-1]["radius_mm"] <= pl.history[0]["radius_mm"]


def test_place_section_bad_input(rng):
    from cytoclr.alignment import place_section
    with pytest.raises(DataError, match="pixel positions"):
        place_section(rng.random((5, 2)), rng.random((4, 3)), rng.random((9, 3)), rng.random((9, 3)))
    with pytest.raises(DataError, match="usable"):
        place_section(rng.random((5, 2)), rng.random((5, 3)), rng.random((9, 3)), rng.random((9, 3)),
                      usable=np.zeros(9, bool))


def test_section_errors_against_an_affine_and_against_points(rng):
    from cytoclr.alignment import lstsq_affine, section_errors
    A = np.array([[0.0, 0.05, -60.0], [0.0, 0.0, -20.0], [-0.05, 0.0, 70.0]])
    uv = rng.uniform(0, 1000, (50, 2))
    B = A.copy()
    B[:, 2] += [0, 3.0, 4.0]  # shifted by 5 mm
    e = section_errors(B, uv, A_true=A)
    assert e["median_point_error_mm"] == pytest.approx(5.0) and e["plane_angle_error_deg"] == pytest.approx(0, abs=1e-9)
    pts = uv @ A[:, :2].T + A[:, 2]
    np.testing.assert_allclose(lstsq_affine(uv, pts), A, atol=1e-9)
    h = section_errors(B, uv, xyz_true=pts)
    assert h["median_point_error_mm"] == pytest.approx(5.0) and h["best_affine_residual_mm"] < 1e-9
    with pytest.raises(DataError):
        section_errors(B, uv)


def test_recall_precision_by_hand():
    inl = np.array([1, 1, 1, 0, 0, 1], bool)
    truth = np.array([1, 1, 0, 1, 0, 0], bool)
    assert recall_precision(inl, truth) == (2 / 3, 2 / 4)
    assert recall_precision(np.zeros(6, bool), truth) == (0.0, 0.0)


# ---------------------------------------------------------------- placing chapter 9's test sections, scoring them
def _code(x, z):
    "A perfect encoder of the position in a coronal plane: features of (x, z) only."
    return np.stack([np.sin(x / 7), np.cos(x / 7), np.sin(z / 7), np.cos(z / 7), np.sin(x / 3.1), np.cos(x / 3.1),
                     np.sin(z / 3.1), np.cos(z / 3.1)], 1).astype(np.float32)


def _plane_setup(y_query=-10.0):
    "Test patches on the plane y = y_query (0.5 mm pixels), a frame of the same grid on the plane y = 0."
    gu, gv = np.meshgrid(np.arange(0, 201, 10.0), np.arange(0, 201, 10.0), indexing="ij")
    uv = np.stack([gu.ravel(), gv.ravel()], 1)
    x, z = 0.5 * uv[:, 1] - 50, -0.5 * uv[:, 0] + 50
    n = len(uv)
    mk = lambda y, sid: Frame(xyz=np.stack([x, np.full(n, y), z], 1), hemi=np.zeros(n, np.int8),
                              section=np.zeros(n, np.int64), rc=uv, brain=np.array(["b"] * n), section_ids=[sid],
                              features=_code(x, z))
    q, fr = mk(y_query, "query"), mk(0.0, "frame")
    planes = [(np.array([0.0, y_query, 0.0]), np.array([0.0, 1.0, 0.0]))]
    return q, fr, planes


def test_anchors_before_after_by_hand():
    "Every patch's anchor is the frame patch 10 mm away, before and after: errors 10 mm, ranks 0; the plane y = 0."
    q, fr, planes = _plane_setup()
    parts, before, pl, why = anchors_before_after(q, fr, planes, 0, 5.0, q.features, fr.features, 5.0, 500.0, kmax=5)
    assert why is None and pl is not None
    be, br, ae, ar, g = parts[K.REGISTERED]
    np.testing.assert_allclose(be, 10.0)
    np.testing.assert_allclose(ae, 10.0)
    assert (br == 0).all() and (ar == 0).all() and (g == 0).all() and list(parts) == [K.REGISTERED]
    np.testing.assert_array_equal(pl.matches, np.arange(len(q)))
    assert abs(pl.A[1, 2]) < 1e-6 and np.allclose(pl.A[1, :2], 0, atol=1e-9)  # the fitted plane is y = 0


def test_anchors_before_after_keeps_the_first_anchors_when_not_placed():
    q, fr, planes = _plane_setup()
    parts, before, pl, why = anchors_before_after(q, fr, planes, 0, 5.0, q.features, fr.features, 5.0, 32.0, kmax=5)
    assert pl is None and "pixel size" in why  # 0.5 mm steps contradict a declared 32 um pixel
    be, br, ae, ar, _ = parts[K.REGISTERED]
    assert ae is be and ar is br


def test_pooled_before_after_against_anchoring_scores(rng):
    "Pooling = anchoring_scores on the concatenated sections, before and after."
    mk = lambda s, n: (rng.uniform(0, 20, n), rng.integers(0, 60, n), rng.uniform(0, 20, n), rng.integers(0, 60, n),
                       np.full(n, s))
    a, b = mk(0, 30), mk(1, 40)
    got = pooled_before_after({K.REGISTERED: [a, b]}, 10.0, 50, 20, 3)
    ref = anchoring_scores(np.r_[a[0], b[0]], np.r_[a[1], b[1]], np.r_[a[4], b[4]], 10.0, 50, 20, 3)
    assert got[K.REGISTERED]["before"] == ref
    assert got[K.REGISTERED]["after"] == anchoring_scores(np.r_[a[2], b[2]], np.r_[a[3], b[3]], np.r_[a[4], b[4]],
                                                            10.0, 50, 20, 3)


def _section(e, a, placed=True, homologous=None):
    s = {"section": f"s{e}", "placed": placed}
    if placed:
        s[K.REGISTERED] = {K.POINT_ERROR_MM: e, K.PLANE_ANGLE_DEG: a}
        if homologous is not None:
            s[K.HOMOLOGOUS] = {K.POINT_ERROR_MM: homologous, K.PLANE_ANGLE_DEG: 0.0, "best_affine_residual_mm": 0.1}
    return s


def test_alignment_summary_by_hand():
    secs = [_section(1.0, 0.5, homologous=4.0), _section(3.0, 1.5), _section(8.0, 9.0), _section(0, 0, placed=False)]
    r = alignment_summary(secs)
    assert r[K.REGISTERED][K.POINT_ERROR_MM] == 3.0 and r[K.REGISTERED][K.PLANE_ANGLE_DEG] == 1.5
    assert r[K.REGISTERED][K.SECTIONS_PLACED] == 3 and r[K.REGISTERED][K.SECTIONS] == 4
    assert [p["section"] for p in r[K.REGISTERED]["per_section"]] == ["s1.0", "s3.0", "s8.0"]
    assert r[K.HOMOLOGOUS][K.POINT_ERROR_MM] == 4.0 and len(r[K.HOMOLOGOUS]["per_section"]) == 1
    none = alignment_summary([_section(0, 0, placed=False)])
    assert none[K.REGISTERED][K.POINT_ERROR_MM] is None and none[K.REGISTERED][K.SECTIONS] == 1


def test_alignment_metrics_layout():
    sc = lambda v: {"top1": v}
    results = {(K.ANCHORING, "nissl", "geodesic"): {K.REGISTERED: {"before": sc(0.1), "after": sc(0.2)},
                                                     K.HOMOLOGOUS: {"before": sc(0.3), "after": sc(0.4)}},
               (K.ANCHORING_UNSEEN, "nissl", "geodesic"): {K.REGISTERED: {"before": sc(0.5), "after": sc(0.6)}}}
    placed = {(K.ANCHORING, "nissl", "geodesic"): [_section(2.0, 1.0)],
              (K.ANCHORING_UNSEEN, "nissl", "geodesic"): [_section(5.0, 1.0)]}
    m = alignment_metrics(results, placed)
    assert m[K.ANCHORING]["nissl"]["geodesic"] == {K.AFTER_ALIGNMENT: sc(0.2), "after_alignment_homologous": sc(0.4)}
    assert m[K.ANCHORING_UNSEEN]["nissl"]["geodesic"] == {K.AFTER_ALIGNMENT: sc(0.6)}
    assert list(m[K.ALIGNMENT]) == ["nissl"] and m[K.ALIGNMENT]["nissl"]["geodesic"][K.REGISTERED][K.POINT_ERROR_MM] == 2.0
