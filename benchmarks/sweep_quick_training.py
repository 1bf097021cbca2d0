"""What the quick training budget buys: train one method with a configuration, then run the offset check.

The offset check is the brain-shift check that chapter 7 used before chapter 9 took it over: test patches
of phantom-0's validation planes, each anchored in a frame of planes of the same brain cut every
`--frame-step` mm, shifted by `--frame-offset` mm so that no frame plane lies near a query plane (the old
check's frames lay 0.44 mm from them). The search is restricted to the query's hemisphere, as in chapter 7,
and the unrestricted numbers are printed as well. Chapter 9's protocol is stricter (no frame patch within a
patch width, 4 mm, of a test plane): use it for results; use this script to compare training settings.

    .venv/bin/python benchmarks/sweep_quick_training.py --name k3 --neighbours 3
    .venv/bin/python benchmarks/sweep_quick_training.py --name before --px 128 --spacing 32 --steps 300 \\
        --samples 2048 --neighbours 7

One JSON line per run (timing, images/s, anchoring), also appended to `--out`.

Measured on the 2-core CPU machine on 2026-12-01 (geodesic Nissl encoder, batch 64 x 2 views, lr 2e-3, tau 0.1,
sigma 5 mm, radius 5 mm; 500 queries, so about +-4 points of binomial error on the shares; frame step 4 mm,
offset 2 mm; the manifest of the commit before the change, with its phantom series set to `--spacing`):

| run | px @ um/px | steps | locations | partners | within 5 mm | median mm |
|---|---|---|---|---|---|---|
| before (old quick profile) | 128 @ 32 | 300 | 2048 | 7 | 13.8% | 34.3 |
| 64 px, same budget | 64 @ 64 | 300 | 2048 | 7 | 12.2% | 35.9 |
| 5x steps, 4x locations | 64 @ 64 | 1500 | 8192 | 7 | 22.8% | 16.0 |
| lr 4e-3 | 64 @ 64 | 1500 | 8192 | 7 | 21.4% | 18.5 |
| batch 128 | 64 @ 64 | 1500 | 8192 | 7 | 20.0% | 17.8 |
| tau 0.2 | 64 @ 64 | 1500 | 8192 | 7 | 20.4% | 20.4 |
| sigma 3 mm | 64 @ 64 | 1500 | 8192 | 7 | 22.0% | 15.4 |
| width 1.5 (1000 steps) | 64 @ 64 | 1000 | 8192 | 7 | 17.4% | 19.1 |
| radius 12 mm | 64 @ 64 | 1500 | 8192 | 7 | 22.4% | 13.1 |
| 1 partner | 64 @ 64 | 1500 | 8192 | 1 | 23.4% | 16.2 |
| 2 partners | 64 @ 64 | 1500 | 8192 | 2 | 24.0% | 14.2 |
| **3 partners (the quick profile)** | 64 @ 64 | 1500 | 8192 | 3 | **26.0%** | **12.7** |
| 3 partners, 1000 steps | 64 @ 64 | 1000 | 8192 | 3 | 22.0% | 18.6 |

The 64 px view at 64 um/px costs a quarter of the pixels of 128 px at 32 um/px for the same 4 mm field of
view (`bench_models.py`: 3.8x the images/s); the budget it frees goes into 5x the steps on 4x the locations;
fewer partners per neighbourhood (more neighbourhoods per batch) helped most of the rest.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from cytoclr.models import embed
from cytoclr.sampling import PatchDataset, sample_locations
from cytoclr.manifest import load_manifest
from cytoclr.checkpoints import load_model
from cytoclr.training import train
from cytoclr.training_config import TrainConfig, build_model
from cytoclr.training_data import DataConfig, build_data, load_training_samples, surface_distances

ROOT = Path(__file__).resolve().parents[1]
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--name", required=True, help="a label for the JSON line")
ap.add_argument("--manifest", default=str(ROOT / "data_manifest.yml"))
ap.add_argument("--px", type=int, default=64, help="patch side in pixels")
ap.add_argument("--spacing", type=float, default=64.0, help="um/px of the manifest's phantom series")
ap.add_argument("--steps", type=int, default=1500)
ap.add_argument("--samples", type=int, default=8192, help="training locations")
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--tau", type=float, default=0.1)
ap.add_argument("--sigma", type=float, default=5.0)
ap.add_argument("--neighbours", type=int, default=3)
ap.add_argument("--radius", type=float, default=5.0)
ap.add_argument("--width", type=float, default=1.0)
ap.add_argument("--method", default="geodesic")
ap.add_argument("--modality", default="nissl")
ap.add_argument("--n-frame", type=int, default=3000)
ap.add_argument("--n-query", type=int, default=500)
ap.add_argument("--frame-step", type=float, default=4.0)
ap.add_argument("--frame-offset", type=float, default=2.0)
ap.add_argument("--out", default="sweep_quick_training.jsonl")
a = ap.parse_args()

tmp = Path(tempfile.mkdtemp(prefix="sweep-"))
spec = yaml.safe_load(Path(a.manifest).read_text())
for s in spec.get("phantom_series", []):
    s["spacing_um"] = a.spacing
(tmp / "m.yml").write_text(yaml.safe_dump(spec))
man = load_manifest(tmp / "m.yml")
dcfg = DataConfig(manifest=str(tmp / "m.yml"), n_samples=a.samples, patch_px=a.px, neighbours=a.neighbours,
                  radius_mm=a.radius, modality=a.modality)
cfg = TrainConfig(method=a.method, width=a.width, steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=20,
                  tau=a.tau, sigma_mm=a.sigma, checkpoint_every=10**6, log_every=10, modality=a.modality)
t0 = time.perf_counter()
sections, samples, ref = load_training_samples(dcfg, man)
distances = surface_distances(ref, 30.0, progress=False)
data = build_data(dcfg, cfg, sections, samples, ref, progress=False, distances=distances)
t_data = time.perf_counter() - t0
t0 = time.perf_counter()
res = train(cfg, data, tmp / "run", model=build_model(cfg), distances=distances, progress=False, write_metrics=False)
t_train = time.perf_counter() - t0

# the offset check: phantom-0's validation planes in a frame of planes every frame_step, shifted by frame_offset
coronal = lambda s: getattr(s, "series", None) in (None, "coronal")  # the coronal series (older manifests: no name)
planes = sorted({s.section for s in man.split("validation", a.modality) if coronal(s)})
own = [s for s in man.sections if s.brain == "phantom-0" and s.modality == a.modality and coronal(s)]
pb = man.phantom_brain("phantom-0")
lo, hi = min(s.y_mm for s in own), max(s.y_mm for s in own)
ys = np.arange(lo + a.frame_offset, hi + 1e-6, a.frame_step)
frame_secs = [pb.section(index=10_000 + k, y_mm=float(y), axis="coronal", spacing_um=a.spacing, modality=a.modality)
              for k, y in enumerate(ys)]
frame = sample_locations(frame_secs, a.n_frame, seed=5, ref=ref, level=2)
fimg = np.stack([PatchDataset(frame_secs, frame, a.px).patch(i) for i in range(len(frame))])
qs = [s for s in own if s.section in planes]
q = sample_locations(qs, a.n_query, seed=6, ref=ref, level=2)
qimg = np.stack([PatchDataset(qs, q, a.px).patch(i) for i in range(len(q))])
m = load_model(tmp / "run", a.method, a.modality)
ff, fq = embed(m.encoder, fimg), embed(m.encoder, qimg)
d = np.linalg.norm(q.xyz[:, None] - frame.xyz[None], axis=-1)  # (q, n) mm
same = q.hemi[:, None] == frame.hemi[None]
sim = fq @ ff.T
err = d[np.arange(len(q)), np.where(same, sim, -np.inf).argmax(1)]  # hemisphere-restricted, as chapter 7
err_all = d[np.arange(len(q)), sim.argmax(1)]  # unrestricted
out = dict(name=a.name, args=vars(a), t_data=round(t_data, 1), t_train=round(t_train, 1),
           images_per_second=round(res.images_per_second, 1), final_loss=round(res.final_loss, 4),
           within_5mm=float((err < 5).mean()), median_mm=float(np.median(err)), within_10mm=float((err < 10).mean()),
           best_within_5mm=float((np.where(same, d, np.inf).min(1) < 5).mean()),
           unrestricted_within_5mm=float((err_all < 5).mean()), unrestricted_median_mm=float(np.median(err_all)),
           frame_planes=len(ys))
print(json.dumps(out))
with open(a.out, "a") as fh:
    fh.write(json.dumps(out) + "\n")
