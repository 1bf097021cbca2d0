"""Cosine top-k: cytoclr's exact `cosine_topk` and approximate `ApproxIndex` vs faiss's exact `IndexFlatIP`, one run.

Default input (as issue 21 states it): 10^5 frame x 10^4 queries x 128 dims, k = 10, random Gaussian vectors
L2-normalised in float32 (so inner product = cosine). Embeddings have structure that an approximate index can use
and Gaussian vectors have none: `--data clustered` draws them around 1000 unit centres (per-dimension noise 0.1),
`--data manifold` from a 16-dimensional Gaussian through one random linear map to `--dim`, plus noise (0.5 per
dimension). The same input goes to:
- ours, exact: `cosine_topk(queries, frame, k)` (normalises the rows again, gets k + 16 candidates per query from
  faiss's exact search, re-scores them exactly and breaks ties by the lower frame index);
- faiss, exact: `IndexFlatIP(d)`, `add(frame)`, `search(queries, k)` (building the flat index, a copy, is inside
  its timed region as normalising is inside ours);
- ours, approximate: `ApproxIndex(frame)` (faiss IVF-Flat, seeded; built once, its build time printed apart),
  `search(queries, k)` timed; its recall@k against the exact search (`topk_recall`) and the share of queries whose
  whole top-k is exact (`topk_agreement`) are printed.
- with `--torch`, also ours without faiss (the torch matrix product and `torch.topk`: the path before faiss);
- with `--hnsw`, also faiss's graph index `IndexHNSWFlat(d, 32, METRIC_INNER_PRODUCT)`, the alternative to IVF,
  built on one thread (its graph depends on the insertion order: one thread is what makes it deterministic),
  searched with `--ef` (efSearch); its build time, search time and recall@k are printed beside IVF's.
Everything uses as many threads as torch (`faiss.omp_set_num_threads(torch.get_num_threads())`). Repeats alternate
between the searches (other processes may share the CPU); medians and ratios are printed (goal: ours exact <= 1.2x
faiss exact; the ratio of the fastest repeats too, which other processes move less), and the share of queries whose top-k lists agree between ours and faiss (swaps among similarities equal
within 1e-6 allowed; goal: all).
    python benchmarks/bench_topk.py [--frame 100000] [--queries 10000] [--dim 128] [--k 10] [--repeats 3]
                                    [--data gaussian|clustered|manifold] [--nlist N] [--nprobe N] [--torch] [--hnsw --ef 64]
"""
import argparse
import statistics
import time

import faiss
import numpy as np
import torch

from cytoclr import core
from cytoclr.core import ApproxIndex, cosine_topk, topk_agreement, topk_recall


def unit_rows(x):
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_input(a, rng):
    "(frame (n, d), queries (q, d)) float32 unit rows."
    if a.data == "gaussian":
        return (unit_rows(rng.standard_normal((a.frame, a.dim), dtype=np.float32)),
                unit_rows(rng.standard_normal((a.queries, a.dim), dtype=np.float32)))
    if a.data == "manifold":
        lift = rng.standard_normal((16, a.dim))  # (16, d) one random linear map
        near = lambda m: rng.standard_normal((m, 16)) @ lift + 0.5 * rng.standard_normal((m, a.dim))
    else:
        centres = unit_rows(rng.standard_normal((1000, a.dim)))
        near = lambda m: centres[rng.integers(0, 1000, m)] + 0.1 * rng.standard_normal((m, a.dim))
    return unit_rows(near(a.frame)), unit_rows(near(a.queries))


