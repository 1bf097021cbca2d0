"""Trainer overhead: `cytoclr.training.train` vs a bare loop over the same model, batches and loss.

Both run the quick encoder (cytoclr.models, "quick") on 128 px single-channel images, 64 locations x
2 views = 128 images per step, SimCLR weights, AdamW + warm-up/cosine + clipping. The data are
in-memory tensors served through the same BatchStream, so the ratio isolates the trainer's own
costs: checks, CSV/TensorBoard logging, tqdm, checkpoints. Runs alternate (bare, trainer, ...) and
the medians are compared. Goal: trainer throughput >= 0.9 x the bare loop.

    .venv/bin/python benchmarks/bench_training.py [--steps 40] [--repeats 3]
"""
import argparse
import math
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from cytoclr import training as T
from cytoclr.losses import spatial_nce, view_weights


class Images(torch.utils.data.Dataset):
    "n locations, each two fixed random views (C, px, px), with positions."

    def __init__(self, n, px, channels=1):
        g = np.random.default_rng(0)
        self.x = torch.from_numpy(g.standard_normal((n, 2, channels, px, px)).astype(np.float32))
        self.xyz = torch.from_numpy(g.uniform(-50, 50, (n, 3)).astype(np.float32))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(image=self.x[i], index=i, xyz=self.xyz[i], hemi=0, vertex=i, area=1)


class Batches:
    def __init__(self, n, b):
        self.n, self.b, self.epoch = n, b, 0

    def set_epoch(self, e):
        self.epoch = e

    def __len__(self):
        return self.n // self.b

    def __iter__(self):
        p = np.random.default_rng(self.epoch).permutation(self.n)
        return iter(p[: len(self) * self.b].reshape(len(self), self.b).tolist())


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


def bare(cfg, stream):
    "The loop anyone would write: no checks, no logs, no checkpoints."
    model = make_model(cfg)
    opt, sched = T.make_optimizer(model, cfg)
    model.train()
    n, step = 0, 0
    t0 = time.perf_counter()
    while step < cfg.steps:
        for batch in stream.epoch(step // len(stream)):
            x = batch["image"].flatten(0, 1)  # (B*2, C, H, W)
            ids = batch["index"].repeat_interleave(2)
            _, z = model(x)
            loss = spatial_nce(z, view_weights(ids), cfg.tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            n, step = n + len(x), step + 1
            if step >= cfg.steps:
                break
    return n / (time.perf_counter() - t0), float(loss.detach())


def trainer(cfg, stream):
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = T.train(cfg, stream, tmp, model=make_model(cfg), progress=True, write_metrics=False)
        wall = time.perf_counter() - t0  # everything: set-up, logs, tqdm, checkpoints
    return res.steps * cfg.batch_size * cfg.views / wall, res.losses[-1][1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--px", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64, help="locations per step (x 2 views)")
    a = ap.parse_args()
    cfg = T.TrainConfig(method="simclr", arch="quick", steps=a.steps, batch_size=a.batch, views=2,
                        checkpoint_every=max(1, a.steps // 2), log_every=10, warmup_steps=5)
    stream = T.BatchStream(Images(a.batch * 8, a.px), Batches(a.batch * 8, a.batch))
    n_params = sum(p.numel() for p in make_model(cfg).parameters())
    print(f"quick encoder + head: {n_params / 1e6:.2f} M parameters; {a.steps} steps of {a.batch} x 2 images "
          f"at {a.px} px; torch threads {torch.get_num_threads()}")
    warm = T.TrainConfig(**{**cfg.to_dict(), "steps": 3})
    bare(warm, stream), trainer(warm, stream)  # warm-up: allocator, oneDNN kernels, TensorBoard import
    rb, rt = [], []
    for r in range(a.repeats):
        ib, lb = bare(cfg, stream)
        it, lt = trainer(cfg, stream)
        assert math.isclose(lb, lt, rel_tol=1e-4), f"the two loops diverged: final loss {lb} vs {lt}"
        rb.append(ib), rt.append(it)
        print(f"  repeat {r + 1}: bare {ib:.0f} images/s, trainer {it:.0f} images/s (final loss {lt:.4f} both)", file=sys.stderr)
    mb, mt = statistics.median(rb), statistics.median(rt)
    print(f"bare loop: {mb:.0f} images/s (median of {a.repeats}); trainer: {mt:.0f} images/s; "
          f"ratio trainer/bare = {mt / mb:.3f} (goal >= 0.90)")


if __name__ == "__main__":
    main()
