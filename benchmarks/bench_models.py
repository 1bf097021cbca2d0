"""Training speed of the quick encoder: 64 px patches at 64 um/px (the quick profile now) vs 128 px at 32 um/px (before).

Both patch sizes show the same 4 mm of tissue. One step = forward + backward + AdamW step (the trainer's
`make_optimizer`) of `ContrastiveModel(build_encoder("quick", modality), ProjectionHead(...))` on a batch of 128
images (64 phantom locations x 2 views: the patch and its mirror image), loss `spatial_nce` with `view_weights`
(SimCLR pairs). In the same run, alternating repeat by repeat (medians compared; only ratios within one run count):
  - the Nissl encoder at 64 px (the reference of every ratio) and at 128 px (the configuration used before);
  - the 64 px Nissl encoder in `torch.channels_last` memory format;
  - the 64 px Nissl encoder under `torch.compile` (inductor; its compile time is printed, and a failure or a time-out
    is reported instead of a number);
  - the PLI encoder at 64 px: patches as stored (transmittance, retardation, direction in degrees), which its first
    layer turns into 4 channels.

    .venv/bin/python benchmarks/bench_models.py [--steps 2] [--repeats 15] [--threads N] [--no-compile]
                                                [--compile-timeout 300]

Under heavy load from other processes, wall-clock images/s of 2-thread runs swing several-fold within seconds;
the ratios are medians of per-repeat ratios, and `--threads 1` plus the CPU-time column give a load-proof
comparison of the work itself.
"""
import argparse
import signal
import sys
import time

import numpy as np
import torch

from cytoclr.losses import spatial_nce, view_weights
from cytoclr.models import ContrastiveModel, ProjectionHead, build_encoder, count_parameters
from cytoclr.phantom import PhantomBrain
from cytoclr.training_config import TrainConfig, make_optimizer


def phantom_patches(locations: int, seed: int = 0) -> dict:
    """(locations, C, px, px) float32 patches of one phantom brain at the same tissue points: Nissl at 64 px / 64 um/px
    and 128 px / 32 um/px, PLI at 64 px / 64 um/px."""
    rng = np.random.default_rng(seed)
    brain = PhantomBrain(1)
    secs = {"nissl64": brain.section(0, spacing_um=64.0), "nissl128": brain.section(0, spacing_um=32.0),
            "pli64": brain.section(0, spacing_um=64.0, modality="pli")}
    base = secs["nissl64"]
    r, c = np.nonzero(base.cortex_mask(2))
    i = rng.choice(len(r), locations, replace=False)
    centres = base.to_reference(np.stack([r[i] * 4 + 2, c[i] * 4 + 2], 1).astype(float))  # (n, 3) mm
    out = {}
    for key, sec in secs.items():
        px = 128 if key == "nissl128" else 64
        rc = np.rint(sec.from_reference(centres)).astype(int) - px // 2
        rc = np.clip(rc, 0, np.array(sec.shape) - px)
        out[key] = torch.from_numpy(np.stack([sec.read(slice(a, a + px), slice(b, b + px)) for a, b in rc]))
    return out


class Step:
    "One training configuration: model, optimiser, input batch (2 views per location) and its loss weights."

    def __init__(self, modality: str, patches: torch.Tensor, channels_last: bool = False, compile: bool = False):
        cfg = TrainConfig(modality=modality)
        torch.manual_seed(0)
        enc = build_encoder("quick", modality=modality)
        self.model = ContrastiveModel(enc, ProjectionHead(enc.out_dim, cfg.proj_hidden, cfg.proj_dim)).train()
        self.n_params = count_parameters(self.model)
        self.opt, _ = make_optimizer(self.model, cfg)
        x = torch.cat([patches, patches.flip(-1)])  # (2B, C, px, px): two views per location
        ids = torch.arange(len(patches)).repeat(2)
        order = torch.argsort(ids, stable=True)  # views of a location adjacent, as the trainer orders them
        self.x, self.w, self.tau = x[order].contiguous(), view_weights(ids[order]), cfg.tau
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.net = torch.compile(self.model) if compile else self.model

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        _, z = self.net(self.x)
        loss = spatial_nce(z, self.w, self.tau)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def images_per_second(self, steps: int) -> tuple[float, float]:
        "(images per wall second, images per CPU second of this process)."
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self()
        n = steps * len(self.x)
        return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


class TimeOut(Exception):
    pass