def build_hnsw(frame, threads):
    "faiss's HNSW graph of the frame, built on one thread (deterministic); searches use `threads` again."
    index = faiss.IndexHNSWFlat(frame.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    faiss.omp_set_num_threads(1)
    index.add(frame)
    faiss.omp_set_num_threads(threads)
    return index


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frame", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", choices=("gaussian", "clustered", "manifold"), default="gaussian")
    ap.add_argument("--nlist", type=int, default=None, help="ApproxIndex lists (default: its own, 4 sqrt(n))")
    ap.add_argument("--nprobe", type=int, default=None, help="ApproxIndex lists probed (default: nlist / 16)")
    ap.add_argument("--torch", action="store_true", help="also time ours without faiss (torch's product)")
    ap.add_argument("--hnsw", action="store_true", help="also time faiss's HNSW index (built on one thread)")
    ap.add_argument("--ef", type=int, default=64, help="HNSW efSearch")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    frame, queries = make_input(a, rng)
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)

    def ours(q=queries):
        return cosine_topk(q, frame, a.k)  # (indices, similarities)

    def ours_torch(q=queries):
        saved, core._FAISS_MIN_QUERIES = core._FAISS_MIN_QUERIES, float("inf")  # the path without faiss
        try:
            return cosine_topk(q, frame, a.k)
        finally:
            core._FAISS_MIN_QUERIES = saved

    def theirs(q=queries):
        index = faiss.IndexFlatIP(a.dim)
        index.add(frame)
        sim, idx = index.search(q, a.k)
        return idx, sim

    ann, t_build = timed(lambda: ApproxIndex(frame, nlist=a.nlist, nprobe=a.nprobe, seed=0))
    runs = {"ours": ours, "faiss": theirs, "approx": lambda q=queries: ann.search(q, a.k)}
    if a.torch:
        runs["torch"] = ours_torch
    if a.hnsw:
        hnsw, t_hnsw = timed(lambda: build_hnsw(frame, threads))
        hnsw.hnsw.efSearch = a.ef
        runs["hnsw"] = lambda q=queries: hnsw.search(q, a.k)[::-1]  # (indices, similarities)
    for f in runs.values():
        f(queries[:500])  # warm-up: buffers, thread pools
    times, out = {name: [] for name in runs}, {}
    for _ in range(a.repeats):
        for name, f in runs.items():
            out[name], t = timed(f)
            times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    (io, so), (i_f, sf), (ia, sa) = out["ours"], out["faiss"], out["approx"]
    agree = topk_agreement(io, so, i_f, sf, tol=1e-6)
    same = float((io == i_f).all(1).mean())
    print(f"{a.data} data: frame {a.frame} x queries {a.queries} x dim {a.dim}, k {a.k}, {threads} threads; "
          f"torch {torch.__version__}, faiss {faiss.__version__}, median of {a.repeats} alternating repeats")
    path = "faiss" if a.queries >= core._FAISS_MIN_QUERIES else "torch"  # where ours gets its candidates
    print(f"cytoclr cosine_topk (exact)      : median {med['ours']:7.2f} s  (min {min(times['ours']):.2f}); "
          f"candidates from {path}")
    print(f"faiss IndexFlatIP search (exact) : median {med['faiss']:7.2f} s  (min {min(times['faiss']):.2f})")
    if a.torch:
        print(f"cytoclr cosine_topk without faiss: median {med['torch']:7.2f} s  (min {min(times['torch']):.2f}); "
              f"ratio to faiss {med['torch'] / med['faiss']:.2f}x")
    print(f"cytoclr ApproxIndex search       : median {med['approx']:7.2f} s  (min {min(times['approx']):.2f}); "
          f"built once in {t_build:.2f} s (IVF-Flat, {ann.nlist} lists, {ann.nprobe} probed)")
    if a.hnsw:
        ih, sh = out["hnsw"]
        print(f"faiss HNSW32 search (efSearch {a.ef}): median {med['hnsw']:7.2f} s  (min {min(times['hnsw']):.2f}); "
              f"built once on one thread in {t_hnsw:.2f} s; {med['hnsw'] / med['faiss']:.2f}x faiss exact; "
              f"recall@{a.k} {topk_recall(ih, sh, io, so):.3f}")
    print(f"ratio ours exact / faiss exact: {med['ours'] / med['faiss']:.2f}x  (goal <= 1.2x); of the fastest repeats "
          f"{min(times['ours']) / min(times['faiss']):.2f}x (less moved by other processes)")
    print(f"ratio ours approximate / faiss exact: {med['approx'] / med['faiss']:.2f}x search, "
          f"{(med['approx'] + t_build) / med['faiss']:.2f}x with the build")
    print(f"approximate recall@{a.k} {topk_recall(ia, sa, io, so):.3f}; queries whose whole top-{a.k} is exact "
          f"{100 * topk_agreement(ia, sa, io, so):.2f}%")
    print(f"ours vs faiss: queries whose top-{a.k} agree (swaps among similarities equal within 1e-6 allowed): "
          f"{100 * agree:.2f}% (goal 100%); index lists identical as they stand: {100 * same:.2f}%; "
          f"largest similarity difference {float(np.abs(so.astype(np.float64) - sf).max()):.1e}")


if __name__ == "__main__":
    main()
