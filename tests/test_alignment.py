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


# ---------------------------------------------------------------- a section nobody has registered: cytoclr anchor
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    "A phantom section exported as a tiled TIFF with its mask, a seeded encoder checkpoint and its frame of that section."
    import torch
    from cytoclr.anchoring import Frame, encoder_space
    from cytoclr.models import embed
    from cytoclr.sampling import extract_patch, mask_grid
    from cytoclr.sections import export_phantom, load_manifest
    from cytoclr.training import TrainConfig, checkpoint_path, train
    from cytoclr.alignment import encoder_from_checkpoint
    d = tmp_path_factory.mktemp("anchor")
    man_path = export_phantom(d / "export", brains=1, sections=1, spacing_um=256.0, modality="nissl", format="tiff",
                              positions=[-18.0], progress=False)
    man = load_manifest(man_path)
    e = man.entries[0]
    sec = man.section(e.id)
    for mod, seed in (("nissl", 0), ("pli", 0), ("nissl", 7)):
        train(TrainConfig(method="random", modality=mod, seed=seed, proj_hidden=16, proj_dim=8), None, d / f"run_{mod}_{seed}",
              progress=False, write_metrics=False)
    enc, _ = encoder_from_checkpoint(checkpoint_path(d / "run_nissl_0", "nissl", "random"))
    rc = mask_grid(sec, 2.0)
    patches = np.stack([extract_patch(sec, p, 16) for p in rc])
    feats = embed(enc, patches)
    xyz = sec.to_reference(rc)
    fr = Frame(xyz=xyz, hemi=np.zeros(len(rc), np.int8), section=np.zeros(len(rc), np.int64), rc=rc,
               brain=np.array(["phantom-0"] * len(rc)), section_ids=[e.id], features=feats,
               space=encoder_space(enc, "nissl", "random"), meta={"patch_px": 16})
    fr.save(d / "frame")
    mask = man_path.parent / "phantom-0" / "nissl_000_mask.tif"
    return dict(d=d, image=e.path, mask=mask, affine=e.affine, n=len(rc))


def _cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "cytoclr", "anchor", *map(str, args)], capture_output=True, text=True)


def test_anchor_places_an_exported_tiff_without_its_transform(exported):
    "The command's path end to end: identical patches in the frame, so the plane must come out right."
    import json
    import yaml
    d = exported["d"]
    r = _cli(exported["image"], "--modality", "nissl", "--spacing-um", 256, "--checkpoint",
             d / "run_nissl_0" / "checkpoints" / "nissl" / "random", "--frame", d / "frame", "--mask", exported["mask"],
             "--out", d / "out", "--grid-mm", 2, "--min-inliers", 6, "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "placed;" in r.stdout and "Traceback" not in r.stderr
    out = d / "out" / "nissl_000"
    info = json.loads((out / "affine.json").read_text())
    A = np.array(info["affine"])
    assert plane_angle_deg(A, exported["affine"]) < 1.0
    assert np.median(point_error_mm(A, exported["affine"], np.array([[0, 0], [300, 400], [600, 100]]))) < 1.0
    assert info["inliers"] >= 6 and 0 < info["inlier_share"] <= 1
    rows = (out / "matches.csv").read_text().splitlines()
    assert rows[0] == "row,col,x,y,z,similarity,inlier" and len(rows) == exported["n"] + 1
    entry = yaml.safe_load((out / "manifest_entry.yml").read_text())["sections"][0]
    assert entry["modality"] == "nissl" and np.allclose(entry["transform"]["affine"], A, atol=1e-5)
    assert (out / "figures" / "placed.png").stat().st_size > 1000


def test_anchor_refuses_bad_input_with_a_message(exported, tmp_path):
    d = exported["d"]
    base = ["--spacing-um", 256, "--frame", d / "frame", "--out", tmp_path / "o", "--grid-mm", 2, "--no-progress"]
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\0garbage")
    cases = [
        ([bad, "--modality", "nissl", "--checkpoint", d / "run_nissl_0/checkpoints/nissl/random", *base], "broken.tif"),
        ([exported["image"], "--modality", "nissl", "--checkpoint", d / "run_pli_0/checkpoints/pli/random", *base],
         "is a pli encoder"),
        ([exported["image"], "--modality", "nissl", "--checkpoint", d / "run_nissl_7/checkpoints/nissl/random", *base],
         "another encoder"),
        ([exported["image"], "--modality", "nissl", "--spacing-um", 256, "--out", tmp_path / "o"], "--run RUN"),
    ]
    for args, phrase in cases:
        r = _cli(*args)
        assert r.returncode == 2, (phrase, r.stdout, r.stderr)
        assert phrase in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_series_consistency():
    from cytoclr.alignment import series_consistency
    mk = lambda n, c: {"normal": n, "centre_mm": c}
    ok = series_consistency([mk([0, 1, 0], [0, -10, 0]), mk([0, 1, 0.02], [0, -5, 0]), mk([0, -1, 0], [0, 0, 0])])
    assert ok["consistent"]
    assert not series_consistency([mk([0, 1, 0], [0, -10, 0]), mk([0, 1, 0], [0, 5, 0]), mk([0, 1, 0], [0, 0, 0])])["consistent"]
    assert not series_consistency([mk([0, 1, 0], [0, 0, 0]), mk([1, 1, 0], [0, 5, 0])])["consistent"]
