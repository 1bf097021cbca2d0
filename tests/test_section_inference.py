"""Section-level inference (chapter 10b): the similarity fit against SciPy, the consistency sampling and scoring against
their formulas, the estimator against a brute-force search over every triple, patches cut in bands against
`extract_patch`, the cortex head, the refusals and bad input."""
import itertools

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cytoclr.alignment import plane_angle_deg, point_error_mm
from cytoclr.core import DataError
from cytoclr.sampling import extract_patch
from cytoclr.section_inference import (CortexHead, SectionPose, consistent_triples, decide, fit_similarity,
                                       grid_patches, image_grid, place_by_candidates, pose_affine, reanchor,
                                       refine_pose, score_poses)
from helpers import FakeSection


def _problem(n, k, right_share, noise_mm=1.0, seed=0, flip=True):
    "uv (n, 2) px at 64 um, candidates (n, k, 3), similarities, the true affine; `right_share` candidates near the truth."
    rng = np.random.default_rng(seed)
    uv = rng.uniform(0, 2000, (n, 2))
    R = Rotation.from_euler("xyz", [95, 4, 160 if flip else 20], degrees=True).as_matrix()
    A = pose_affine(1.05, R, np.array([-60.0, -20.0, 10.0]), 0.064)
    xyz = uv @ A[:, :2].T + A[:, 2]
    Q = rng.uniform([-70, -105, -50], [70, 70, 80], (n, k, 3))
    right = rng.random((n, k)) < right_share
    right[:, 0] |= rng.random(n) < right_share  # at least that share of patches with a right first candidate
    Q[right] = (xyz[:, None] + rng.normal(0, noise_mm, (n, k, 3)))[right]
    return uv, Q, rng.random((n, k)), A


def test_fit_similarity_matches_scipy_and_the_formula():
    rng = np.random.default_rng(1)
    P = np.concatenate([rng.normal(0, 20, (5, 30, 2)), np.zeros((5, 30, 1))], 2)  # planar, as a section
    R = Rotation.random(5, random_state=2).as_matrix()
    s = rng.uniform(0.8, 1.2, 5)
    t = rng.normal(0, 30, (5, 3))
    Q = s[:, None, None] * np.einsum("bij,bnj->bni", R, P) + t[:, None] + rng.normal(0, 0.1, (5, 30, 3))
    w = rng.uniform(0.1, 1.0, (5, 30))
    s_f, R_f, t_f = fit_similarity(P, Q, w)
    assert np.allclose(np.linalg.det(R_f), 1.0)
    for b in range(5):  # SciPy's weighted Kabsch on the centred points gives the same rotation (on the plane)
        mp, mq = np.average(P[b], 0, w[b]), np.average(Q[b], 0, w[b])
        Rs, _ = Rotation.align_vectors(Q[b] - mq, P[b] - mp, weights=w[b])
        assert np.allclose(Rs.as_matrix() @ (P[b] - mp).T, R_f[b] @ (P[b] - mp).T, atol=1e-6)
        # the scale from the formula: sum w <R p, q> / sum w |p|^2 on centred points
        pc, qc = P[b] - mp, Q[b] - mq
        s_ref = (w[b] * ((pc @ R_f[b].T) * qc).sum(1)).sum() / (w[b] * (pc ** 2).sum(1)).sum()
        assert s_f[b] == pytest.approx(s_ref, rel=1e-9)
        assert np.allclose(t_f[b], mq - s_f[b] * R_f[b] @ mp)
    assert np.abs(s_f - s).max() < 0.01


