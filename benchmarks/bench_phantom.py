"""Does phantom rendering keep up with training?

Renders what the quick profile's training reads per location: the crop that augmentation cuts a 64 px patch at
64 um/px from (a 4 mm field of view, like the posters' 2048 px at 2 um/px; the crop is `Augment.crop_px(64)` = 94 px
so that any rotation still covers the patch, as `PatchDataset` renders it). In the same run it times one training
step as the trainer now runs it: the batched augmentation of those crops (`Augment.apply_batch`, one pass for the
whole batch), forward + backward + gradient clipping + AdamW step (the trainer's `make_optimizer`) of the quick model
(`cytoclr.training.build_model`: `build_encoder("quick", modality)` + `ProjectionHead`), loss `spatial_nce`. The
same for 3D-PLI, whose encoder takes the 3 stored channels (transmittance, retardation, direction) and encodes the
direction in its first layer. Goal: rendering at least 2x faster than training consumes. Also times one paper-scale
Nissl patch (2048 px at 2 um/px).

    .venv/bin/python benchmarks/bench_phantom.py [--repeats 15] [--batch 64] [--threads N]

The goal is checked on the strict reading (a 1-view step on as many images as were rendered); the "2 views" lines
compare with a step as the trainer runs it (each rendered location is seen in two augmented views: twice the images
per rendered crop).
"""
import argparse
import statistics
import time

import numpy as np
import torch

from cytoclr.losses import label_weights, spatial_nce, view_weights
from cytoclr.models import count_parameters
from cytoclr.phantom import PhantomBrain
from cytoclr.sampling import Augment
from cytoclr.training import DataConfig, TrainConfig, build_model, make_optimizer


