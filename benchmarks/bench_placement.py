"""Placing a section from its patches' top-k candidates, 95-99% of them wrong: cytoclr's `place_by_candidates` vs
top-1 RANSAC, scikit-image's RANSAC, Open3D's correspondence RANSAC and TEASER++, on the same candidate sets.

Input (`synthetic_candidates`, the idea of chapter 10b's tests): n patch centres on a 128 mm square section at 64 um
per pixel, placed in the reference by a random similarity (a random 3D rotation, which covers both mirror images of
the section, and a scale in [0.9, 1.1]); each patch has k candidates, each of them right (its true position plus 1 mm
gaussian noise per axis) with probability `1 - wrong`, else uniform over a brain-sized box; a patch's first candidate
is right with about twice that probability (it is the most similar one). Every method gets the same candidates:
- cytoclr `place_by_candidates` (ours): all n*k candidates, tau 5 mm, its defaults (one search on shuffled candidates
  for the confidence included; the same search without it is timed too: same pose, less time).
- cytoclr `fit_affine_ransac`: today's chapter-10 estimator, an affine RANSAC on each patch's first candidate.
- scikit-image `measure.ransac` with a 3D `SimilarityTransform` (the section's points in mm at z = 0), the same
  5 mm threshold and the same shrinkage prior (scale in [0.8, 1.25], `is_model_valid`), on the top-1 pairs and on all
  n*k pairs (it has no sample weights: every pair is drawn uniformly). It refits on its inliers. Its Python loop
  scores every pair in every trial: max_trials = min(20,000, 4e7 / pairs), 1,000 on 40,000 pairs (20,000 trials there
  take several minutes on this machine; `--skimage-evals 8e8` lifts the budget).
- Open3D `registration_ransac_based_on_correspondence` with `TransformationEstimationPointToPoint(with_scaling=True)`,
  ransac_n = 3, the edge-length checker at 0.8 (the same shrinkage prior) and the distance checker at 5 mm; source =
  the section's points in mm at z = 0, target = the candidates, corres = (patch, candidate). Both mirror images of the
  section are tried (one in-plane axis negated) and the better fitness kept; then one least-squares similarity refit
  on the pairs within 5 mm (Open3D returns its best minimal sample). A best sample whose scale is outside the prior
  counts as a failure (a sample that draws one pair three times passes both checkers and collapses the section to a
  point: fitness 1). Open3D scores a hypothesis by the share of source points with ANY target point within the
  distance (a point-cloud fitness), not by the given pairs. Variant: the same RANSAC rigid (with_scaling=False: no
  collapse), then the similarity refit.
- TEASER++ (`teaserpp_python`): scale by TLS, max clique on pairwise-consistent pairs, GNC-TLS rotation; both mirror
  images, the larger max clique kept; noise_bound 3 mm (the right candidates' noise is 1 mm per axis). It takes no
  scale prior. Its pairwise graph is quadratic in the pairs: above `--teaser-max-pairs` (2,000) it is not run (said
  so; 6,000 pairs take about 40 s).
Optional peers that do not import are skipped with a message: Open3D (`pip install -e '.[bench]'`) and TEASER++
(`pip install -e '.[bench-teaser]'`, a source build that needs access to GitHub).

Per method: placed (a pose returned, not refused), right (placed, with a median point error under 5 mm), inlier recall
(share of the right candidates within 5 mm of where the pose puts their patch), plane error (degrees between the fitted
and the true section plane), median point error (mm, over the patches), seconds, and the ratios of time and point error
to ours. One run; `--repeats r` draws r problems per setting and prints medians. Every method runs with its default
threads; other processes may share the CPU (the load average is printed): compare within one run.
    python benchmarks/bench_placement.py [--sizes 2000x20 300x20] [--wrong 0.95 0.98 0.99] [--repeats 1]
"""
import argparse
import os
import statistics
import time
import warnings

import numpy as np
import skimage
from scipy.spatial.transform import Rotation
from skimage.measure import ransac
from skimage.transform import SimilarityTransform