def test_consistent_triples_pass_the_pairwise_test():
    rng = np.random.default_rng(3)
    p, q = rng.uniform(0, 100, (200, 2)), rng.uniform(0, 100, (200, 3))
    tri = consistent_triples(p, q, 300, np.random.default_rng(4), smin=0.8, smax=1.25, eps_mm=3.0, min_side_mm=8.0)
    assert len(tri) > 0
    for a, b in ((0, 1), (0, 2), (1, 2)):
        dp = np.linalg.norm(p[tri[:, a]] - p[tri[:, b]], axis=1)
        dq = np.linalg.norm(q[tri[:, a]] - q[tri[:, b]], axis=1)
        assert (dp >= 8.0).all() and (dq >= 0.8 * dp - 3).all() and (dq <= 1.25 * dp + 3).all()
    u, v = p[tri[:, 1]] - p[tri[:, 0]], p[tri[:, 2]] - p[tri[:, 0]]
    assert (np.abs(u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]) >= 32.0).all()  # off the line of the first two


def test_score_poses_counts_each_patch_once():
    rng = np.random.default_rng(5)
    P3 = np.column_stack([rng.uniform(0, 50, (40, 2)), np.zeros(40)])
    Q = rng.uniform(-10, 60, (40, 6, 3))
    s, R, t = np.array([1.0, 1.1]), Rotation.random(2, random_state=6).as_matrix(), rng.normal(0, 5, (2, 3))
    got = score_poses(s, R, t, P3, Q, 7.0)
    slow = [sum(any(np.linalg.norm(s[b] * R[b] @ P3[i] + t[b] - Q[i, j]) < 7.0 for j in range(6)) for i in range(40))
            for b in range(2)]
    assert got.tolist() == slow


def test_estimator_finds_what_a_brute_force_search_finds():
    uv, Q, S, A = _problem(12, 3, 0.5, seed=7)
    spacing = 64.0
    P3 = np.column_stack([uv * spacing / 1000, np.zeros(len(uv))])
    flat = Q.reshape(-1, 3)
    owner = np.repeat(np.arange(12), 3)
    best = 0
    for a, b, c in itertools.combinations(range(len(flat)), 3):  # every triple of correspondences
        if len({owner[a], owner[b], owner[c]}) < 3:
            continue
        s, R, t = fit_similarity(P3[owner[[a, b, c]]][None], flat[[a, b, c]][None])
        if 0.8 <= s[0] <= 1.25:
            best = max(best, int(score_poses(s, R, t, P3, Q, 5.0)[0]))
    pose = place_by_candidates(uv, spacing, Q, S, n_hyp=2048, n_score=12, seed=0)
    assert pose.support >= best
    assert plane_angle_deg(pose.A, A) < 3 and np.median(point_error_mm(pose.A, A, uv)) < 2


@pytest.mark.parametrize("right_share", [0.05, 0.02])
def test_estimator_survives_mostly_wrong_candidates(right_share):
    uv, Q, S, A = _problem(300, 20, right_share, seed=8)  # 95% and 98% wrong candidates
    pose = place_by_candidates(uv, 64.0, Q, S, n_hyp=2048, seed=1)
    assert plane_angle_deg(pose.A, A) < 2 and np.median(point_error_mm(pose.A, A, uv)) < 1.5
    assert pose.confidence > 3 and decide(pose) is None


def test_shuffled_candidates_are_refused():
    uv, Q, S, _ = _problem(300, 10, 0.05, seed=9)
    Q = Q[np.random.default_rng(0).permutation(300)]  # nothing left to agree on
    pose = place_by_candidates(uv, 64.0, Q, S, n_hyp=1024, seed=2)
    assert decide(pose) is not None


def test_refine_pose_recovers_from_a_nearby_start():
    uv, Q, S, A = _problem(200, 5, 0.5, noise_mm=0.5, seed=10)
    R = Rotation.from_euler("xyz", [95, 4, 160], degrees=True).as_matrix()
    start = Rotation.from_euler("z", 3, degrees=True).as_matrix() @ R
    P3 = np.column_stack([uv * 0.064, np.zeros(len(uv))])
    s, R2, t = refine_pose(P3, Q, 1.0, start, np.array([-58.0, -22.0, 12.0]))
    assert plane_angle_deg(pose_affine(s, R2, t, 0.064), A) < 0.5


