"""Trainer overhead and the real data path: `cytoclr.training.train` vs a bare loop on the same batches.

Part 1 (synthetic): the quick encoder (cytoclr.models, "quick") on 128 px single-channel images, 64 locations
x 2 views = 128 images per step, SimCLR weights, AdamW + warm-up/cosine + clipping. The data are in-memory
tensors (`ToyPatches` with fixed views) served through the same BatchStream, so the ratio isolates the trainer's own costs: checks,
CSV/TensorBoard logging, tqdm, checkpoints.

Part 2 (the chapter's real data path): phantom Nissl sections of the train split of `data_manifest.yml`, a few
thousand locations (`load_training_samples`), `build_data` (crops cached in memory as float16, neighbourhood
batches, two views, augmentation of the whole batch in one pass by `PatchDataset.__getitems__`), geodesic weights
from the 30 mm table of `surface_distances(ref)` through `make_weighting` (the sparse `SurfaceDistances.weights`
path). The trainer and a bare loop run over the SAME BatchStream (same batches, augmentation, weights and model
initialisation; their final losses must agree). Also the old configuration over the same locations and batches:
128 px patches at 32 um/px (the same 4 mm field of view) augmented view by view (`Augment.apply`, i.e.
`PatchDataset.__getitem__` one item at a time, forced through a dataset wrapper without `__getitems__`), and the
two mixed configurations, so that the gain splits into patch size and data path. Crops are rendered once before
timing in every configuration (the cache); "data only" is the stream without the model.

Part 3 (side by side): the chapter's runs, two Nissl and two PLI (geodesic, simclr) on the real data path,
trained by `train_many` (one forked worker per core, one thread each) vs `train` one run after another with
every core (the loop a user writes). The quick encoder's small convolutions scale poorly to a second thread, so
the workers finish sooner; the ratio of wall times is printed.

Runs alternate (bare, trainer, ...) and the medians are compared; only ratios within one run mean anything (the
machine's speed changes 2x between days). Goal: trainer throughput >= 0.9 x the bare loop, in both parts.

    .venv/bin/python benchmarks/bench_training.py [--steps 40] [--real-steps 20] [--repeats 3] [--samples 4096]
                                                  [--only synthetic|real|parallel] [--threads N]
                                                  [--parallel-steps 150]

Under heavy load from other processes, wall-clock rates of multi-threaded runs swing several-fold within seconds:
ratios are also given as medians of per-repeat ratios, and in CPU time (images per CPU-second of this process),
which with `--threads 1` measures the work itself.
"""
import argparse
import dataclasses
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from cytoclr import training as T
from cytoclr.augment import Augment
from cytoclr.losses import spatial_nce, view_weights
from cytoclr.sampling import PatchDataset
from cytoclr.training_data import ToyBatches, ToyPatches

ROOT = Path(__file__).resolve().parents[1]


class OneByOne(torch.utils.data.Dataset):
    "A PatchDataset without `__getitems__`: the DataLoader asks item by item, each augmented view by view (`Augment.apply`)."

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]

    def set_epoch(self, e):
        self.ds.set_epoch(e)


class RenderedOnce:
    "Mixin for a PatchDataset: keep each crop (float16, as `cache=True`) once it was first rendered; renders only what is used."

    def crop(self, i):
        memo = self.__dict__.setdefault("_memo", {})
        if i not in memo:
            memo[i] = self._read(i, self.crop_px).astype(np.float16)
        return memo[i].astype(np.float32)


def make_model(cfg):
    try:
        return T.build_model(cfg)
    except ImportError:  # models not available: a small CNN of the same kind
        import torch.nn as nn
        torch.manual_seed(cfg.seed)

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder = nn.Sequential(nn.Conv2d(1, 32, 5, 2, 2), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1),
                                             nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(),
                                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
                self.head = nn.Sequential(nn.Linear(128, cfg.proj_hidden), nn.ReLU(), nn.Linear(cfg.proj_hidden, cfg.proj_dim))

            def forward(self, x):
                f = self.encoder(x)
                return f, self.head(f)
        return M()


def rates(n, t0, c0) -> tuple[float, float]:
    "(images per wall second, images per CPU second of this process) since (perf_counter, process_time) = (t0, c0)."
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def summary(pairs) -> str:
    "Median and range of per-repeat ratios (each compares two runs next to each other in time)."
    r = np.asarray(pairs)
    return f"{np.median(r):.3f} (range {r.min():.2f}-{r.max():.2f})"


def simclr_weighting():
    return ("index",), view_weights