from cytoclr.alignment import BRAIN_BOX_MM, fit_affine_ransac, plane_angle_deg, point_error_mm
from cytoclr.core import DataError
from cytoclr.section_inference import place_by_candidates, pose_affine

try:  # optional peers: the benchmark runs without them
    import open3d as o3d
    O3D_ERROR = None
except ImportError as e:
    o3d, O3D_ERROR = None, f"{type(e).__name__}: {e}"
try:
    import teaserpp_python
    TEASER_ERROR = None
except ImportError as e:
    teaserpp_python, TEASER_ERROR = None, f"{type(e).__name__}: {e}"

class NotRun(Exception):
    "A peer that is not run on an input (too large for it)."


SHRINKAGE = (0.8, 1.25)  # the scale prior every method gets (reference mm per section mm)


def synthetic_candidates(n: int, k: int, wrong: float, noise_mm: float = 1.0, spacing_um: float = 64.0,
                         side_px: int = 2000, seed: int = 0) -> dict:
    """A section's patches with k candidates each, a share `wrong` of them wrong: uv (n, 2) px, cand (n, k, 3) mm,
    sim (n, k) (most similar first), right (n, k) bool, the true affine A (3, 3) and `spacing_um`."""
    rng = np.random.default_rng(seed)
    uv = rng.uniform(0, side_px, (n, 2))
    lo, hi = np.array(BRAIN_BOX_MM).T
    s, R = rng.uniform(0.9, 1.1), Rotation.random(random_state=rng).as_matrix()
    mm = spacing_um / 1000
    centre = lo + (hi - lo) * rng.uniform(0.4, 0.6, 3)  # where the section's centre lands
    A = pose_affine(s, R, centre - s * R[:, :2] @ np.full(2, side_px * mm / 2), mm)
    xyz = uv @ A[:, :2].T + A[:, 2]  # (n, 3) true positions
    right = rng.random((n, k)) < 1 - wrong
    right[:, 0] |= rng.random(n) < 1 - wrong  # the most similar candidate is right about twice as often
    cand = rng.uniform(lo, hi, (n, k, 3))
    cand[right] = (xyz[:, None] + rng.normal(0, noise_mm, (n, k, 3)))[right]
    sim = -np.sort(-rng.random((n, k)), axis=1)
    return {"uv": uv, "cand": cand, "sim": sim, "right": right, "A": A, "spacing_um": spacing_um}


def scores(A, prob: dict, tau_mm: float) -> dict:
    "Inlier recall, plane error (deg) and median point error (mm) of an affine A (3, 3) against the truth."
    uv, cand, right = prob["uv"], prob["cand"], prob["right"]
    pred = uv @ A[:, :2].T + A[:, 2]  # (n, 3)
    near = np.linalg.norm(pred[:, None] - cand, axis=2) < tau_mm  # (n, k)
    return {"recall": float((near & right).sum() / right.sum()), "plane_deg": plane_angle_deg(A, prob["A"]),
            "point_mm": float(np.median(point_error_mm(A, prob["A"], uv)))}


def _points_mm(prob):
    "The section's patch centres in mm at z = 0 (n, 3): what the 3D peers register."
    return np.column_stack([prob["uv"] * prob["spacing_um"] / 1000, np.zeros(len(prob["uv"]))])


def _pairs(prob, top1: bool):
    "(patch index (m,), candidate positions (m, 3)) of the top-1 pairs or of all n*k pairs."
    cand = prob["cand"]
    if top1:
        return np.arange(len(cand)), cand[:, 0]
    return np.repeat(np.arange(len(cand)), cand.shape[1]), cand.reshape(-1, 3)


def _affine(M, mirror, spacing_um):
    "The pixel affine (3, 3) of a 3D map x -> M[:3, :3] @ diag(1, mirror, 1) p + M[:3, 3] of points p in mm at z = 0."
    L = np.asarray(M)[:3, :3] * np.array([1.0, mirror, 1.0])
    A = np.empty((3, 3))
    A[:, :2] = L[:, :2] * spacing_um / 1000
    A[:, 2] = np.asarray(M)[:3, 3]
    return A


