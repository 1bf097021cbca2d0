"""Helpers shared by several test files: references of the loss written from its formula, a killed-job stream, and a
cortex pixel of a section."""
import importlib.util
import math
import socket
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
import yaml
import zarr
from PIL import Image

from cytoclr import training as T
from cytoclr.core import path_fingerprint
from cytoclr.sections import mask_shape, to_reference


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


def free_port() -> int:
    "A TCP port of 127.0.0.1 that nothing listens on now (for a gloo process group)."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, *args, world: int = 2):
    """Call `fn(rank, world, port, *args)` in `world` processes (a gloo group on 127.0.0.1:port) and wait for them all;
    an exception in any rank is raised here.

    The ranks are forked, not spawned: a spawned rank imports torch, cytoclr and the test module again (several seconds
    per process on two cores), a forked one starts at once. `fn` must set `torch.set_num_threads(1)` first (libgomp
    hangs in a forked child that asks for more threads than one). What a fresh interpreter per rank would add (torchrun,
    separate imports, killing the process tree) is covered by test_paper_path.py."""
    import torch.multiprocessing as mp
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method="fork")


def cortex_centre(sec, rng, level=4):
    "A random pixel (row, col) of a section whose neighbourhood is cortex (from the level-`level` mask)."
    r, c = np.nonzero(sec.cortex_mask(level))
    i = rng.integers(len(r))
    return int(r[i] * 2 ** level), int(c[i] * 2 ** level)


# ---------------------------------------------------------------- fake sections and brains (the data tests)
ROOT = Path(__file__).resolve().parents[1]
HAS_PHANTOM = importlib.util.find_spec("cytoclr.phantom") is not None


# ---------------------------------------------------------------- a fake phantom (export mechanics only)
def coronal_affine(spacing_mm, x0=-80.0, y=-18.0, z0=75.0):
    "Rows go down (-z), columns go right (+x), on the plane MNI y = y."
    return np.array([[0.0, spacing_mm, x0], [0.0, 0.0, y], [-spacing_mm, 0.0, z0]])


class FakeSection:
    "Deterministic per-pixel values, so any window equals the same part of any other window."

    def __init__(self, seed, index, y_mm, spacing_um, modality, shape=(130, 170), fail_after=None):
        self.seed, self.index, self.spacing_um, self.modality = seed, index, spacing_um, modality
        self.shape, self.channels = shape, 1 if modality == "nissl" else 3
        self.channel_names = ("intensity",) if modality == "nissl" else ("transmittance", "retardation", "direction")
        self.affine = coronal_affine(spacing_um / 1000, y=y_mm)
        self.reads, self.fail_after = 0, fail_after

    def read(self, rows, cols):
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise KeyboardInterrupt  # what a killed process looks like from inside
        r = np.arange(rows.start, rows.stop)[:, None]
        c = np.arange(cols.start, cols.stop)[None, :]
        v = (np.sin(r * 0.37 + c * 0.11 + self.seed + self.index) * 0.5 + 0.5).astype(np.float32)
        if self.modality == "nissl":
            return v[None]
        return np.stack([v, 1 - v, (v * 179.0).astype(np.float32)])

    def cortex_mask(self, level=0):
        h, w = mask_shape(self.shape, level)
        k = 2 ** level
        r, c = np.meshgrid(np.arange(h) * k, np.arange(w) * k, indexing="ij")
        d2 = (r - self.shape[0] / 2) ** 2 + (c - self.shape[1] / 2) ** 2
        return (d2 < (self.shape[0] * 0.4) ** 2) & (d2 > (self.shape[0] * 0.25) ** 2)


class FakeBrain:
    built = 0

    def __init__(self, seed, ref=None, fail_after=None):
        self.seed, self.fail_after = seed, fail_after
        FakeBrain.built += 1

    def section(self, index=0, y_mm=None, spacing_um=32.0, modality="nissl", **kw):
        fail = 0 if self.fail_after is not None and index >= self.fail_after else None
        return FakeSection(self.seed, index, y_mm, spacing_um, modality, fail_after=fail)


class _Ref:
    "Just enough of a reference for `phantom_y_positions`."
    hemis = ("L",)
    mid = {"L": np.array([[0.0, -100.0, 0.0], [0.0, 70.0, 0.0]])}


