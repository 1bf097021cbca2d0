"""Helpers shared by several test files: slow references written from the formula and a killed-job stream."""
import math

import torch

from cytoclr import training as T


def slow_spatial_nce(z, w, tau):
    "DESIGN.md section 2 written out with loops, in float64 (0 when no row has a positive)."
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
