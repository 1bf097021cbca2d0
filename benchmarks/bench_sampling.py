"""Benchmarks of cytoclr.sampling against straightforward peers, on the same inputs, in one run.

1. one augmented 128 px view (rotation + flip + blur + jitter): ours (one bilinear grid_sample on the
   crop, exact rot90 for multiples of 90 deg) vs scipy.ndimage.rotate + gaussian_filter (the peer);
   and the PLI direction-aware version.
2. a neighbourhood batch (b = 4096, k = 7, r = 5 mm) from 200k samples: ours (KD-tree ball queries on
   the seeds) vs brute force (distances from every seed to every sample, then the same draw).
3. DataLoader throughput (two views, 128 px, 2 workers) from in-memory sections, i.e. our own cost
   without the renderer's, and sample_locations on 1M points.

Run: .venv/bin/python benchmarks/bench_sampling.py   (prints medians of a few repeats)
"""
import time

import numpy as np
import torch
from scipy import ndimage

from cytoclr.augment import Augment
from cytoclr.reference import Location
from cytoclr.sampling import NeighbourhoodBatchSampler, PatchDataset, Samples, sample_locations


def median_time(fn, reps=5, inner=1):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t0) / inner)
    return float(np.median(ts))


class MemSection:
    "An in-memory section: reading is a copy, so timings show the pipeline's own cost."

    def __init__(self, img, spacing_um=32.0):
        self.img = img
        self.channels, r, c = img.shape
        self.shape, self.spacing_um, self.modality, self.brain = (r, c), spacing_um, "nissl", "mem"

    def read(self, rows, cols):
        return self.img[:, rows, cols].copy()

    def to_reference(self, rc):
        s = self.spacing_um / 1000
        return np.c_[rc[:, 1] * s, np.zeros(len(rc)), -rc[:, 0] * s]

    def cortex_mask(self, level=0):
        return np.ones((-(-self.shape[0] // 2 ** level), -(-self.shape[1] // 2 ** level)), bool)


class FlatRef:
    hemis = ("L",)
    mid = {"L": np.zeros((1, 3))}

    def locate(self, xyz):
        n = len(xyz)
        return Location(np.zeros(n, np.int8), np.zeros(n, np.int64), np.full(n, 0.5), np.ones(n, np.int64),
                        np.ones(n, bool), np.zeros(n))


def bench_augment(rng):
    size = 128
    aug = Augment("nissl", seed=0)
    crop = rng.random((1, aug.crop_px(size), aug.crop_px(size))).astype(np.float32)
    params = [aug.draw(rng) for _ in range(20)]
    it = iter(params * 100)
    ours = median_time(lambda: aug.apply(crop, size, **next(it)), reps=5, inner=20)

    def peer():
        p = next(it)
        x = ndimage.rotate(crop[0], p["theta"], reshape=False, order=1, mode="nearest")
        off = (x.shape[0] - size) // 2
        x = x[off:off + size, off:off + size]
        x = x[:, ::-1] if p["flip"] else x
        x = ndimage.gaussian_filter(x, p["sigma"]) if p["sigma"] > 0.05 else x
        return (x - x.mean()) * p["gain"] + x.mean() + p["offset"]

    it = iter(params * 100)
    theirs = median_time(peer, reps=5, inner=20)
    aug_p = Augment("pli", seed=0)
    crop_p = np.concatenate([rng.random((2,) + crop.shape[1:]), 180 * rng.random((1,) + crop.shape[1:])]).astype(np.float32)
    it = iter(params * 100)
    pli = median_time(lambda: aug_p.apply(crop_p, size, **next(it)), reps=5, inner=20)
    print(f"augment one 128 px Nissl view: ours {1e3 * ours:.2f} ms, scipy.ndimage peer {1e3 * theirs:.2f} ms "
          f"-> {theirs / ours:.1f}x; PLI view (direction-aware, 3 channels): {1e3 * pli:.2f} ms")


def bench_sampler(rng):
    n, b, k, r = 200_000, 4096, 7, 5.0
    # points on a 2000 cm^2 sheet, about the cortex of both hemispheres
    xyz = np.c_[rng.uniform(0, 450, n), rng.uniform(0, 450, n), np.zeros(n)]
    s = Samples(section=np.zeros(n, np.int64), rc=np.zeros((n, 2)), xyz=xyz, hemi=np.zeros(n, np.int8),
                vertex=np.arange(n), area=np.ones(n, np.int64), brain=np.array(["b"] * n), depth=np.full(n, 0.5),
                surface_xyz=xyz)
    t0 = time.perf_counter()
    smp = NeighbourhoodBatchSampler(s, b, k=k, radius_mm=r, distance="euclidean", seed=0)
    build = time.perf_counter() - t0
    steps = iter(range(10_000))
    ours = median_time(lambda: smp.batch(next(steps)), reps=5)
    seeds = smp.batch(0)[:smp.m]

    def brute():
        g = np.random.default_rng(0)
        out = [seeds]
        for c in np.array_split(seeds, 8):  # chunks keep memory bounded
            d = np.linalg.norm(xyz[c][:, None, :] - xyz[None, :, :], axis=2)  # (chunk, n)
            for row, sd in zip(d, c):
                cand = np.flatnonzero((row < r))
                cand = cand[cand != sd]
                out.append(g.choice(cand, min(k, len(cand)), replace=False))
        return np.concatenate(out)

    theirs = median_time(brute, reps=3)
    print(f"neighbourhood batch b={b}, k={k}, r={r} mm from {n:,} samples: ours {1e3 * ours:.1f} ms "
          f"(+{1e3 * build:.0f} ms KD-tree once), brute force {1e3 * theirs:.0f} ms -> {theirs / ours:.0f}x")


def bench_loader(rng):
    secs = [MemSection(rng.random((1, 1500, 1500)).astype(np.float32)) for _ in range(2)]
    t0 = time.perf_counter()
    big = sample_locations(secs, 1_000_000, seed=0, ref=FlatRef(), level=2)
    t_sample = time.perf_counter() - t0
    s = big[np.arange(20_000)]
    ds = PatchDataset(secs, s, 128, views=2, augment=Augment("nissl"), seed=0)
    res = []
    for w in (0, 2):
        dl = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=w)
        it = iter(dl)
        next(it)  # worker start-up is not throughput
        t0, seen = time.perf_counter(), 0
        for batch in it:
            seen += len(batch["index"])
            if seen >= 2048:
                break
        res.append((w, seen / (time.perf_counter() - t0)))
    print(f"sample_locations: 1,000,000 points in {t_sample:.2f} s")
    print("DataLoader (steady state), two 128 px views per location, in-memory sections: " +
          ", ".join(f"{w} workers {v:.0f} locations/s ({2 * v:.0f} patches/s)" for w, v in res))


if __name__ == "__main__":
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    bench_augment(rng)
    bench_sampler(rng)
    bench_loader(rng)