def bare(cfg, stream, weighting=None):
    "The loop anyone would write: no checks, no logs, no checkpoints. `weighting`: (keys, weight_fn) as `make_weighting`."
    keys, weight_fn = weighting or simclr_weighting()
    model = make_model(cfg)
    opt, sched = T.make_optimizer(model, cfg)
    model.train()
    n, step = 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    while step < cfg.steps:
        for batch in stream.epoch(step // len(stream)):
            x = batch["image"].flatten(0, 1)  # (B*2, C, H, W)
            kv = [torch.as_tensor(batch[k]).repeat_interleave(2) for k in keys]  # (B*2,) each, views adjacent
            _, z = model(x)
            loss = spatial_nce(z, weight_fn(*kv), cfg.tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            n, step = n + len(x), step + 1
            if step >= cfg.steps:
                break
    return rates(n, t0, c0), float(loss.detach())


def trainer(cfg, stream, distances=None):
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        res = T.train(cfg, stream, tmp, model=make_model(cfg), distances=distances, progress=True, write_metrics=False)
        r = rates(res.steps * cfg.batch_size * cfg.views, t0, c0)  # everything: set-up, logs, tqdm, checkpoints
    # and the trainer's own count: wall time inside its steps only (what its log reports; no set-up, no final save)
    return (*r, res.images_per_second), res.losses[-1][1]


def data_only(cfg, stream):
    "Images/s of the stream alone: sampling, collation, augmentation (crops already cached)."
    n, step = 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    while step < cfg.steps:
        for batch in stream.epoch(step // len(stream)):
            n, step = n + batch["image"].shape[0] * batch["image"].shape[1], step + 1
            if step >= cfg.steps:
                break
    return rates(n, t0, c0)


# -- part 1 ---------------------------------------------------------------------------------------------------------
def synthetic(a):
    cfg = T.TrainConfig(method="simclr", arch="quick", steps=a.steps, batch_size=a.batch, views=2,
                        checkpoint_every=max(1, a.steps // 2), log_every=10, warmup_steps=5)
    stream = T.BatchStream(ToyPatches(a.batch * 8, a.px, noise=0), ToyBatches(a.batch * 8, a.batch))  # fixed views
    n_params = sum(p.numel() for p in make_model(cfg).parameters())
    print(f"[1, synthetic] quick encoder + head: {n_params / 1e6:.2f} M parameters; {a.steps} steps of {a.batch} x 2 "
          f"images at {a.px} px, in-memory tensors, SimCLR weights; torch threads {torch.get_num_threads()}")
    warm = T.TrainConfig(**{**cfg.to_dict(), "steps": 3})
    bare(warm, stream), trainer(warm, stream)  # warm-up: allocator, oneDNN kernels, TensorBoard import
    rb, rt = [], []
    for r in range(a.repeats):
        ib, lb = bare(cfg, stream)
        it, lt = trainer(cfg, stream)
        assert math.isclose(lb, lt, rel_tol=1e-4), f"the two loops diverged: final loss {lb} vs {lt}"
        rb.append(ib), rt.append(it)
        print(f"  repeat {r + 1}: bare {ib[0]:.0f} images/s, trainer {it[0]:.0f} images/s (final loss {lt:.4f} both)", file=sys.stderr)
    mb, mt = statistics.median(x[0] for x in rb), statistics.median(x[0] for x in rt)
    ratio = mt / mb
    print(f"[1, synthetic] bare loop: {mb:.0f} images/s (median of {a.repeats}); trainer: {mt:.0f} images/s; "
          f"ratio trainer/bare = {ratio:.3f} (goal >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'}); per-repeat ratios: "
          f"wall {summary([t[0] / b[0] for b, t in zip(rb, rt)])}, CPU time {summary([t[1] / b[1] for b, t in zip(rb, rt)])}; "
          f"trainer's steps alone (its own images/s, no set-up) / bare: {summary([t[2] / b[0] for b, t in zip(rb, rt)])}")


# -- part 2 ---------------------------------------------------------------------------------------------------------
def cached_cutoffs() -> list[float]:
    "Cutoffs (mm) of the geodesic tables in the cache folder (one file per hemisphere and cutoff)."
    from cytoclr.core import cache_dir
    return sorted(float(m.group(1)) for p in (cache_dir() / "geodesic").glob("geodesic-*.npz")
                  if (m := re.search(r"-c([0-9.]+)mm\.npz$", p.name)))


def manifest_at(spacing_um: float, folder: Path) -> Path:
    "A copy of data_manifest.yml whose phantom series are rendered at `spacing_um` (same brains, planes, splits)."
    d = yaml.safe_load((ROOT / "data_manifest.yml").read_text())
    for s in d.get("phantom_series", []):
        s["spacing_um"] = float(spacing_um)
    path = folder / "manifest_32um.yml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def real(a):
    from cytoclr.manifest import load_manifest
    cut = 30.0
    cfg = T.TrainConfig(method="geodesic", modality="nissl", arch="quick", steps=a.real_steps, batch_size=a.batch,
                        views=2, checkpoint_every=max(1, a.real_steps // 2), log_every=10, warmup_steps=5).validate()
    dcfg = T.DataConfig(manifest=str(ROOT / "data_manifest.yml"), split="train", modality="nissl", n_samples=a.samples,
                        patch_px=64, max_sections=a.max_sections, cache=True)
    t0 = time.perf_counter()
    man = load_manifest(dcfg.manifest)
    sections, samples, ref = T.load_training_samples(dcfg, man, progress=False)
    t_samples = time.perf_counter() - t0
    have = [c for c in cached_cutoffs() if c >= cut]
    print(f"\n[2, real data] {len(samples)} locations on {len(sections)} train Nissl sections of "
          f"{len(set(samples.brain))} phantom brains, sampled in {t_samples:.0f} s (sections, masks, reference)")
    if not have:
        print(f"[2, real data] no cached geodesic table with cutoff >= {cut:g} mm in ~/.cache/cytoclr/geodesic: "
              "building both hemispheres' tables now (about a minute; later runs load them from the cache)", flush=True)
    t0 = time.perf_counter()
    dist = T.surface_distances(ref, cut, progress=not have)
    for h in ref.hemis:
        dist.table(h)
    print(f"[2, real data] {cut:g} mm geodesic tables ready in {time.perf_counter() - t0:.1f} s "
          f"({'loaded from the cache' if have else 'built and cached'})")
    weighting = T.make_weighting(cfg.method, cfg.sigma_mm, cfg.weight_kind, dist)

    # the new configuration: what chapter 7 runs (64 px at 64 um/px, batched augmentation)
    new = T.build_data(dcfg, cfg, sections, samples, ref, distances=dist, progress=False)
    ds64 = new.dataset
    # the old configuration over the same locations: 128 px at 32 um/px (same 4 mm), same batches (same samples' positions)
    with tempfile.TemporaryDirectory() as tmp:
        man32 = load_manifest(manifest_at(32.0, Path(tmp)))
    secs32 = T.spread(man32.split(dcfg.split, dcfg.modality), dcfg.max_sections)
    assert [s.id for s in secs32] == [s.id for s in sections], "the 32 um/px manifest lists other sections"
    rc32 = np.empty_like(samples.rc)
    for k, (s64, s32) in enumerate(zip(sections, secs32)):
        sel = samples.section == k
        rc32[sel] = s32.from_reference(s64.to_reference(samples.rc[sel]))  # the same tissue point, in 32 um/px pixels
    samples32 = dataclasses.replace(samples, rc=rc32)
    class Patches128(RenderedOnce, PatchDataset):
        pass
    ds128 = Patches128(secs32, samples32, 128, views=2, augment=Augment(modality="nissl"), seed=cfg.seed, progress=False)
    dcfg128 = dataclasses.replace(dcfg, patch_px=128)
    t0 = time.perf_counter()
    ds64.crops
    t64 = time.perf_counter() - t0
    t0 = time.perf_counter()
    sampler = new.batch_sampler
    sampler.set_epoch(0)
    used = np.unique(np.concatenate([sampler.batch(t) for t in range(min(cfg.steps, len(sampler)))]))
    for i in used:  # every timed run is the first `steps` batches of epoch 0
        ds128.crop(int(i))
    t128 = time.perf_counter() - t0
    print(f"[2, real data] crops rendered once, outside the timings (the cache): all {len(ds64)} of {ds64.crop_px} px at "
          f"64 um/px in {t64:.1f} s ({ds64.crops.nbytes / 1e6:.0f} MB float16); the {len(used)} that the timed steps use "
          f"of {ds128.crop_px} px at 32 um/px in {t128:.1f} s")
    streams = {  # name -> stream; all draw the same batches of the same locations
        "64 px @ 64 um/px, batched aug (new)": new,
        "64 px @ 64 um/px, per-view aug": T.build_data(dcfg, cfg, sections, samples, ref, dataset=OneByOne(ds64), distances=dist),
        "128 px @ 32 um/px, batched aug": T.build_data(dcfg128, cfg, secs32, samples32, ref, dataset=ds128, distances=dist),
        "128 px @ 32 um/px, per-view aug (old)": T.build_data(dcfg128, cfg, secs32, samples32, ref, dataset=OneByOne(ds128),
                                                              distances=dist),
    }
    b0 = [next(iter(s.epoch(0))) for s in streams.values()]
    assert all(torch.equal(b0[0]["index"], b["index"]) for b in b0), "the streams draw different batches"
    diff64 = float((b0[0]["image"] - b0[1]["image"]).abs().max())
    diff128 = float((b0[2]["image"] - b0[3]["image"]).abs().max())
    print(f"[2, real data] same batches in every stream; batched vs per-view augmentation of batch 0: max |difference| "
          f"{diff64:.1e} (64 px), {diff128:.1e} (128 px); {len(new)} batches per epoch")

    warm = dataclasses.replace(cfg, steps=2, checkpoint_every=1)
    for s in streams.values():
        bare(warm, s, weighting)
    trainer(warm, new, dist)
    res = {k: dict(data=[], bare=[], trainer=[]) for k in streams}  # lists of (wall, cpu) images/s per repeat
    first = next(iter(streams))
    for r in range(a.repeats):
        line = []
        for name, s in streams.items():
            res[name]["data"].append(data_only(cfg, s))
            ib, lb = bare(cfg, s, weighting)
            res[name]["bare"].append(ib)
            line.append(f"{name.split(',')[0]}{' per-view' if 'per-view' in name else ''} bare {ib[0]:.0f}")
            if name == first:
                it, lt = trainer(cfg, s, dist)
                assert math.isclose(lb, lt, rel_tol=1e-4), f"the two loops diverged: final loss {lb} vs {lt}"
                res[name]["trainer"].append(it)
                line.append(f"trainer {it[0]:.0f} (final loss {lt:.4f} both)")
        print(f"  repeat {r + 1} (images/s): " + ", ".join(line), file=sys.stderr)

    names = list(streams)
    old = names[-1]
    wall = {k: {m: np.array([x[0] for x in v]) for m, v in d.items() if v} for k, d in res.items()}
    cpu = {k: {m: np.array([x[1] for x in v]) for m, v in d.items() if v} for k, d in res.items()}
    print(f"[2, real data] images/s, median of {a.repeats} alternating repeats of {cfg.steps} steps x {cfg.batch_size} "
          f"locations x 2 views; geodesic weights (sigma {cfg.sigma_mm:g} mm, {cut:g} mm table); quick encoder; "
          f"torch threads {torch.get_num_threads()}. 'vs old': median of the per-repeat ratios of the bare loops; "
          f"CPU: images per CPU-second of this process{' (includes OpenMP spinning with >1 thread)' if torch.get_num_threads() > 1 else ''}")
    print(f"  {'configuration':40s} {'data only':>9s} {'bare loop':>9s} {'trainer':>8s} {'vs old':>7s} | {'CPU: data':>9s} "
          f"{'bare':>6s} {'trainer':>8s} {'vs old':>7s}")
    for k in names:
        w, c = wall[k], cpu[k]
        trw = f"{np.median(w['trainer']):8.0f}" if "trainer" in w else f"{'-':>8s}"
        trc = f"{np.median(c['trainer']):8.0f}" if "trainer" in c else f"{'-':>8s}"
        print(f"  {k:40s} {np.median(w['data']):9.0f} {np.median(w['bare']):9.0f} {trw} "
              f"{np.median(w['bare'] / wall[old]['bare']):6.2f}x | {np.median(c['data']):9.0f} {np.median(c['bare']):6.0f} {trc} "
              f"{np.median(c['bare'] / cpu[old]['bare']):6.2f}x")
    w0, c0 = wall[first], cpu[first]
    ratio = float(np.median(w0["trainer"]) / np.median(w0["bare"]))
    print(f"[2, real data] trainer / bare loop on the real data path = {ratio:.3f} (medians; goal >= 0.90: "
          f"{'met' if ratio >= 0.9 else 'NOT met'}); per-repeat ratios: wall {summary(w0['trainer'] / w0['bare'])}, "
          f"CPU time {summary(c0['trainer'] / c0['bare'])}; trainer's steps alone (its own images/s, no set-up) / bare: "
          f"{summary(np.array([x[2] for x in res[first]['trainer']]) / w0['bare'])}")
    for label, m in (("wall", wall), ("CPU time", cpu)):
        q = {k: m[k]["bare"] for k in names}  # per repeat
        d = {k: m[k]["data"] for k in names}
        n64b, n64v, n128b, n128v = names
        med = lambda x: float(np.median(x))  # noqa: E731
        print(f"[2, real data, {label}] new vs old configuration (bare loop): {med(q[n64b] / q[n128v]):.2f}x; patch size alone "
              f"(128 -> 64 px): {med(q[n64v] / q[n128v]):.2f}x per-view, {med(q[n64b] / q[n128b]):.2f}x batched; batched "
              f"augmentation alone: {med(q[n64b] / q[n64v]):.2f}x at 64 px, {med(q[n128b] / q[n128v]):.2f}x at 128 px; data "
              f"only, batched / per-view: {med(d[n64b] / d[n64v]):.2f}x at 64 px, {med(d[n128b] / d[n128v]):.2f}x at 128 px")


def parallel(a):
    """Part 3: the chapter's runs side by side (`train_many`, one core each) vs one after another on every core
    (`train` in a loop: what a user writes). Two Nissl and two PLI runs of the real data path."""
    from cytoclr.manifest import load_manifest
    man = load_manifest(str(ROOT / "data_manifest.yml"))
    dist = T.surface_distances(man.reference, 30.0, progress=False)
    jobs_of = []  # (cfg, data) of every run; the data streams are built once and shared by both sides
    for modality in ("nissl", "pli"):
        base = T.TrainConfig(modality=modality, arch="quick", steps=a.parallel_steps, batch_size=a.batch, views=2,
                             checkpoint_every=a.parallel_steps, log_every=10, warmup_steps=5).validate()
        dcfg = T.DataConfig(manifest=str(ROOT / "data_manifest.yml"), modality=modality, n_samples=a.samples,
                            patch_px=64, neighbours=3, cache=True)
        sections, samples, ref = T.load_training_samples(dcfg, man, progress=False)
        data = T.build_data(dcfg, base, sections, samples, ref, distances=dist, progress=False)
        data.dataset.crops  # rendered once, outside the timings
        jobs_of += [(dataclasses.replace(base, method=m), data) for m in ("geodesic", "simclr")]
    cores = len(os.sched_getaffinity(0))
    print(f"\n[3, side by side] {len(jobs_of)} runs (Nissl and PLI x geodesic, simclr) of {a.parallel_steps} steps x "
          f"{a.batch} locations x 2 views; {cores} cores, torch threads {torch.get_num_threads()} when one after another")
    walls = {"one after another (train)": [], "side by side (train_many)": []}
    losses = {}
    for r in range(a.repeats):
        for name in walls:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                if name.startswith("one"):
                    res = [T.train(cfg, data, tmp, distances=dist, progress=False, write_metrics=False) for cfg, data in jobs_of]
                else:
                    res = T.train_many([T.TrainJob(cfg, data, tmp, distances=dist, write_metrics=False)
                                        for cfg, data in jobs_of], workers=cores, progress=False)
                walls[name].append(time.perf_counter() - t0)
                losses[name] = [x.final_loss for x in res]
        print(f"  repeat {r + 1}: " + ", ".join(f"{n} {w[-1]:.1f} s" for n, w in walls.items()), file=sys.stderr)
    images = sum(cfg.steps * cfg.batch_size * cfg.views for cfg, _ in jobs_of)
    seq, par = (statistics.median(w) for w in walls.values())
    for n, w in walls.items():
        print(f"  {n:28s} {statistics.median(w):7.1f} s  {images / statistics.median(w):6.0f} images/s in all")
    dl = max(abs(x - y) for x, y in zip(*losses.values()))
    print(f"[3, side by side] train_many / one after another: {seq / par:.2f}x faster (median of {a.repeats} alternating "
          f"repeats; per-repeat ratios {', '.join(f'{x / y:.2f}' for x, y in zip(*walls.values()))}); final losses differ "
          f"by at most {dl:.1e} (one thread vs {torch.get_num_threads()}: another summation order)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="steps per run, part 1")
    ap.add_argument("--real-steps", type=int, default=20, help="steps per run, part 2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--px", type=int, default=128, help="image side, part 1")
    ap.add_argument("--batch", type=int, default=64, help="locations per step (x 2 views)")
    ap.add_argument("--samples", type=int, default=4096, help="training locations, part 2")
    ap.add_argument("--max-sections", type=int, default=0, help="train sections used in part 2 (0: all)")
    ap.add_argument("--parallel-steps", type=int, default=150, help="steps per run, part 3")
    ap.add_argument("--only", choices=("synthetic", "real", "parallel"), help="run one part only")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default). With 1 thread the CPU "
                    "columns measure the work itself, whatever else runs on the machine")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.only in (None, "synthetic"):
        synthetic(a)
    if a.only in (None, "real"):
        real(a)
    if a.only in (None, "parallel"):
        parallel(a)


if __name__ == "__main__":
    main()
