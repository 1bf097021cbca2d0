"""Does phantom rendering keep up with training?

Renders quick-profile patches (128 px at 32 um/px: a 4 mm field of view, like the posters' 2048 px at 2 um/px)
and times one training step (forward + backward + optimiser step, batch 64) of the quick encoder on the same
patches, in one run, and prints the ratio (goal: rendering at least 2x faster than training consumes). The same
for 3D-PLI patches, whose encoder takes 4 channels (transmittance, retardation, cos 2phi, sin 2phi). Also times one
paper-scale Nissl patch (2048 px at 2 um/px).

    .venv/bin/python benchmarks/bench_phantom.py [--repeats 15] [--batch 64]

The goal is checked on the strict reading (a 1-view step on as many images as were rendered); the line
"2 views" compares with a step as the trainer runs it (each rendered location is seen in two augmented views).
"""
import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn as nn

from cytoclr.phantom import PhantomBrain


def encoder(in_channels: int = 1) -> tuple[nn.Module, str]:
    "The quick encoder of chapter 6, or a ~0.3M-parameter stand-in CNN if that chapter is not there yet."
    try:
        from cytoclr.models import build_encoder
        return build_encoder("quick", in_channels=in_channels), "cytoclr.models quick"
    except ImportError:
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                                 nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
        net = nn.Sequential(block(in_channels, 24), block(24, 48), block(48, 96), block(96, 96),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return net, "stand-in CNN"


def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    size, spacing = 128, 32.0

    t0 = time.perf_counter()
    brain = PhantomBrain(1)
    sec = brain.section(0, spacing_um=spacing)
    pli = brain.section(0, spacing_um=spacing, modality="pli")
    mask = sec.cortex_mask(3)
    setup = time.perf_counter() - t0
    r, c = np.nonzero(mask)
    i = rng.choice(len(r), args.batch, replace=False)
    top = np.clip(np.stack([r[i] * 8, c[i] * 8], 1) - size // 2, 0, np.array(sec.shape) - size)
    windows = [(slice(a, a + size), slice(b, b + size)) for a, b in top]

    def render(s):
        return np.stack([s.read(*w) for w in windows])  # (B, C, 128, 128)

    batch = render(sec)  # warm-up: builds the lookup tables once
    batch_pli = render(pli)

    def trainer(x: torch.Tensor):
        "One training step (forward + backward + optimiser step) of a fresh quick encoder on batch `x`."
        net, name = encoder(x.shape[1])
        head = nn.Linear(net(x[:2]).shape[1], 128)
        opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad()
            z = nn.functional.normalize(head(net(x)), dim=1)
            loss = -(z @ z.T).mean()  # any scalar: the cost is forward + backward + step
            loss.backward()
            opt.step()

        step()
        return step, name, sum(p.numel() for p in net.parameters())

    step, name, n_params = trainer(torch.from_numpy(batch))
    try:  # PLI enters the encoder as 4 channels: transmittance, retardation, cos 2phi, sin 2phi
        from cytoclr.models import encode_pli
        x_pli = encode_pli(torch.from_numpy(batch_pli))
    except ImportError:
        phi = np.deg2rad(batch_pli[:, 2:3]) * 2
        x_pli = torch.from_numpy(np.concatenate([batch_pli[:, :2], np.cos(phi), np.sin(phi)], 1))
    step_pli, _, n_params_pli = trainer(x_pli)
    # what the trainer actually runs per batch of 64 locations: two augmented views of each (here: the patch and its
    # mirror image), 128 images per step
    step_2v, *_ = trainer(torch.cat([torch.from_numpy(batch), torch.from_numpy(batch).flip(-1)]))

    # Rendering and training are timed back to back, pair after pair: this machine drifts between a fast and a
    # slow mode over seconds, so each ratio compares the two under the same conditions; we report the median
    # of the per-pair ratios and their range.
    pairs = {"Nissl": ([], [], lambda: render(sec), step), "PLI": ([], [], lambda: render(pli), step_pli),
             "Nissl, 2-view step": ([], [], lambda: render(sec), step_2v)}
    for _ in range(args.repeats):
        for tr, tt, ren, stp in pairs.values():
            tt.append(median_time(ren, 1))
            tr.append(median_time(stp, 1))
    t_nissl, t_pli = (statistics.median(pairs[k][1]) for k in ("Nissl", "PLI"))
    t_train, t_train_pli = (statistics.median(pairs[k][0]) for k in ("Nissl", "PLI"))

    fine = brain.section(0, spacing_um=2.0)
    rc = np.rint(fine.from_reference(sec.to_reference(top[:1] + size // 2))[0]).astype(int) - 1024
    rc = np.clip(rc, 0, np.array(fine.shape) - 2048)
    t_paper = median_time(lambda: fine.read(slice(rc[0], rc[0] + 2048), slice(rc[1], rc[1] + 2048)),
                          max(1, args.repeats // 2))

    B = args.batch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; setup (brain, section geometry, mask) {setup:.1f} s")
    print(f"render {B} Nissl patches {size} px @ {spacing} um/px: {t_nissl * 1e3:8.1f} ms  ({B / t_nissl:7.0f} patches/s)")
    print(f"render {B} PLI patches   {size} px @ {spacing} um/px: {t_pli * 1e3:8.1f} ms  ({B / t_pli:7.0f} patches/s)")
    print(f"train step, {name} ({n_params / 1e6:.2f} M params), batch {B}, 1 channel:  {t_train * 1e3:8.1f} ms  ({B / t_train:7.0f} images/s)")
    print(f"train step, {name} ({n_params_pli / 1e6:.2f} M params), batch {B}, 4 channels: {t_train_pli * 1e3:8.1f} ms  ({B / t_train_pli:7.0f} images/s)")
    t2 = statistics.median(pairs["Nissl, 2-view step"][0])
    print(f"train step as the trainer runs it: {B} locations x 2 views, 1 channel: {t2 * 1e3:8.1f} ms  ({2 * B / t2:7.0f} images/s)")
    for mod, (tr, tt, *_) in pairs.items():
        ratios = np.array(tr) / np.array(tt)
        med = float(np.median(ratios))
        print(f"ratio training step / rendering, {mod + ':':19s} {med:5.1f}x  (median of {len(ratios)} back-to-back pairs, "
              f"range {ratios.min():.1f}-{ratios.max():.1f}; goal >= 2x: {'met' if med >= 2 else 'NOT met'})")
    print(f"one paper-scale Nissl patch, 2048 px @ 2 um/px: {t_paper:.2f} s")


if __name__ == "__main__":
    main()
