"""Robust affine fit of a section, 4,000 pairs with 70% wrong matches: cytoclr's RANSAC vs skimage.measure.ransac.

Same input for both: `synthetic_pairs` (pixels (row, col) -> reference mm, 0.7 mm gaussian noise on the right
matches, wrong matches uniform over a brain-sized box). Same model (xyz = A @ [u, v, 1], fitted exactly on 3
pairs: for skimage a small model class whose `estimate` is least squares on the sample), the same 3 mm
threshold, the same stopping rule (skimage's `stop_probability` = our `confidence`, the same `max_trials`), and
skimage's refit of the model on the inliers of its best sample. Ours draws and scores hypotheses in batches and
refines the fit until the inlier set is stable; skimage loops over hypotheses in Python. Both run with one BLAS
thread (our default `blas_threads=1`; skimage's small products are single-threaded anyway).
Prints the median of interleaved repeats (other processes may share the CPU; each repeat uses a new seed for
both), the ratio (goal: ours >= 3x faster) and how far the two inlier sets agree (goal: >= 99% of pairs), with
skimage's set taken as the inliers of its refitted model (its returned mask, the inliers of its best minimal
sample, is reported too).
    .venv/bin/python benchmarks/bench_alignment.py [--n 4000] [--outliers 0.7] [--repeats 7]
"""
import argparse
import statistics
import time

import numpy as np
import skimage
from skimage.measure import ransac
from threadpoolctl import threadpool_limits

from cytoclr.alignment import affine_residuals, point_error_mm, ransac_affine, synthetic_pairs


class AffineFrom2D:
    "skimage model: xyz (n, 3) = [u, v, 1] @ X from pixels (n, 2), least squares; counts its estimates."
    calls = 0

    def __init__(self, X=None):
        self.X = X  # (3, 3) = A.T

    @classmethod
    def from_estimate(cls, src, dst):
        cls.calls += 1
        H = np.column_stack([src, np.ones(len(src))])  # (m, 3)
        X, _, rank, _ = np.linalg.lstsq(H, dst, rcond=None)
        return cls(X) if rank == 3 else None  # a falsy model: skimage skips the sample

    def estimate(self, src, dst):  # the pre-0.26 protocol, for older skimage
        m = self.from_estimate(src, dst)
        self.X = None if m is None else m.X
        return m is not None

    def residuals(self, src, dst):
        return np.linalg.norm(np.column_stack([src, np.ones(len(src))]) @ self.X - dst, axis=1)  # (n,)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--outliers", type=float, default=0.7)
    ap.add_argument("--noise", type=float, default=0.7, help="mm, per coordinate, on the right matches")
    ap.add_argument("--threshold", type=float, default=3.0, help="inlier threshold, mm")
    ap.add_argument("--confidence", type=float, default=0.999)
    ap.add_argument("--max-trials", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    uv, xyz, A_true, truth = synthetic_pairs(a.n, a.outliers, a.noise, seed=0)

    def ours(seed):  # fit_affine_ransac is ransac_affine without the diagnostics
        fit = ransac_affine(uv, xyz, a.threshold, confidence=a.confidence, max_trials=a.max_trials, seed=seed)
        ours.trials.append(fit.trials)
        return fit.A, fit.inliers, fit.inliers

    ours.trials = []

    def theirs(seed):
        model, inl = ransac((uv, xyz), AffineFrom2D, 3, a.threshold, max_trials=a.max_trials,
                            stop_probability=a.confidence, rng=seed)
        A = model.X.T
        return A, affine_residuals(A, uv, xyz) < a.threshold, inl  # inliers of the refit; of the best sample

    blas = threadpool_limits(1, user_api="blas")  # for both, outside the timed region
    ours(100), theirs(100)  # warm-up (not counted: ours.trials[0])
    t_o, t_t, agree, agree_raw, rows = [], [], [], [], {"cytoclr": [], "skimage": []}
    calls = []
    for r in range(a.repeats):
        for name, f, ts in (("cytoclr", ours, t_o), ("skimage", theirs, t_t)):
            AffineFrom2D.calls = 0
            t0 = time.perf_counter()
            out = f(r)
            ts.append(time.perf_counter() - t0)
            rows[name].append(out)
            if name == "skimage":
                calls.append(AffineFrom2D.calls - 1)  # trials (minus the final refit)
        (_, inl_o, _), (_, inl_t, raw_t) = rows["cytoclr"][-1], rows["skimage"][-1]
        agree.append(float((inl_o == inl_t).mean()))
        agree_raw.append(float((inl_o == raw_t).mean()))
    blas.restore_original_limits()

    def quality(name):
        A, inl, _ = rows[name][0]
        tp = (inl & truth).sum()
        return (f"recall {tp / truth.sum():.4f}, precision {tp / max(inl.sum(), 1):.4f}, "
                f"median point error {np.median(point_error_mm(A, A_true, uv)):.3f} mm")

    mo, mt = statistics.median(t_o), statistics.median(t_t)
    print(f"{a.n} pairs, {100 * a.outliers:.0f}% outliers, noise {a.noise} mm, threshold {a.threshold} mm, "
          f"confidence {a.confidence}, max_trials {a.max_trials}, {a.repeats} repeats; numpy {np.__version__}, "
          f"scikit-image {skimage.__version__}")
    print(f"cytoclr fit_affine_ransac   : median {1e3 * mo:7.1f} ms  (min {1e3 * min(t_o):.1f})  {quality('cytoclr')}"
          f"  (median {statistics.median(ours.trials[1:]):.0f} trials)")
    print(f"skimage measure.ransac      : median {1e3 * mt:7.1f} ms  (min {1e3 * min(t_t):.1f})  {quality('skimage')}"
          f"  (median {statistics.median(calls):.0f} trials)")
    print(f"ratio (skimage / ours): {mt / mo:.2f}x  (goal >= 3x)")
    print(f"inlier sets agree on {100 * min(agree):.2f}% of pairs at worst, {100 * statistics.median(agree):.2f}% median "
          f"(skimage: inliers of its refit; goal >= 99%); against skimage's returned mask (its best minimal sample): "
          f"{100 * statistics.median(agree_raw):.2f}% median")


if __name__ == "__main__":
    main()
