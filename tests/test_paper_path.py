"""The paper-scale training path, end to end on CPU at the posters' patch size (2048 px at 2 um/px Nissl).

A few square centimetres of phantom cortex (`region_mm`), patches streamed from DataLoader workers (`cache: false`),
a coarse sampling mask (`level: auto`), two DDP ranks under torchrun (gloo), a kill of the whole run after the first
checkpoint, a resumption by the same command, and test patches embedded through a loader. Only the encoder is narrow;
the cost is rendering 2048 px phantom crops (a few CPU-seconds each), so the run is as short as it can be: two steps
(killed after the first), two test patches. Exactness of resumption on several ranks is checked on toy data in
test_training.py (test_ddp_resume_after_a_kill_gives_the_uninterrupted_result). `test_paper_resnet50_step`
(CYTOCLR_SLOW=1) takes one step of the full ResNet-50."""
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cytoclr import phantom, phantom_rendering
from cytoclr.checkpoints import checkpoint_path, load_checkpoint, load_encoder, log_dir
from cytoclr.core import cache_dir, read_yaml_mapping
from cytoclr.geodesic import _cache_stem
from cytoclr.models import embed
from cytoclr.sampling import MAX_MASK_CELLS, PatchDataset, sample_locations, sampling_level
from cytoclr.manifest import load_manifest
from cytoclr.training import split_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin folder: its torchrun and python
# a 2 x 2 cm window of each coronal plane (a = -z, b = x, mm from the plane's centre): dorsolateral cortex of the right
# hemisphere, about 38% of its level-3 mask cells are cortex (checked with PhantomBrain(0).section(0, y_mm=-18, ...))
REGION_MM = [[-65.0, -45.0], [35.0, 55.0]]
POSITIONS_MM = [-22.0, -18.0, -14.0]  # train: the outer two, test: the middle one
STEPS = 2  # killed after step 1, resumed for step 2: the fewest steps that show a resumption


def _manifest(tmp_path) -> Path:
    man = {"reference": {"name": "hcp-s1200"},
           "brains": [{"id": "phantom-0", "phantom": {"seed": 0}}],
           "phantom_series": [{"name": "coronal", "brains": ["phantom-0"], "modalities": ["nissl"], "spacing_um": 2,
                               "position_mm": POSITIONS_MM, "region_mm": REGION_MM}],
           "splits": {"train": {"brains": ["phantom-0"], "series": "coronal", "index": [0, 2]},
                      "test": {"brains": ["phantom-0"], "series": "coronal", "index": [1]}}}
    path = tmp_path / "manifest.yml"
    path.write_text(yaml.safe_dump(man, sort_keys=False))
    return path


def _config(tmp_path, **over) -> Path:
    "examples/paper_train.yml (2048 px, level auto, streamed patches, lr, tau, sigma) made small enough for a CPU."
    d = read_yaml_mapping(ROOT / "examples" / "paper_train.yml", "the config")
    d.update(methods=["geodesic"], arch="quick", width=0.5,  # a 75 k parameter encoder: ~2.5 s per 4 x 2048 px step
             batch_size=2, neighbours=1,  # per rank: one seed location and one neighbour, two views each
             steps=STEPS, warmup_steps=1, checkpoint_every=1, log_every=1, num_workers=1, device="cpu",
             n_samples=64, manifest=str(_manifest(tmp_path)))
    d.update(over)
    assert d["patch_px"] == 2048 and d["level"] == "auto" and d["cache"] is False  # the paper's data path
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _ensure_geodesic_tables(ref, cutoff_mm=30.0):
    "Build the reference's geodesic tables here (about a minute) if the cache lacks them: never in two ranks at once."
    folder = cache_dir() / "geodesic"
    for h in ref.hemis:
        stem = _cache_stem(ref.mid[h], ref.faces[h], 3)
        cut = [float(m.group(1)) for p in folder.glob(f"{stem}-c*mm.npz")
               if (m := re.match(re.escape(stem) + r"-c(.+)mm\.npz$", p.name))]
        if not any(c >= cutoff_mm for c in cut):
            from cytoclr.geodesic import SurfaceDistances
            SurfaceDistances(ref, cutoff_mm=cutoff_mm, progress=False).table(h)


def _env():
    pp = os.environ.get("PYTHONPATH")
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT) + (os.pathsep + pp if pp else "")}