def first_step_within(step: Step, seconds: int) -> float:
    "Run the first (compiling) step, give up after `seconds`; returns its wall time."
    def alarm(*_):
        raise TimeOut()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(seconds))
    try:
        t0 = time.perf_counter()
        step()
        step()  # the second call may recompile (e.g. for the optimiser's state); count it as set-up too
        return time.perf_counter() - t0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--locations", type=int, default=64, help="locations per batch (x 2 views = images per step)")
    ap.add_argument("--steps", type=int, default=2, help="steps per timing")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--compile-timeout", type=int, default=300, help="seconds allowed for torch.compile's first steps")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default). With 1 thread the "
                    "CPU-time column is the work itself, whatever else runs on the machine")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    p = phantom_patches(a.locations)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; phantom patches of {a.locations} locations "
          f"rendered in {time.perf_counter() - t0:.1f} s; batch {2 * a.locations} images (2 views), "
          f"forward + backward + AdamW, spatial_nce with view_weights")
    steps = {"Nissl 64 px @ 64 um/px (new)": Step("nissl", p["nissl64"]),
             "Nissl 128 px @ 32 um/px (before)": Step("nissl", p["nissl128"]),
             "Nissl 64 px, channels_last": Step("nissl", p["nissl64"], channels_last=True)}
    notes = {}
    if a.no_compile:
        notes["Nissl 64 px, torch.compile"] = "skipped (--no-compile)"
    else:
        try:
            s = Step("nissl", p["nissl64"], compile=True)
            t_c = first_step_within(s, a.compile_timeout)
            steps["Nissl 64 px, torch.compile"] = s
            notes["Nissl 64 px, torch.compile"] = f"compiled in {t_c:.0f} s (first two steps)"
        except TimeOut:
            notes["Nissl 64 px, torch.compile"] = f"NOT measured: compiling took longer than {a.compile_timeout} s"
        except Exception as e:  # noqa: BLE001 (any failure of the compiler stack is a result here)
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            notes["Nissl 64 px, torch.compile"] = f"NOT measured: torch.compile failed ({type(e).__name__}: {msg})"
    steps["PLI 64 px @ 64 um/px (3 stored channels)"] = Step("pli", p["pli64"])
    for name, s in steps.items():  # warm-up: allocator, oneDNN kernel choice
        loss = s()
        if not np.isfinite(loss):
            sys.exit(f"{name}: non-finite loss {loss}")
    ips = {k: [] for k in steps}  # per repeat: (wall, cpu) images/s
    for r in range(a.repeats):
        for name, s in steps.items():
            ips[name].append(s.images_per_second(a.steps))
        print(f"  repeat {r + 1}: " + ", ".join(f"{k.split(' (')[0]} {v[-1][0]:.0f}" for k, v in ips.items()) + " images/s",
              file=sys.stderr)
    first = "Nissl 64 px @ 64 um/px (new)"
    wall = {k: np.array([x[0] for x in v]) for k, v in ips.items()}
    cpu = {k: np.array([x[1] for x in v]) for k, v in ips.items()}
    # ratios repeat by repeat (neighbours in time see the same machine), then their median
    rw = {k: np.median(wall[k] / wall[first]) for k in steps}
    rc = {k: np.median(cpu[k] / cpu[first]) for k in steps}
    print(f"images/s, median of {a.repeats} alternating repeats of {a.steps} steps x {2 * a.locations} images; ratios are "
          f"medians of the per-repeat ratios to the 64 px Nissl encoder; CPU = images per CPU-second of this process"
          f"{' (with more than 1 thread it includes OpenMP spinning)' if torch.get_num_threads() > 1 else ''}")
    print(f"  {'configuration':42s} {'params':>7s} {'images/s':>9s} {'ratio':>6s} {'wall range':>10s} {'CPU img/s':>10s} {'ratio':>6s}")
    for name, s in steps.items():
        v = wall[name]
        print(f"  {name:42s} {s.n_params / 1e6:6.2f}M {np.median(v):9.0f} {rw[name]:5.2f}x {f'{v.min():.0f}-{v.max():.0f}':>10s} "
              f"{np.median(cpu[name]):10.0f} {rc[name]:5.2f}x")
    for name, note in notes.items():
        print(f"  {name}: {note}")
    old, cl = "Nissl 128 px @ 32 um/px (before)", "Nissl 64 px, channels_last"
    print(f"64 px vs 128 px (same 4 mm of tissue): {1 / rw[old]:.2f}x the images/s (CPU time: {1 / rc[old]:.2f}x); "
          f"channels_last at 64 px: {rw[cl]:.2f}x (CPU {rc[cl]:.2f}x: {'faster' if rc[cl] > 1 else 'slower: keep the default memory format'})")
    comp = "Nissl 64 px, torch.compile"
    if comp in steps:
        print(f"torch.compile at 64 px: {rw[comp]:.2f}x (CPU {rc[comp]:.2f}x: {'faster' if rc[comp] > 1 else 'slower: not worth it here'})")
    pli = "PLI 64 px @ 64 um/px (3 stored channels)"
    print(f"PLI vs Nissl at 64 px: {rw[pli]:.2f}x (CPU {rc[pli]:.2f}x)")


if __name__ == "__main__":
    main()