# ---------------------------------------------------------------- manifests (the manifest and data-check tests)
def _good_manifest(tmp_path, ref):
    "Three file sections (OME-Zarr, tiled TIFF, PNG + mask) on a coronal plane through the reference, and a manifest."
    s_mm, H, W = 2.0, 64, 80
    A = coronal_affine(s_mm, x0=-80.0, y=-18.0, z0=78.0)
    rr, cc = np.mgrid[0:H, 0:W]
    mask = ref.locate(to_reference(A, np.stack([rr.ravel(), cc.ravel()], 1))).inside.reshape(H, W)
    assert mask.mean() > 0.05
    img = np.where(mask, 0.3, 0.9).astype(np.float32)
    d = tmp_path / "data"
    d.mkdir()
    g = zarr.open_group(str(d / "a.ome.zarr"), mode="w")
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}],
                                                         "datasets": [{"path": "0"}]}]}
    g.create_array("0", shape=(1, H, W), chunks=(1, 32, 32), dtype="float32")[:] = img[None]
    tifffile.imwrite(d / "b.tif", np.stack([img, img, img * 100], 0).astype(np.float32), tile=(32, 32),
                     photometric="minisblack", planarconfig="separate")
    Image.fromarray((img * 255).astype(np.uint8)).save(d / "c.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(d / "c_mask.png")
    aff = A.tolist()
    man = {
        "reference": {"name": "hcp-s1200"},
        "brains": [{"id": "lab-1"}, {"id": "lab-2", "description": "the held-out brain"}],
        "sections": [
            {"id": "lab-1/a", "brain": "lab-1", "path": "data/a.ome.zarr", "sha256": path_fingerprint(d / "a.ome.zarr"),
             "modality": "nissl", "spacing_um": 2000.0, "transform": {"affine": aff}, "index": 1},
            {"id": "lab-1/b", "brain": "lab-1", "path": "data/b.tif", "sha256": path_fingerprint(d / "b.tif"),
             "modality": "pli", "spacing_um": 2000.0, "transform": {"affine": aff}},
            {"id": "lab-2/c", "brain": "lab-2", "path": "data/c.png", "sha256": path_fingerprint(d / "c.png"),
             "modality": "nissl", "spacing_um": 2000.0, "transform": {"affine": aff},
             "mask": {"path": "data/c_mask.png", "sha256": path_fingerprint(d / "c_mask.png")}},
        ],
        "splits": {"train": ["lab-1/a"], "test": {"brains": "lab-1", "modality": "pli"}, "unseen_brains": ["lab-2"]},
    }
    return man


def _write(tmp_path, man, name="data_manifest.yml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(man, sort_keys=False))
    return p


def _base(tmp_path):
    "A small valid manifest: one file section (PNG, polygon mask) of a file brain, and a phantom brain."
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path / "a.png")
    return {"brains": [{"id": "p", "phantom": {"seed": 0}}, {"id": "f"}],
            "sections": [{"id": "f/a", "brain": "f", "path": "a.png", "sha256": path_fingerprint(tmp_path / "a.png"),
                          "modality": "nissl", "spacing_um": 2000.0, "transform": {"affine": coronal_affine(2.0).tolist()},
                          "mask": {"polygon": [[0, 0], [0, 15], [15, 15]]}}],
            "splits": {"train": ["f/a"]}}


SERIES = {"brains": ["p"], "modalities": ["nissl"], "spacing_um": 4000.0, "position_mm": [-20.0]}
# (where in the manifest, the value put there, the field path the finding must name)
WRONG_TYPES = [
    ((), ["reference", "brains"], ""), ((), "just text", ""), ((), 42, ""), ((), None, ""),
    (("brains",), 3, "brains"), (("brains",), {"id": "x"}, "brains"), (("brains", 1), "f", "brains[1]"),
    (("brains", 1, "id"), ["f"], "brains[1].id"), (("brains", 0, "phantom"), 3, "brains[0].phantom"),
    (("brains", 0, "phantom"), {"seed": "x"}, "brains[0].phantom.seed"),
    (("reference",), 5, "reference"), (("reference",), {"hemispheres": [1]}, "reference.hemispheres"),
    (("reference",), {"hemispheres": {"L": 3}}, "reference.hemispheres.L"),
    (("reference",), {"hemispheres": {"L": {"white": [1], "pial": {"a": 1}}}}, "reference.hemispheres.L.white"),
    (("reference",), {"name": ["hcp"]}, "reference.name"),
    (("pairing",), [1], "pairing"), (("pairing",), {"max_distance_mm": [1]}, "pairing.max_distance_mm"),
    (("pairing",), {"max_angle_deg": "5"}, "pairing.max_angle_deg"),
    (("sections",), {"a": 1}, "sections"), (("sections",), "a.png", "sections"), (("sections", 0), 5, "sections[0]"),
    (("sections", 0, "modality"), ["nissl"], "sections[0].modality"),
    (("sections", 0, "modality"), {"nissl": 1}, "sections[0].modality"),
    (("sections", 0, "spacing_um"), {"a": 1}, "sections[0].spacing_um"),
    (("sections", 0, "spacing_um"), [2000], "sections[0].spacing_um"),
    (("sections", 0, "spacing_um"), "2000", "sections[0].spacing_um"),
    (("sections", 0, "spacing_um"), float("inf"), "sections[0].spacing_um"),
    (("sections", 0, "index"), 1.5, "sections[0].index"), (("sections", 0, "index"), [1], "sections[0].index"),
    (("sections", 0, "path"), ["a.png"], "sections[0].path"), (("sections", 0, "path"), {"a": 1}, "sections[0].path"),
    (("sections", 0, "path"), "a" * 5000, "sections[0].path"),
    (("sections", 0, "sha256"), 5, "sections[0].sha256"), (("sections", 0, "sha256"), ["0" * 64], "sections[0].sha256"),
    (("sections", 0, "transform"), [1], "sections[0].transform"),
    (("sections", 0, "transform"), {"affine": "x"}, "sections[0].transform.affine"),
    (("sections", 0, "transform"), {"affine": {"a": 1}}, "sections[0].transform.affine"),
    (("sections", 0, "transform"), {"affine": [[1, 2], [3]]}, "sections[0].transform.affine"),
    (("sections", 0, "mask"), [1], "sections[0].mask"), (("sections", 0, "mask"), {"path": {"a": 1}}, "sections[0].mask.path"),
    (("sections", 0, "mask"), {"polygon": "x"}, "sections[0].mask.polygon"),
    (("sections", 0, "mask"), {"path": "a.png", "sha256": 7}, "sections[0].mask.sha256"),
    (("sections", 0, "channel_names"), {"a": 1}, "sections[0].channel_names"),
    (("sections", 0, "series"), [1], "sections[0].series"), (("sections", 0, "id"), {"a": 1}, "sections[0].id"),
    (("sections", 0, "brain"), ["f"], "sections[0].brain"),
    (("sections",), [{"brain": "p", "modality": "nissl", "spacing_um": 64, "phantom": 3}], "sections[0].phantom"),
    (("phantom_series",), 3, "phantom_series"), (("phantom_series",), [3], "phantom_series[0]"),
    (("phantom_series",), [{**SERIES, "modalities": [["nissl"]]}], "phantom_series[0].modalities[0]"),
    (("phantom_series",), [{**SERIES, "modalities": {"nissl": 1}}], "phantom_series[0].modalities[0]"),
    (("phantom_series",), [{**SERIES, "brains": {"p": 1}}], "phantom_series[0].brains[0]"),
    (("phantom_series",), [{**SERIES, "spacing_um": [64]}], "phantom_series[0].spacing_um"),
    (("phantom_series",), [{**SERIES, "position_mm": "x"}], "phantom_series[0].position_mm"),
    (("phantom_series",), [{**SERIES, "position_mm": [[1]]}], "phantom_series[0].position_mm[0]"),
    (("phantom_series",), [{**SERIES, "position_mm": {"start": 0, "stop": "x", "count": 2}}], "phantom_series[0].position_mm.stop"),
    (("phantom_series",), [{**SERIES, "position_mm": {"start": 0, "stop": 1, "count": [2]}}], "phantom_series[0].position_mm.count"),
    (("phantom_series",), [{**SERIES, "name": ["a"]}], "phantom_series[0].name"),
    (("splits",), [1], "splits"), (("splits", "train"), 5, "splits.train"), (("splits", "train"), [[1]], "splits.train[0]"),
    (("splits", "train"), {"index": [[1]]}, "splits.train.index"), (("splits", "train"), {"index": {"a": 1}}, "splits.train.index"),
    (("splits", "train"), {"modality": [["nissl"]]}, "splits.train.modality"),
    (("splits", "train"), {"brains": [{"f": 1}]}, "splits.train.brains"),
    (("splits", "train"), {"series": [{"a": 1}]}, "splits.train.series"),
    (("splits", "unseen_brains"), {"a": 1}, "splits.unseen_brains[0]"),
]


def _wrong(tmp_path, where, value):
    "The base manifest with `value` put at `where`, written to a file."
    man = _base(tmp_path)
    if not where:
        man = value
    else:
        node = man
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = value
    p = tmp_path / "data_manifest.yml"
    p.write_text(yaml.safe_dump(man, sort_keys=False))
    return p


NOT_MANIFESTS = {
    "passwd": lambda p: p.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"),
    "binary": lambda p: p.write_bytes(bytes(range(256)) * 16),
    "nul_bytes": lambda p: p.write_bytes(b"brains: \x00\x00\n"),
    "list": lambda p: p.write_text("- reference\n- brains\n"),
    "scalar": lambda p: p.write_text("42\n"),
    "empty": lambda p: p.write_text(""),
    "folder": lambda p: p.mkdir(),
    "broken": lambda p: p.write_text("brains: [\n"),
    "two_documents": lambda p: p.write_text("brains: []\n---\nbrains: []\n"),
    "python_tag": lambda p: p.write_text("brains: !!python/object:os.system {}\n"),
    "missing": lambda p: None,
}