def _launch(cmd, cwd, out: Path) -> subprocess.Popen:
    with open(out, "wb") as f:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(pid: int) -> list:
    "Every live process below `pid` (torchrun starts each rank in a session of its own, with its loader workers)."
    kids = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                kids.setdefault(int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(proc: subprocess.Popen):
    "SIGTERM the launcher's process group (torchrun passes it to its ranks), then SIGKILL whatever is left of the tree."
    pids, groups = _descendants(proc.pid), {proc.pid}
    for p in pids:
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        pass
    for g in groups:  # a group without members is gone (ProcessLookupError)
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    t = time.time()
    while any(_alive(p) for p in pids) and time.time() - t < 30:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "processes of the killed run survived"


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no output)"


def _log_lines(run, step=None) -> list:
    "Rows of log.csv as text (steps <= `step`)."
    path = log_dir(run, "nissl", "geodesic") / "log.csv"
    rows = path.read_text().splitlines()[1:]
    return [r for r in rows if r.strip() and (step is None or int(r.split(",", 1)[0]) <= step)]


def _torchrun(cfg, run):
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "cytoclr.training",
            "--config", str(cfg), "--run-dir", str(run), "--no-progress"]


# ------------------------------------------------------------------------------------------------------------------
def test_paper_examples_load():
    "examples/paper_train.yml and paper_manifest.yml load, and their whole sections are sampled from coarse masks."
    methods, tcfg, dcfg = split_config(read_yaml_mapping(ROOT / "examples" / "paper_train.yml", "the config"))
    assert methods == ["geodesic", "euclidean", "supcon", "simclr", "random"]
    assert (tcfg.arch, dcfg.patch_px, dcfg.level, dcfg.cache) == ("resnet50", 2048, "auto", False)
    man = load_manifest(ROOT / "examples" / "paper_manifest.yml")
    assert {e.spacing_um for e in man.entries if e.modality == "nissl"} == {2.0}
    assert {e.spacing_um for e in man.entries if e.modality == "pli"} == {1.33}
    assert man.split("train", "nissl") and man.split("test", "nissl") and man.split("train", "pli")
    for sec in (man.split("train", "nissl")[0], man.split("train", "pli")[0]):  # ~32k x 48k px, ~48k x 72k px
        assert sampling_level(sec, dcfg.level) >= 4


def test_large_windows_render_in_strips_with_the_same_bits(monkeypatch):
    "A 2048 px patch is rendered in strips of rows (bounded memory); strips give the bits of one whole window."
    sec = phantom.PhantomBrain(0).section(0, y_mm=-18, spacing_um=2.0, region_mm=REGION_MM)
    r, c = (int(x) for x in np.argwhere(sec.cortex_mask(6))[0] * 64)
    win = (slice(r, r + 150), slice(c, c + 170))
    whole = sec.read(*win)
    monkeypatch.setattr(phantom_rendering, "READ_TILE_PX", 1000)  # strips of 5 rows
    assert np.array_equal(sec.read(*win), whole)