def run_ours(prob, a, seed, null_runs=1):
    pose = place_by_candidates(prob["uv"], prob["spacing_um"], prob["cand"], prob["sim"], tau_mm=a.tau,
                               shrinkage=SHRINKAGE, null_runs=null_runs, seed=seed)
    note = f"support {pose.support}" + (f", confidence {pose.confidence:.1f}" if null_runs else "")
    return pose.A, note


def run_top1_ransac(prob, a, seed):
    A, inl = fit_affine_ransac(prob["uv"], prob["cand"][:, 0], a.tau, spacing_um=prob["spacing_um"],
                               shrinkage=SHRINKAGE, seed=seed)
    return A, f"{int(inl.sum())} inliers"


def run_skimage(prob, a, seed, top1):
    P = _points_mm(prob)
    owner, Q = _pairs(prob, top1)

    def plausible(model, src, dst):  # the shrinkage prior every method gets
        return SHRINKAGE[0] <= model.scale <= SHRINKAGE[1]

    trials = int(min(a.skimage_trials, a.skimage_evals / len(Q)))  # its Python loop scores every pair per trial
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Estimated model is not valid": the failure shows in the table
        model, inl = ransac((P[owner], Q), SimilarityTransform, 3, a.tau, is_model_valid=plausible,
                            max_trials=trials, stop_probability=a.confidence, rng=seed)
    if not model:
        raise RuntimeError(f"no model in {trials} trials")
    return _affine(model.params, 1.0, prob["spacing_um"]), f"{int(inl.sum())} inlier pairs, max_trials {trials}"


def run_open3d(prob, a, seed, top1, scaling=True):
    reg = o3d.pipelines.registration
    P = _points_mm(prob)
    owner, Q = _pairs(prob, top1)
    target = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(Q))
    corres = o3d.utility.Vector2iVector(np.column_stack([owner, np.arange(len(Q))]).astype(np.int32))
    est = reg.TransformationEstimationPointToPoint(with_scaling=scaling)
    checkers = [reg.CorrespondenceCheckerBasedOnEdgeLength(SHRINKAGE[0]),
                reg.CorrespondenceCheckerBasedOnDistance(a.tau)]
    found = []
    for mirror in (1.0, -1.0):  # both mirror images of the section
        source = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(P * np.array([1.0, mirror, 1.0])))
        o3d.utility.random.seed(seed)
        res = reg.registration_ransac_based_on_correspondence(source, target, corres, a.tau, est, 3, checkers,
                                                              reg.RANSACConvergenceCriteria(a.o3d_iterations,
                                                                                            a.confidence))
        scale = float(np.cbrt(np.linalg.det(np.asarray(res.transformation)[:3, :3])))
        found.append((res.fitness, scale, mirror, source, np.asarray(res.transformation)))
    ok = [f for f in found if SHRINKAGE[0] <= f[1] <= SHRINKAGE[1]]
    if not ok:  # e.g. a sample drawing one pair three times passes both checkers and collapses the section (scale 0)
        raise RuntimeError("implausible best sample: " + ", ".join(f"mirror {m:+.0f} scale {sc:.2f} fitness {fi:.3f}"
                                                                    for fi, sc, m, _, _ in found))
    fitness, _, mirror, source, T = max(ok, key=lambda f: f[0])
    X = (np.asarray(source.points) @ T[:3, :3].T + T[:3, 3])[owner]  # (m, 3) each pair's source point, moved
    inl = np.linalg.norm(X - Q, axis=1) < a.tau
    if inl.sum() >= 3:  # one least-squares similarity refit on the pairs within tau (Open3D returns its best sample)
        T = reg.TransformationEstimationPointToPoint(with_scaling=True).compute_transformation(
            source, target, o3d.utility.Vector2iVector(np.asarray(corres)[inl].astype(np.int32)))
    return _affine(T, mirror, prob["spacing_um"]), f"fitness {fitness:.3f}, {int(inl.sum())} pairs within tau"


