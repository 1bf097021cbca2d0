"Tests of cytoclr.alignment: exact recovery, heavy outliers, weights, a slow exhaustive reference, input and plausibility checks."
import itertools
import math

import numpy as np
import pytest

from cytoclr.alignment import (_needed_trials, affine_residuals, fit_affine_ransac, plane_angle_deg, point_error_mm,
                               ransac_affine, synthetic_pairs)
from cytoclr.core import DataError


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