@pytest.mark.timeout(600)
def test_paper_path_ddp_kill_resume_embed(tmp_path):
    cfg = _config(tmp_path)
    run = tmp_path / "run"
    man = load_manifest(tmp_path / "manifest.yml")
    ref = man.reference
    _ensure_geodesic_tables(ref)
    test_sections = man.split("test", "nissl")
    sec = test_sections[0]
    # ~2 x 2 cm at 2 um/px: a full-resolution mask would have ~90 M cells; "auto" samples at level 3 (1.4 M)
    assert sec.shape[0] * sec.shape[1] > 16 * MAX_MASK_CELLS and sampling_level(sec, "auto") == 3

    # 1. train on two ranks; kill the whole run as soon as a checkpoint exists
    ckpt = checkpoint_path(run, "nissl", "geodesic")
    out1 = tmp_path / "first.txt"
    proc = _launch(_torchrun(cfg, run), tmp_path, out1)
    deadline = time.time() + 420
    try:
        while True:
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before a checkpoint:\n{_tail(out1)}"
            assert time.time() < deadline, f"no checkpoint after 420 s:\n{_tail(out1)}"
            if ckpt.exists():
                try:
                    if load_checkpoint(ckpt)["step"] >= 1:
                        break
                except Exception:  # replaced while being read
                    pass
            time.sleep(0.2)
    finally:
        _kill(proc)
    first = load_checkpoint(ckpt)
    k = int(first["step"])
    assert 1 <= k < STEPS, f"the run was not interrupted (checkpoint at step {k} of {STEPS})"
    kept = _log_lines(run, k)
    assert [int(r.split(",", 1)[0]) for r in kept] == list(range(1, k + 1))

    # 2. the same command resumes at step k and finishes
    out2 = tmp_path / "second.txt"
    proc = _launch(_torchrun(cfg, run), tmp_path, out2)
    try:
        rc = proc.wait(timeout=max(60.0, deadline + 120 - time.time()))
    finally:
        if proc.poll() is None:
            _kill(proc)
    assert rc == 0, _tail(out2)
    assert f"geodesic: {STEPS} steps" in out2.read_text(), _tail(out2)
    st = load_checkpoint(ckpt)
    assert st["step"] == STEPS and st["world_size"] == 2 and len(st["rng"]) == 2
    rows = _log_lines(run)
    assert rows[:k] == kept, "the rows before the checkpoint were rewritten: the run started over"
    assert [int(r.split(",", 1)[0]) for r in rows] == list(range(1, STEPS + 1))
    with open(log_dir(run, "nissl", "geodesic") / "log.csv", newline="") as f:
        assert all(np.isfinite(float(r["loss"])) for r in csv.DictReader(f))
    data = st["meta"]["data"]  # what sampled the run: the coarse-mask rule, streamed 2048 px patches
    assert data["level"] == "auto" and data["patch_px"] == 2048 and data["cache"] is False
    assert all(sampling_level(s, data["level"]) > 0 for s in man.split("train", "nissl"))
    assert st["config"]["num_workers"] == 1 and st["config"]["batch_size"] == 2

    # 3. embed test patches at 2048 px through a loader with a worker
    class Spy:  # records the mask levels sampling asks for (a full-resolution mask would be level 0)
        def __init__(self, s):
            self.s, self.levels = s, []

        def __getattr__(self, name):
            return getattr(self.s, name)

        def cortex_mask(self, level=0):
            self.levels.append(level)
            return self.s.cortex_mask(level)

    spies = [Spy(s) for s in test_sections]
    samples = sample_locations(spies, 2, seed=1, ref=ref, level=data["level"])
    assert spies[0].levels == [3]
    encoder = load_encoder(run, "geodesic", "nissl")
    feats = embed(encoder, PatchDataset(test_sections, samples, data["patch_px"]), num_workers=1)
    assert feats.shape == (2, encoder.out_dim) and np.isfinite(feats).all()
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("CYTOCLR_SLOW") != "1", reason="ResNet-50 at 2048 px: set CYTOCLR_SLOW=1")
def test_paper_resnet50_step(tmp_path):
    """One step of the full ResNet-50 on two 2048 px patches, one rank: ~15 GB (7.4 GB per image forward + backward),
    2-5 minutes on two cores. Two images are the fewest the trainer takes (batch norm, and a batch of two locations),
    and with one partner per row the loss is identically 0: this checks that the paper's model runs at the paper's
    patch size through the trainer, the streaming loader and `embed`, not that it learns (3 images need ~22 GB)."""
    cfg = _config(tmp_path, arch="resnet50", width=1.0, steps=1, views=1, batch_size=2)
    run = tmp_path / "run"
    man = load_manifest(tmp_path / "manifest.yml")
    _ensure_geodesic_tables(man.reference)
    out = tmp_path / "out.txt"
    proc = _launch([str(BIN / "python"), "-m", "cytoclr.training", "--config", str(cfg), "--run-dir", str(run),
                    "--no-progress"], tmp_path, out)
    try:
        rc = proc.wait(timeout=1500)
    finally:
        if proc.poll() is None:
            _kill(proc)
    assert rc == 0, _tail(out)
    st = load_checkpoint(checkpoint_path(run, "nissl", "geodesic"))
    assert st["step"] == 1 and st["config"]["arch"] == "resnet50"
    rows = _log_lines(run)
    assert len(rows) == 1 and np.isfinite([float(x) for x in rows[0].split(",")[2:5]]).all()  # loss, lr, grad norm
    encoder = load_encoder(run, "geodesic", "nissl")
    assert encoder.out_dim == 2048
    samples = sample_locations(man.split("test", "nissl"), 1, seed=1, ref=man.reference, level="auto")
    feats = embed(encoder, PatchDataset(man.split("test", "nissl"), samples, 2048), num_workers=1)
    assert feats.shape == (1, 2048) and np.isfinite(feats).all()
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
