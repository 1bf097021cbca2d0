"""Forward + backward of the contrastive loss at batch 2048, dim 128: cytoclr vs pytorch-metric-learning.

Same input for both: random embeddings and 64 area labels; ours is `spatial_nce(z, label_weights(y), tau)`
(the weight matrix built inside the timed region, as SupConLoss builds its masks from labels).
Prints the median of interleaved repeats (other processes may share the CPU) and the ratio. Goal: >= 1.5x.
    python benchmarks/bench_loss.py [--n 2048] [--dim 128] [--repeats 7]
"""
import argparse
import statistics
import time

import torch
from pytorch_metric_learning.losses import SupConLoss

from cytoclr.losses import label_weights, spatial_nce


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=64)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(a.n, a.dim, generator=g)
    y = torch.randint(0, a.classes, (a.n,), generator=g)
    peer = SupConLoss(temperature=a.tau)

    def ours():
        z = z0.clone().requires_grad_()
        loss = spatial_nce(z, label_weights(y), a.tau)
        loss.backward()
        return loss.item(), z.grad

    def theirs():
        z = z0.clone().requires_grad_()
        loss = peer(z, y)
        loss.backward()
        return loss.item(), z.grad

    (lo, go), (lt, gt) = ours(), theirs()  # warm-up, and the two must agree
    assert abs(lo - lt) < 1e-4 * abs(lt), (lo, lt)
    assert torch.allclose(go, gt, rtol=1e-3, atol=1e-7), float((go - gt).abs().max())
    t_o, t_t = [], []
    for _ in range(a.repeats):
        for f, ts in ((ours, t_o), (theirs, t_t)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    mo, mt = statistics.median(t_o), statistics.median(t_t)
    print(f"batch {a.n}, dim {a.dim}, {a.classes} labels, tau {a.tau}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; loss {lo:.6f} (pml {lt:.6f})")
    print(f"cytoclr spatial_nce + label_weights : median {1e3 * mo:7.1f} ms  (min {1e3 * min(t_o):.1f})")
    print(f"pytorch-metric-learning SupConLoss  : median {1e3 * mt:7.1f} ms  (min {1e3 * min(t_t):.1f})")
    print(f"ratio (SupConLoss / ours): {mt / mo:.2f}x  (goal >= 1.5x)")


if __name__ == "__main__":
    main()
