"""Exact cosine top-k: cytoclr's `cosine_topk` vs faiss's exact `IndexFlatIP`, 10^5 frame x 10^4 queries x 128 dims, k = 50.

Same input for both: random Gaussian vectors, L2-normalised in float32 (so inner product = cosine). Ours is
`cosine_topk(queries, frame, k)` (it normalises the rows again, chunks the queries, re-scores the candidates exactly
and breaks ties by the lower frame index); faiss's is `IndexFlatIP(d)`, `add(frame)`, `search(queries, k)` (building
the flat index, a copy, is inside its timed region as normalising is inside ours). faiss uses as many threads as
torch (`faiss.omp_set_num_threads(torch.get_num_threads())`). Repeats alternate between the two (other processes may
share the CPU); the medians, their ratio (goal: ours <= 1.5x faiss) and the share of queries whose top-k index lists
are identical apart from similarities equal within 1e-6 (goal: all) are printed.
    python benchmarks/bench_topk.py [--frame 100000] [--queries 10000] [--dim 128] [--k 50] [--repeats 3]
"""
import argparse
import statistics
import time

import faiss
import numpy as np
import torch

from cytoclr.core import cosine_topk, topk_agreement


def unit_rows(n, d, rng):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frame", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    frame, queries = unit_rows(a.frame, a.dim, rng), unit_rows(a.queries, a.dim, rng)
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)

    def ours(q=queries):
        return cosine_topk(q, frame, a.k)  # (indices, similarities)

    def theirs(q=queries):
        index = faiss.IndexFlatIP(a.dim)
        index.add(frame)
        sim, idx = index.search(q, a.k)
        return idx, sim

    ours(queries[:500]), theirs(queries[:500])  # warm-up: buffers, thread pools
    t_o, t_f, out = [], [], {}
    for _ in range(a.repeats):
        for name, f, ts in (("ours", ours, t_o), ("faiss", theirs, t_f)):
            t0 = time.perf_counter()
            out[name] = f()
            ts.append(time.perf_counter() - t0)
    mo, mf = statistics.median(t_o), statistics.median(t_f)
    (io, so), (i_f, sf) = out["ours"], out["faiss"]
    agree = topk_agreement(io, so, i_f, sf, tol=1e-6)
    same = float((io == i_f).all(1).mean())
    print(f"frame {a.frame} x queries {a.queries} x dim {a.dim}, k {a.k}, {threads} threads; torch {torch.__version__}, "
          f"faiss {faiss.__version__}, median of {a.repeats} alternating repeats")
    print(f"cytoclr cosine_topk      : median {mo:7.2f} s  (min {min(t_o):.2f})")
    print(f"faiss IndexFlatIP search : median {mf:7.2f} s  (min {min(t_f):.2f})")
    print(f"ratio (ours / faiss): {mo / mf:.2f}x  (goal <= 1.5x)")
    print(f"queries whose top-{a.k} agree (swaps among similarities equal within 1e-6 allowed): {100 * agree:.2f}%  "
          f"(goal 100%); index lists identical as they stand: {100 * same:.2f}%; "
          f"largest similarity difference {float(np.abs(so.astype(np.float64) - sf).max()):.1e}")


if __name__ == "__main__":
    main()