def run_teaser(prob, a, seed, top1):
    P = _points_mm(prob)
    owner, Q = _pairs(prob, top1)
    if len(Q) > a.teaser_max_pairs:
        raise NotRun(f"not run: {len(Q)} pairs > --teaser-max-pairs {a.teaser_max_pairs} (its pairwise graph "
                           f"needs {len(Q) * (len(Q) - 1) // 2:.2e} pairs)")
    params = teaserpp_python.RobustRegistrationSolver.Params()
    params.noise_bound = a.teaser_noise
    params.cbar2 = 1.0
    params.estimate_scaling = True
    solver_cls = teaserpp_python.RobustRegistrationSolver
    params.rotation_estimation_algorithm = solver_cls.ROTATION_ESTIMATION_ALGORITHM.GNC_TLS
    params.rotation_gnc_factor = 1.4
    params.rotation_max_iterations = 100
    params.rotation_cost_threshold = 1e-12
    params.max_clique_time_limit = a.teaser_time_limit
    best = None
    for mirror in (1.0, -1.0):
        solver = solver_cls(params)
        solver.solve(np.ascontiguousarray((P[owner] * np.array([1.0, mirror, 1.0])).T), np.ascontiguousarray(Q.T))
        sol, clique = solver.getSolution(), len(solver.getInlierMaxClique())
        if best is None or clique > best[0]:
            M = np.eye(4)
            M[:3, :3], M[:3, 3] = sol.scale * np.asarray(sol.rotation), np.asarray(sol.translation).ravel()
            best = (clique, mirror, M)
    clique, mirror, M = best
    return _affine(M, mirror, prob["spacing_um"]), f"max clique {clique}, scale {np.linalg.norm(M[:3, 0]):.3f}"


def methods(a) -> list:
    "(name, pairs ('all' or 'top-1'), function or the reason it is skipped)."
    out = [("cytoclr place_by_candidates (ours)", "all", run_ours),
           ("  ours, without the null run", "all", lambda p, a, s: run_ours(p, a, s, null_runs=0)),
           ("cytoclr fit_affine_ransac (today)", "top-1", run_top1_ransac)]
    for top1 in (True, False):
        out.append(("skimage measure.ransac", "top-1" if top1 else "all",
                    lambda p, a, s, t=top1: run_skimage(p, a, s, t)))
    rigid = lambda p, a, s, t: run_open3d(p, a, s, t, scaling=False)
    for name, err, f in (("open3d corres. RANSAC", O3D_ERROR, run_open3d),
                         ("  open3d rigid, similarity refit", O3D_ERROR, rigid),
                         ("TEASER++", TEASER_ERROR, run_teaser)):
        for top1 in (True, False):
            out.append((name, "top-1" if top1 else "all", err or (lambda p, a, s, t=top1, f=f: f(p, a, s, t))))
    return out


def run_case(prob, a, seed) -> dict:
    "Every method on one problem: name -> {placed, recall, plane_deg, point_mm, seconds, note}."
    out = {}
    for name, pairs, f in methods(a):
        key = f"{name} [{pairs}]"
        if isinstance(f, str):
            out[key] = {"skipped": f"skipped: {f}"}
            continue
        t0 = time.perf_counter()
        try:
            A, note = f(prob, a, seed)
            rec = {"placed": True, **scores(A, prob, a.tau), "note": note}
        except NotRun as e:
            out[key] = {"skipped": str(e)}
            continue
        except (DataError, RuntimeError, ValueError, np.linalg.LinAlgError) as e:
            rec = {"placed": False, "note": getattr(e, "message", str(e))}
        rec["seconds"] = time.perf_counter() - t0
        out[key] = rec
    return out


def _median(recs, q):
    vals = [r[q] for r in recs if r.get("placed")]
    return statistics.median(vals) if vals else float("nan")