def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def timed(fn) -> tuple[float, float]:
    "(wall seconds, CPU seconds of this process) of one call."
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def training_step(modality: str, crops: np.ndarray, size: int, views: int, seed: int = 0):
    """(step, augment-only, number of parameters): one trainer step on `crops` (B, C, crop, crop) with `views` batched
    augmented views per crop, and the augmentation alone."""
    cfg = TrainConfig(modality=modality, views=views, seed=seed)
    model = build_model(cfg).train()
    opt, _ = make_optimizer(model, cfg)
    aug = Augment(modality=modality)
    rng = np.random.default_rng(seed)
    x0 = torch.from_numpy(crops).repeat_interleave(views, 0)  # (B*V, C, crop, crop): views of a location adjacent
    ids = torch.arange(len(crops)).repeat_interleave(views)
    # 2 views: SimCLR pairs; 1 view: some (B, B) weights with positives (area labels); the cost is the same
    w = view_weights(ids) if views == 2 else label_weights(torch.from_numpy(rng.integers(1, 20, len(crops))))

    def augment():
        p = [aug.draw(rng) for _ in range(len(x0))]
        return aug.apply_batch(x0, size, **{k: np.array([q[k] for q in p], np.float64) for k in p[0]})  # (B*V, C, s, s)

    def step():
        x = augment()
        opt.zero_grad(set_to_none=True)
        _, z = model(x)
        loss = spatial_nce(z, w, cfg.tau)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    step()  # warm-up
    return step, augment, count_parameters(model)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64, help="locations rendered (and trained on) per step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); with 1 thread the CPU-time "
                    "ratio measures the work itself, whatever else runs on the machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    size, spacing = DataConfig().patch_px, 64.0  # the quick profile: 64 px at 64 um/px (data_manifest.yml)
    crop = Augment().crop_px(size)

    t0 = time.perf_counter()
    brain = PhantomBrain(1)
    sec = brain.section(0, spacing_um=spacing)
    pli = brain.section(0, spacing_um=spacing, modality="pli")
    level = 2
    mask = sec.cortex_mask(level)
    setup = time.perf_counter() - t0
    r, c = np.nonzero(mask)
    i = rng.choice(len(r), args.batch, replace=False)
    top = np.clip(np.stack([r[i], c[i]], 1) * 2 ** level + 2 ** level // 2 - crop // 2, 0, np.array(sec.shape) - crop)
    windows = [(slice(a, a + crop), slice(b, b + crop)) for a, b in top]

    def render(s):
        return np.stack([s.read(*w) for w in windows])  # (B, C, crop, crop)

    batch = render(sec)  # warm-up: builds the lookup tables once
    batch_pli = render(pli)
    assert batch_pli.shape[1] == 3, "PLI sections store 3 channels"

    step, aug, n_params = training_step("nissl", batch, size, 1)
    step_pli, aug_pli, n_params_pli = training_step("pli", batch_pli, size, 1)
    step_2v, aug_2v, _ = training_step("nissl", batch, size, 2)
    step_pli_2v, aug_pli_2v, _ = training_step("pli", batch_pli, size, 2)

    # Rendering and training are timed back to back, pair after pair: this machine drifts between a fast and a
    # slow mode over seconds, so each ratio compares the two under the same conditions; we report the median
    # of the per-pair ratios and their range. The augmentation alone is timed in the same pass (it is inside the step).
    pairs = {"Nissl": ([], [], [], lambda: render(sec), step, aug),
             "PLI": ([], [], [], lambda: render(pli), step_pli, aug_pli),
             "Nissl, 2-view step": ([], [], [], lambda: render(sec), step_2v, aug_2v),
             "PLI, 2-view step": ([], [], [], lambda: render(pli), step_pli_2v, aug_pli_2v)}
    for _ in range(args.repeats):
        for tr, tt, ta, ren, stp, au in pairs.values():
            tt.append(timed(ren))
            tr.append(timed(stp))
            ta.append(timed(au))
    med = {k: [statistics.median(x[0] for x in v[j]) for j in range(3)] for k, v in pairs.items()}  # train, render, augment (wall)

    fine = brain.section(0, spacing_um=2.0)
    rc = np.rint(fine.from_reference(sec.to_reference(top[:1] + crop // 2))[0]).astype(int) - 1024
    rc = np.clip(rc, 0, np.array(fine.shape) - 2048)
    t_paper = median_time(lambda: fine.read(slice(rc[0], rc[0] + 2048), slice(rc[1], rc[1] + 2048)),
                          max(1, args.repeats // 2))

    B = args.batch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; setup (brain, section geometry, mask) {setup:.1f} s")
    print(f"quick profile: {size} px patches at {spacing:g} um/px ({size * spacing / 1000:g} mm), rendered as {crop} px crops "
          f"(what augmentation cuts a {size} px view from); {B} locations per step; median of {args.repeats} pairs")
    for mod in ("Nissl", "PLI"):
        t = med[mod][1]
        print(f"render {B} {mod:5s} crops {crop} px @ {spacing:g} um/px: {t * 1e3:8.1f} ms  ({B / t:7.0f} crops/s)")
    for mod, npar, ch in (("Nissl", n_params, "1 channel"), ("PLI", n_params_pli, "3 stored channels")):
        for k, views in ((mod, 1), (f"{mod}, 2-view step", 2)):
            t, _, ta = med[k]
            print(f"train step, quick {mod} model ({npar / 1e6:.2f} M params), {B} locations x {views} view{'s' if views > 1 else ''}, "
                  f"{ch}: {t * 1e3:8.1f} ms ({views * B / t:6.0f} images/s), of which batched augmentation {ta * 1e3:6.1f} ms")
    for mod, (tr, tt, *_) in pairs.items():
        tr, tt = np.array(tr), np.array(tt)  # (repeats, 2): wall, CPU
        ratios, cpu = tr[:, 0] / tt[:, 0], tr[:, 1] / tt[:, 1]
        m = float(np.median(ratios))
        print(f"ratio training step / rendering, {mod + ':':19s} {m:5.1f}x  (median of {len(ratios)} back-to-back pairs, "
              f"range {ratios.min():.1f}-{ratios.max():.1f}; goal >= 2x: {'met' if m >= 2 else 'NOT met'}); in CPU time "
              f"{np.median(cpu):5.1f}x (range {cpu.min():.1f}-{cpu.max():.1f})")
    if torch.get_num_threads() > 1:
        print(f"(CPU time with {torch.get_num_threads()} torch threads includes OpenMP spinning; rendering is single-threaded "
              "numpy; --threads 1 gives the load-proof ratio of the work itself)")
    print(f"one paper-scale Nissl patch, 2048 px @ 2 um/px: {t_paper:.2f} s")


if __name__ == "__main__":
    main()