def test_bad_candidates_are_refused():
    uv, Q, S, _ = _problem(20, 3, 0.5)
    with pytest.raises(DataError, match="candidates"):
        place_by_candidates(uv[:5], 64.0, Q, S)
    bad = Q.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="finite"):
        place_by_candidates(uv, 64.0, bad, S)
    with pytest.raises(DataError, match="spacing_um"):
        place_by_candidates(uv, -1.0, Q, S)
    with pytest.raises(DataError, match="at least 3"):
        place_by_candidates(uv[:2], 64.0, Q[:2], S[:2])


def test_decide_explains_refusals():
    pose = SectionPose(A=np.eye(3), scale=1.0, support=10, inliers=np.zeros(3, bool), match=np.zeros(3, int),
                       residual_mm=np.zeros(3), null_support=[8], hypotheses=1, seconds=0.0)
    assert "only 10 patches" in decide(pose)
    pose.support, pose.null_support = 30, [20]
    assert "shuffled" in decide(pose)
    pose.support = 40
    pose.null_support = [10]
    assert decide(pose) is None


def test_grid_patches_equal_extract_patch_in_bands():
    sec = FakeSection(0, 1, -18.0, 64.0, "pli", shape=(130, 170))
    sec.background = np.array([0.1, 0.2, 0.3], np.float32)
    rc = np.concatenate([image_grid(sec.shape, 9.5), [[0, 0], [129, 169], [3, 168]]])
    got = grid_patches(sec, rc, 16, band_px=37)  # bands that cut through patches
    ref = np.stack([extract_patch(sec, p, 16) for p in rc])
    assert np.array_equal(got, ref)


def test_reanchor_ranks_by_similarity_inside_the_window():
    frame_xyz = np.array([[0.0, 0, 0], [3, 0, 0], [30, 0, 0]])
    frame_feats = np.array([[1.0, 0], [0, 1], [1, 0]], np.float32)
    A = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 0]])  # pixel (r, c) -> (r, c, 0) mm
    q = np.array([[0, 1], [0, 1]], np.float32)
    got = reanchor(A, np.array([[0.5, 0.0], [60.0, 0.0]]), q, frame_feats, frame_xyz, radius_mm=8.0)
    assert got.tolist() == [1, 2]  # the similar one in the window; the nearest when the window is empty


def test_cortex_head_fits_predicts_and_round_trips():
    rng = np.random.default_rng(11)
    y = rng.random(400) < 0.2
    X = rng.normal(0, 1, (400, 5)) + y[:, None] * 2.0
    head = CortexHead.fit(X, y)
    p = head.probability(X)
    assert ((p > 0.5) == y).mean() > 0.9
    again = CortexHead.from_dict(head.to_dict())
    assert np.allclose(again.probability(X), p)
    with pytest.raises(DataError, match="both on and off"):
        CortexHead.fit(X, np.ones(400, bool))
    with pytest.raises(DataError, match="inputs"):
        head.probability(X[:, :3])
    with pytest.raises(DataError, match="cortex head"):
        CortexHead.from_dict({"coef": [1.0]}, file="head.json")


def test_hubness_sees_a_hub():
    from cytoclr.section_inference import hubness
    rng = np.random.default_rng(12)
    even = hubness(rng.permutation(np.tile(np.arange(1000), 5)).reshape(-1, 10), 1000)
    assert abs(even["skewness"]) < 1e-9 and even["top1pct_share"] == pytest.approx(0.01)
    lists = rng.integers(0, 1000, (500, 10))
    lists[:, 0] = 7  # one frame patch is everyone's first candidate
    hub = hubness(lists, 1000)
    assert hub["skewness"] > 10 and hub["top1pct_share"] > 0.1 and hub["max_over_mean"] > 50