def print_table(title, runs, tau_mm):
    "One table: rows = methods, medians over the repeats, ratios to ours (first row); right: median error < tau_mm."
    print(title, flush=True)
    print(f"  {'method':<36}{'pairs':>6}{'placed':>8}{'right':>7}{'recall':>8}{'plane deg':>11}{'point mm':>10}"
          f"{'time s':>9}{'time/ours':>11}{'point/ours':>12}  note")
    keys = list(runs[0])
    ours = keys[0]
    t_ours = statistics.median(r[ours]["seconds"] for r in runs)
    p_ours = _median([r[ours] for r in runs], "point_mm")
    for key in keys:
        recs = [r[key] for r in runs]
        name, pairs = key.rsplit(" [", 1)
        if "skipped" in recs[0]:
            print(f"  {name:<36}{pairs[:-1]:>6}  {recs[0]['skipped']}")
            continue
        placed = sum(r["placed"] for r in recs)
        right = sum(r["placed"] and r["point_mm"] < tau_mm for r in recs)
        t = statistics.median(r["seconds"] for r in recs)
        p = _median(recs, "point_mm")
        print(f"  {name:<36}{pairs[:-1]:>6}{placed:>5}/{len(recs):<2}{right:>4}/{len(recs):<2}"
              f"{_median(recs, 'recall'):>8.3f}"
              f"{_median(recs, 'plane_deg'):>11.2f}{p:>10.2f}{t:>9.2f}{t / t_ours:>10.2f}x{p / p_ours:>11.2f}x  "
              f"{recs[-1]['note']}", flush=True)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["2000x20", "300x20"], help="patches x candidates per patch")
    ap.add_argument("--wrong", nargs="+", type=float, default=[0.95, 0.98, 0.99], help="shares of wrong candidates")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tau", type=float, default=5.0, help="inlier distance, mm, for every method")
    ap.add_argument("--noise", type=float, default=1.0, help="mm per axis on the right candidates")
    ap.add_argument("--confidence", type=float, default=0.999, help="RANSAC stopping confidence (skimage, Open3D)")
    ap.add_argument("--skimage-trials", type=int, default=20_000, help="skimage's max_trials")
    ap.add_argument("--skimage-evals", type=float, default=4e7,
                    help="skimage's budget: max_trials = min(--skimage-trials, this / pairs)")
    ap.add_argument("--o3d-iterations", type=int, default=1_000_000, help="Open3D's max_iteration")
    ap.add_argument("--teaser-noise", type=float, default=3.0, help="TEASER++'s noise_bound, mm")
    ap.add_argument("--teaser-max-pairs", type=int, default=2000, help="above: not run (6000 pairs take ~40 s)")
    ap.add_argument("--teaser-time-limit", type=float, default=60.0, help="TEASER++'s max clique time limit, s")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    print(f"numpy {np.__version__}, scikit-image {skimage.__version__}, "
          f"open3d {o3d.__version__ if o3d else 'not installed'}, "
          f"TEASER++ {'installed' if teaserpp_python else 'not installed'}; {os.cpu_count()} CPUs, default threads; "
          f"load average {os.getloadavg()[0]:.1f} (other processes share the CPU: compare within this run)", flush=True)
    for name, err in (("Open3D", O3D_ERROR), ("TEASER++", TEASER_ERROR)):
        if err:
            print(f"{name} is skipped: it does not import ({err}); see this file's docstring")
    t_all = time.perf_counter()
    for size in a.sizes:
        n, k = (int(x) for x in size.lower().split("x"))
        for wrong in a.wrong:
            runs, probs = [], []
            for r in range(a.repeats):
                prob = synthetic_candidates(n, k, wrong, a.noise, seed=a.seed + r)
                probs.append(prob)
                runs.append(run_case(prob, a, a.seed + r))
            right = np.mean([p["right"].mean() for p in probs])
            top1 = np.mean([p["right"][:, 0].mean() for p in probs])
            anyr = np.mean([p["right"].any(1).mean() for p in probs])
            scale = statistics.median(np.linalg.norm(p["A"][:, 0]) * 1000 / p["spacing_um"] for p in probs)
            print_table(f"\n{n} patches x {k} candidates, {100 * wrong:g}% wrong: {100 * right:.1f}% of all candidates "
                        f"right, {100 * top1:.1f}% of first candidates, {100 * anyr:.0f}% of patches with one; true "
                        f"scale {scale:.3f}; {a.repeats} problem(s)", runs, a.tau)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
