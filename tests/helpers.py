"""Helpers shared by several test files: references of the loss written from its formula and a killed-job stream."""
import math

import torch
import torch.nn.functional as F

from cytoclr import training as T


def slow_spatial_nce(z, w, tau):
    """The loss of chapter 5 written out with loops, in float64 (0 when no row has a positive):
    l(i) = -1/sum_{j!=i} w_ij sum_{j!=i} w_ij log(exp(s_ij/tau) / sum_{k!=i} exp(s_ik/tau)), mean over rows with a positive."""
    z = torch.nn.functional.normalize(z.detach().double(), dim=1)
    n = len(z)
    rows = []
    for i in range(n):
        wsum = sum(float(w[i, j]) for j in range(n) if j != i)
        if wsum <= 0:
            continue
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n) if k != i)
        acc = sum(float(w[i, j]) * math.log(math.exp(float(z[i] @ z[j]) / tau) / denom) for j in range(n) if j != i)
        rows.append(-acc / wsum)
    return sum(rows) / len(rows) if rows else 0.0


def formula_nce(z, w, tau, *, normalise=True, self_in_denominator=False, all_rows=False):
    """The same loss in plain autograd operations, in z's dtype (a second implementation for gradients).

    The switches reproduce typical mistakes (for the exercise checker's tests): raw dot products instead of
    cosines, k = i kept in the denominator, rows without positives counted as zeros in the mean."""
    eye = torch.eye(len(z), dtype=torch.bool)
    z = F.normalize(z, dim=1) if normalise else z
    s = z @ z.T / tau  # (n, n)
    log_p = s - torch.logsumexp(s if self_in_denominator else s.masked_fill(eye, -math.inf), 1, keepdim=True)
    w = torch.as_tensor(w, dtype=z.dtype).masked_fill(eye, 0)  # a new tensor: the caller's weights stay as they are
    l, wsum = -(w * log_p).sum(1), w.sum(1)  # (n,), (n,)
    if all_rows:
        return (l / wsum.clamp_min(1e-300)).mean()
    keep = wsum > 0
    return (l[keep] / wsum[keep]).mean() if keep.any() else z.new_zeros(())


class Interrupt(Exception):
    pass


class Bomb(T.BatchStream):
    "A stream that raises `Interrupt` after `after` batches in total (a killed job)."

    def __init__(self, inner, after):
        self.inner, self.after, self.count = inner, after, 0

    def __len__(self):
        return len(self.inner)

    def epoch(self, e, start=0):
        for b in self.inner.epoch(e, start):
            if self.count == self.after:
                raise Interrupt()
            self.count += 1
            yield b
