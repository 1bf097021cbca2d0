"Trainer: schedule, weights, exact resumption, divergence handling, DDP equivalence, logs, loading, CLI."
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from cytoclr import training as T
from cytoclr.core import DataError
from cytoclr.geodesic import geodesic_weights, straight_line
from cytoclr.losses import spatial_nce
from cytoclr.training_data import ToyBatches, ToyPatches
from helpers import Bomb, Interrupt, run_ranks

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- stand-ins (tiny, seeded; the data: cytoclr.training_data)
class ToyModel(nn.Module):
    "Encoder + head with the ContrastiveModel interface; optional dropout makes torch's RNG state matter."

    def __init__(self, dropout=0.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.encoder.out_dim = 16
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x):
        f = self.encoder(x)
        return f, self.head(f)


def toy_build(cfg):
    return ToyModel(seed=cfg.seed)


class ToyDistances:
    "Stand-in for cytoclr.geodesic.SurfaceDistances: 'geodesic' = 1.2 x straight line of the toy positions."

    def matrix(self, hemi, vertex, kind="geodesic"):
        d = straight_line(ToyPatches().xyz[np.asarray(vertex)], hemi_a=np.asarray(hemi))
        return d * 1.2 if kind == "geodesic" else d

    def weights(self, hemi, vertex, sigma_mm, kind="gaussian", metric="geodesic", device="cpu"):
        d = torch.as_tensor(self.matrix(hemi, vertex, metric), dtype=torch.float32, device=device)
        return geodesic_weights(d, sigma_mm, kind)


toy_distances = ToyDistances()


def cfg_(**kw):
    base = dict(method="simclr", steps=10, batch_size=8, views=2, lr=5e-3, warmup_steps=3, checkpoint_every=3,
                log_every=1, seed=0, proj_dim=8, proj_hidden=16)
    base.update(kw)
    return T.TrainConfig(**base)


def stream(n=40, b=8, nan_at=None, rank=0, world=1, views=2):
    return T.BatchStream(ToyPatches(n, views=views, nan_at=nan_at), ToyBatches(n, b, rank=rank, world_size=world))




def weights_of(path):
    return torch.load(path, weights_only=False)["model"]


def ckpt_of(run_dir, method, modality="nissl"):
    return T.checkpoint_path(run_dir, modality, method)


def losses_of(run_dir, method, modality="nissl"):
    return [(r["step"], r["loss"]) for r in T.read_log(T.log_dir(run_dir, modality, method) / "log.csv")]


# ---------------------------------------------------------------- config (schedule and validation: test_training_config.py)
def test_split_config_rejects_typos():
    with pytest.raises(DataError) as e:
        T.split_config({"lerning_rate": 1})
    assert e.value.field == "lerning_rate"
    methods, t, d = T.split_config({"methods": ["geodesic", "supcon"], "lr": 1e-3, "patch_px": 64})
    assert methods == ["geodesic", "supcon"] and t.lr == 1e-3 and d.patch_px == 64


# ---------------------------------------------------------------- weights
def test_weightings_match_formulas(rng):
    n = 12
    hemi = torch.as_tensor(rng.integers(0, 2, n))
    area = torch.as_tensor(rng.integers(0, 3, n))
    index = torch.as_tensor(rng.integers(0, 4, n))
    sigma = 4.0
    _, fn = T.make_weighting("supcon")
    w = fn(area)
    for i in range(n):
        for j in range(n):
            assert float(w[i, j]) == float(area[i] == area[j] and area[i] > 0)
    _, fn = T.make_weighting("simclr")
    assert torch.equal(fn(index), (index[:, None] == index[None, :]).float())
    # geodesic and euclidean read the same surface points, each with its own metric, slow reference from the formula
    vert = torch.arange(n)
    xyz = ToyPatches().xyz[:n]
    for method, factor in (("geodesic", 1.2), ("euclidean", 1.0)):
        keys, fn = T.make_weighting(method, sigma, distances=ToyDistances())
        assert keys == ("hemi", "vertex")
        w = fn(hemi, vert)
        for i in range(n):
            for j in range(n):
                d = factor * math.dist(xyz[i].tolist(), xyz[j].tolist())
                want = math.exp(-d * d / (2 * sigma**2)) if hemi[i] == hemi[j] else 0.0
                assert float(w[i, j]) == pytest.approx(want, abs=1e-6)
    _, fn = T.make_weighting("euclidean", 5.0, kind="threshold", distances=ToyDistances())
    assert torch.equal(fn(hemi, vert), torch.as_tensor(ToyDistances().matrix(hemi, vert, "euclidean") < 5.0).float())
    for m in ("geodesic", "euclidean"):
        with pytest.raises(DataError, match="surface distances"):
            T.make_weighting(m)  # no distance lookup


# ---------------------------------------------------------------- training, resumption, divergence
def test_training_lowers_loss_and_writes_everything(tmp_path):
    cfg = cfg_(method="euclidean", steps=30, checkpoint_every=10, lr=1e-2)
    res = T.train(cfg, stream(), tmp_path, model=ToyModel(), distances=toy_distances, progress=False)
    rows = T.read_log(tmp_path / "training/nissl/euclidean/log.csv")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]])
    st = torch.load(tmp_path / "checkpoints/nissl/euclidean/last.pt", weights_only=False)
    assert st["step"] == 30 and st["config"]["method"] == "euclidean"
    assert list((tmp_path / "training/nissl/euclidean/tb").glob("events.out.tfevents*"))
    m = json.loads((tmp_path / "metrics.json").read_text())["training"]["nissl"]["euclidean"]
    assert m["final_loss"] == pytest.approx(np.mean([r["loss"] for r in rows[-1:]]))
    assert m["images_per_second"] > 0 and res.final_loss == m["final_loss"]
    # lr follows the schedule
    lrs = [r["lr"] for r in rows]
    assert lrs == pytest.approx([cfg.lr * T.lr_factor(s, 30, 3, cfg.min_lr_ratio) for s in range(30)])


def test_loss_in_log_is_the_loss_of_the_logged_step(tmp_path):
    "The first logged loss equals spatial_nce of the untrained model on the first batch (nothing shifted)."
    cfg = cfg_(method="supcon", steps=1)
    data = stream()
    model = ToyModel()
    batch = next(iter(data.epoch(0)))
    x, (area,) = T._to_batch(batch, ("area",), "cpu")
    with torch.no_grad():
        model.train()
        want = spatial_nce(model(x)[1], T.make_weighting("supcon")[1](area), cfg.tau).item()
    T.train(cfg, data, tmp_path, model=ToyModel(), progress=False)
    assert T.read_log(tmp_path / "training/nissl/supcon/log.csv")[0]["loss"] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("method,interrupt_after", [("simclr", 7), ("geodesic", 5), ("supcon", 9)])
def test_resume_gives_the_uninterrupted_result(tmp_path, method, interrupt_after):
    "Train 10 steps (2 epochs of 5 batches) vs. kill after `interrupt_after` steps and resume from the last checkpoint."
    kw = dict(method=method, steps=10, checkpoint_every=3)
    a, b = tmp_path / "a", tmp_path / "b"
    T.train(cfg_(**kw), stream(), a, model=ToyModel(dropout=0.2), distances=toy_distances, progress=False)
    with pytest.raises(Interrupt):
        T.train(cfg_(**kw), Bomb(stream(), interrupt_after), b, model=ToyModel(dropout=0.2),
                distances=toy_distances, progress=False)
    st = torch.load(ckpt_of(b, method), weights_only=False)
    assert st["step"] == (interrupt_after // 3) * 3  # the last checkpoint before the kill
    assert len(losses_of(b, method)) == interrupt_after  # rows past the checkpoint exist until resume drops them
    # resume with a fresh model object whose init differs: everything must come from the checkpoint
    T.train(cfg_(**kw), stream(), b, model=ToyModel(dropout=0.2, seed=99), distances=toy_distances, progress=False)
    la, lb = losses_of(a, method), losses_of(b, method)
    assert [s for s, _ in lb] == list(range(1, 11))
    np.testing.assert_allclose([l for _, l in lb], [l for _, l in la], rtol=0, atol=1e-6)
    wa, wb = weights_of(ckpt_of(a, method)), weights_of(ckpt_of(b, method))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


def test_resume_without_restoring_rng_would_differ(tmp_path):
    "Guard that the resume test can fail: a run restarted from scratch at the checkpoint's weights differs (dropout RNG, data position)."
    kw = dict(method="simclr", steps=10, checkpoint_every=3)
    a, b = tmp_path / "a", tmp_path / "b"
    T.train(cfg_(**kw), stream(), a, model=ToyModel(dropout=0.2), progress=False)
    with pytest.raises(Interrupt):
        T.train(cfg_(**kw), Bomb(stream(), 7), b, model=ToyModel(dropout=0.2), progress=False)
    st = torch.load(ckpt_of(b, "simclr"), weights_only=False)
    st["pos"], st["epoch"] = 0, 0  # forget the data position
    torch.save(st, ckpt_of(b, "simclr"))
    T.train(cfg_(**kw), stream(), b, model=ToyModel(dropout=0.2), progress=False)
    la, lb = losses_of(a, "simclr"), losses_of(b, "simclr")
    assert not np.allclose([l for _, l in lb][6:], [l for _, l in la][6:], atol=1e-6)


def test_finished_run_is_not_retrained_and_changed_config_is_refused_outside_the_book(tmp_path):
    T.train(cfg_(steps=4), stream(), tmp_path, model=ToyModel(), progress=False, origin="cli")
    log = tmp_path / "training/nissl/simclr/log.csv"
    before = log.read_text()
    res = T.train(cfg_(steps=4), stream(), tmp_path, model=ToyModel(), progress=False, origin="cli")
    assert res.steps == 4 and log.read_text() == before
    for kw, field in ((dict(lr=1.0), "lr"), (dict(steps=6), "steps")):  # steps: the schedule's horizon
        with pytest.raises(DataError) as e:
            T.train(cfg_(**{"steps": 4, **kw}), stream(), tmp_path, model=ToyModel(), progress=False, origin="cli")
        assert e.value.field == field and "--no-resume" in str(e.value)
    T.train(cfg_(steps=4, checkpoint_every=1, log_every=2), stream(), tmp_path, model=ToyModel(), progress=False,
            origin="cli")  # bookkeeping may change
    T.train(cfg_(steps=6), stream(), tmp_path, model=ToyModel(), progress=False, resume=False, origin="cli")
    assert len(T.read_log(log)) == 6


IDENTITY = {"data": {"patch_px": 64, "modality": "nissl", "n_samples": 40}, "data_fingerprint": "d1", "code_fingerprint": "c1"}


@pytest.mark.parametrize("change", ["patch_px", "modality", "data_fingerprint", "code_fingerprint", "steps"])
def test_the_book_retrains_when_what_decides_the_result_changed(tmp_path, change, capsys):
    "A changed patch size, modality, data (manifest), code or number of steps retrains the book's checkpoint."
    T.train(cfg_(steps=4), stream(), tmp_path, model=ToyModel(), progress=False, identity=IDENTITY)
    first = losses_of(tmp_path, "simclr")
    ident = {**IDENTITY, "data": dict(IDENTITY["data"])}
    cfg = cfg_(steps=4)
    if change in ("patch_px", "modality"):
        ident["data"][change] = 32 if change == "patch_px" else "pli"
    elif change == "steps":
        cfg = cfg_(steps=6)
    else:
        ident[change] = "other"
    capsys.readouterr()
    res = T.train(cfg, stream(), tmp_path, model=ToyModel(), progress=False, identity=ident)
    out = capsys.readouterr().out
    assert f"training again from step 0: {change}" in out or (change.endswith("fingerprint") and "changed" in out)
    assert res.steps == cfg.steps and len(losses_of(tmp_path, "simclr")) == cfg.steps
    assert torch.load(ckpt_of(tmp_path, "simclr"), weights_only=False)["identity"] == ident
    if change != "steps":
        assert losses_of(tmp_path, "simclr") == first  # the same data stream: the same run again, from step 0


def test_an_unchanged_book_run_resumes_and_a_cli_checkpoint_is_never_overwritten(tmp_path):
    T.train(cfg_(steps=4), stream(), tmp_path, model=ToyModel(), progress=False, identity=IDENTITY)
    before = (tmp_path / "training/nissl/simclr/log.csv").read_text()
    T.train(cfg_(steps=4), stream(), tmp_path, model=ToyModel(), progress=False, identity=dict(IDENTITY))
    assert (tmp_path / "training/nissl/simclr/log.csv").read_text() == before  # resumed: nothing trained again
    cli = tmp_path / "cli"
    T.train(cfg_(steps=4), stream(), cli, model=ToyModel(), progress=False, identity=IDENTITY, origin="cli")
    kept = ckpt_of(cli, "simclr").read_bytes()
    with pytest.raises(DataError, match="trained outside the book.*never overwrites") as e:
        T.train(cfg_(steps=4), stream(), cli, model=ToyModel(), progress=False,
                identity={**IDENTITY, "code_fingerprint": "c2"})
    assert e.value.field == "code_fingerprint" and ckpt_of(cli, "simclr").read_bytes() == kept


def test_nan_input_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    # the NaN sample: the first index of epoch 1's third batch (global step 8)
    s = ToyBatches(40, 8)
    s.set_epoch(1)
    bad = list(s)[2][0]
    data = stream(nan_at=(1, bad))
    with pytest.raises(T.TrainingDiverged) as e:
        T.train(cfg_(steps=10, checkpoint_every=3), data, tmp_path, model=ToyModel(), progress=False)
    msg = str(e.value)
    assert "step 8" in msg and "non-finite" in msg and "step 6" in msg and "last.pt" in msg
    st = torch.load(ckpt_of(tmp_path, "simclr"), weights_only=False)
    assert st["step"] == 6 and all(torch.isfinite(v).all() for v in st["model"].values())
    assert len(T.read_log(tmp_path / "training/nissl/simclr/log.csv")) == 7  # steps 1..7 logged, step 8 not


def test_nan_loss_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    real = T.spatial_nce_distributed
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 5 else out
    monkeypatch.setattr(T, "spatial_nce_distributed", poisoned)
    with pytest.raises(T.TrainingDiverged, match=r"loss became nan .*step 5"):
        T.train(cfg_(steps=10, checkpoint_every=2), stream(), tmp_path, model=ToyModel(), progress=False)
    st = torch.load(ckpt_of(tmp_path, "simclr"), weights_only=False)
    assert st["step"] == 4 and all(torch.isfinite(v).all() for v in st["model"].values())


def test_single_view_batches_and_missing_fields(tmp_path):
    res = T.train(cfg_(method="euclidean", views=1, steps=3), stream(views=1), tmp_path, model=ToyModel(),
                  distances=toy_distances, progress=False)
    assert res.steps == 3 and math.isfinite(res.final_loss)
    with pytest.raises(DataError, match="no field"):
        T.train(cfg_(method="euclidean", steps=3), stream(), tmp_path / "x", model=ToyModel(), progress=False,
                weighting=(("depth",), lambda d: d))


def test_final_loss_is_the_mean_of_the_last_logged_losses():
    assert T.final_loss([4.0, 3.0, 2.0, 1.0], [9.0], 2) == 1.5
    assert T.final_loss([4.0, 3.0], [9.0], 10) == 3.5  # fewer rows than log_every: all of them
    assert T.final_loss([], [2.0, 4.0], 3) == 3.0  # a rank without a log: its own recent losses


def test_training_metrics_by_hand(tmp_path):
    r = T.TrainResult("supcon", 12, 0.75, 300.0, tmp_path / "c.pt", tmp_path / "log.csv")
    m = T.training_metrics(cfg_(method="supcon", modality="pli"), r, world=2)
    assert m == {"training": {"pli": {"supcon": {"final_loss": 0.75, "images_per_second": 300.0, "steps": 12,
                                                 "world_size": 2}}}}
    T.record_training(tmp_path, cfg_(method="supcon"), r)
    got = json.loads((tmp_path / "metrics.json").read_text())["training"]["nissl"]["supcon"]
    assert got == {"final_loss": 0.75, "images_per_second": 300.0, "steps": 12, "world_size": 1}


def test_reported_final_loss_and_steps_come_from_the_log(tmp_path):
    cfg = cfg_(steps=7, log_every=3)
    r = T.train(cfg, stream(), tmp_path, model=ToyModel(), progress=False)
    rows = T.read_log(T.log_dir(tmp_path, "nissl", "simclr") / "log.csv")
    assert r.steps == 7 and r.final_loss == pytest.approx(np.mean([x["loss"] for x in rows[-3:]]), rel=0, abs=0)
    m = json.loads((tmp_path / "metrics.json").read_text())["training"]["nissl"]["simclr"]
    assert m["final_loss"] == r.final_loss and m["steps"] == 7 and m["images_per_second"] == r.images_per_second


def test_richest_neighbourhood_by_hand():
    D = np.array([[0, 1, 4, 9], [1, 0, 2, 3], [4, 2, 0, 1], [9, 3, 1, 0.0]])
    close, c, near = T.richest_neighbourhood(D, 2.5, 2)
    assert close.tolist() == [1, 2, 2, 1] and c == 1 and near.tolist() == [1, 0, 2]  # the first of equals; 2 closest


def test_anchoring_in_miniature_by_hand():
    xyz = np.array([[0, 0, 0], [3, 0, 0], [20, 0, 0], [0, 4, 0.0]])
    hemi = np.array([0, 0, 0, 1])
    f = np.array([[1, 0], [0.96, 0.28], [0, 1], [1, 0.0]])  # unit rows (cosine similarity = dot product)
    d = T.nearest_feature_neighbours(f, xyz, hemi)
    # 0 -> 3 (other hemisphere: inf), 1 -> 0 (3 mm; 3 is as similar, the first wins), 2 -> 1 (17 mm), 3 -> 0 (inf)
    assert d.tolist() == [np.inf, 3.0, 17.0, np.inf]
    assert T.neighbour_summary(d) == {"median_mm": np.inf, "within_10mm": 0.25}
    assert T.neighbour_summary(np.array([1.0, 12.0, 3.0])) == {"median_mm": 3.0, "within_10mm": pytest.approx(2 / 3)}


# ---------------------------------------------------------------- loading encoders
def test_load_encoder_returns_trained_weights_in_eval_mode(tmp_path):
    T.train(cfg_(steps=3), stream(), tmp_path, model=ToyModel(), progress=False)
    enc = T.load_encoder(tmp_path, "simclr", "nissl", "cpu", build=toy_build)
    assert not enc.training
    st = weights_of(ckpt_of(tmp_path, "simclr"))
    for k, v in enc.state_dict().items():
        assert torch.equal(v, st["encoder." + k])
    # random: the seeded initialisation, nothing trained
    rnd = T.load_encoder(tmp_path, "random", "nissl", "cpu", build=toy_build)
    init = ToyModel(seed=0).encoder.state_dict()
    assert all(torch.equal(rnd.state_dict()[k], init[k]) for k in init)
    assert not all(torch.equal(rnd.state_dict()[k], enc.state_dict()[k]) for k in init)
    T.train(cfg_(method="random"), None, tmp_path, model=toy_build(cfg_(method="random")), progress=False)
    assert torch.load(ckpt_of(tmp_path, "random"), weights_only=False)["step"] == 0
    with pytest.raises(DataError, match="checkpoint not found"):
        T.load_encoder(tmp_path / "nothing", "simclr", build=toy_build)


# ---------------------------------------------------------------- DDP on CPU (gloo, 2 processes)
def _ddp_worker(rank, world, port, run_dir, method):
    # the environment torchrun gives each process; train() starts the process group from it (gloo on CPU)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        T.train(cfg_(method=method, steps=6, batch_size=4), stream(b=4, rank=rank, world=world), run_dir,
                model=ToyModel(), distances=toy_distances, progress=False)
        assert dist.is_initialized() and dist.get_world_size() == world
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", ["geodesic", "simclr"])
def test_ddp_two_ranks_equal_one_process_on_the_global_batch(tmp_path, method):
    "2 gloo ranks x 4 locations per step train exactly like 1 process x 8 locations (same global batches)."
    torch.set_num_threads(1)
    T.train(cfg_(method=method, steps=6, batch_size=8), stream(b=8), tmp_path / "one", model=ToyModel(),
            distances=toy_distances, progress=False)
    run_ranks(_ddp_worker, tmp_path / "two", method)
    l1, l2 = losses_of(tmp_path / "one", method), losses_of(tmp_path / "two", method)
    np.testing.assert_allclose([l for _, l in l2], [l for _, l in l1], rtol=1e-5)
    w1, w2 = weights_of(ckpt_of(tmp_path / "one", method)), weights_of(ckpt_of(tmp_path / "two", method))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    st = torch.load(ckpt_of(tmp_path / "two", method), weights_only=False)
    assert st["world_size"] == 2 and len(st["rng"]) == 2


def _ddp_resume_worker(rank, world, port, run_dir, interrupt_after):
    "One rank of a 2-process run with dropout; `interrupt_after`: kill it (on every rank) after that many batches."
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    data = stream(b=4, rank=rank, world=world)
    try:
        T.train(cfg_(method="geodesic", steps=10, batch_size=4, checkpoint_every=3), Bomb(data, interrupt_after)
                if interrupt_after else data, run_dir, model=ToyModel(dropout=0.2, seed=rank + 5), distances=toy_distances,
                progress=False)
    except Interrupt:
        pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_ddp_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    "2 gloo ranks killed after 7 steps and restarted resume from step 6 with every rank's RNG: same losses and weights."
    a, b = tmp_path / "a", tmp_path / "b"
    run_ranks(_ddp_resume_worker, a, 0)
    run_ranks(_ddp_resume_worker, b, 7)
    st = torch.load(ckpt_of(b, "geodesic"), weights_only=False)
    assert st["step"] == 6 and len(st["rng"]) == 2
    with pytest.raises(DataError, match="written by 2 ranks"):  # not resumable by another number of processes
        T.train(cfg_(method="geodesic", steps=10, batch_size=4, checkpoint_every=3), stream(b=4), b,
                model=ToyModel(dropout=0.2), distances=toy_distances, progress=False)
    run_ranks(_ddp_resume_worker, b, 0)
    la, lb = losses_of(a, "geodesic"), losses_of(b, "geodesic")
    assert [s for s, _ in lb] == list(range(1, 11))
    np.testing.assert_allclose([l for _, l in lb], [l for _, l in la], rtol=0, atol=1e-6)
    wa, wb = weights_of(ckpt_of(a, "geodesic")), weights_of(ckpt_of(b, "geodesic"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- command line
def test_cli_help_and_import_does_not_run(capsys):
    # the help in this process (`python -m cytoclr.training` as a command: test_cli_reports_bad_config_in_one_line)
    with pytest.raises(SystemExit) as e:
        T.main(["--help"])
    assert e.value.code == 0 and "torchrun" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-c", "import cytoclr.training"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout == ""


def test_cli_reports_bad_config_in_one_line(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("method: geodesic\nlerning_rate: 0.1\n")
    r = subprocess.run([sys.executable, "-m", "cytoclr.training", "--config", str(cfg), "--run-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "lerning_rate" in r.stderr and "Traceback" not in r.stderr


def test_cli_trains_the_methods_of_a_config(tmp_path, monkeypatch):
    "main() end to end on the toy data: config file + override, every method, exit code 0, resumable."
    monkeypatch.setattr(T, "load_training_samples", lambda dcfg, *a, **kw: (None, None, None))
    monkeypatch.setattr(T, "build_data", lambda dcfg, cfg, *a, **kw: stream(b=cfg.batch_size))
    monkeypatch.setattr(T, "run_identity", lambda dcfg, man: IDENTITY)
    monkeypatch.setattr(T, "load_manifest", lambda p: type("Manifest", (), {"reference": "REF"})())
    monkeypatch.setattr(T, "surface_distances", lambda ref, **kw: toy_distances)
    monkeypatch.setattr(T, "build_model", lambda cfg: ToyModel(seed=cfg.seed))
    monkeypatch.setattr(T, "training_sections", lambda dcfg, man: [type("Sec", (), {"spacing_um": 20.0})()] * 2)
    cfg = tmp_path / "train.yml"
    cfg.write_text("methods: [geodesic, supcon, random]\nsteps: 3\nbatch_size: 8\nproj_dim: 8\nproj_hidden: 16\n")
    assert T.main(["--config", str(cfg), "--run-dir", str(tmp_path / "run"), "-p", "steps=4", "--no-progress"]) == 0
    for m in ("geodesic", "supcon", "random"):
        st = torch.load(ckpt_of(tmp_path / "run", m), weights_only=False)
        assert st["step"] == (0 if m == "random" else 4) and st["config"]["steps"] == 4
        assert st["meta"]["spacing_um"] == 20.0 and st["meta"]["patch_mm"] == st["meta"]["data"]["patch_px"] * 20.0 / 1000
    assert set(json.loads((tmp_path / "run/metrics.json").read_text())["training"]["nissl"]) == {"geodesic", "supcon"}
    assert torch.load(ckpt_of(tmp_path / "run", "geodesic"), weights_only=False)["origin"] == "cli"


# ---------------------------------------------------------------- training data restricted to some brains
# ---------------------------------------------------------------- several runs at once
def _jobs(run_dir, methods, nan_at=None):
    return [T.TrainJob(cfg_(method=m, steps=8),
                       stream(nan_at=nan_at if m == "supcon" else None), run_dir, distances=toy_distances,
                       model=ToyModel(dropout=0.2)) for m in methods]


@pytest.fixture
def one_thread():
    "The reference runs with the workers' single thread, so that both sides sum in the same order."
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("methods", [["geodesic", "simclr", "supcon", "euclidean"], ["geodesic", "simclr", "random", "supcon"]])
def test_train_many_gives_what_one_run_after_another_gives(tmp_path, methods, one_thread):
    "Two forked workers (and, for an odd count, the last run here) equal `train` run by run: weights, logs, metrics."
    a, b = tmp_path / "many", tmp_path / "one_by_one"
    res = T.train_many(_jobs(a, methods), workers=2, progress=False)
    assert [r.method for r in res] == methods
    for j in _jobs(b, methods):
        T.train(j.cfg, j.data, b, model=j.model, distances=toy_distances, progress=False)
    ma, mb = (json.loads((d / "metrics.json").read_text())["training"]["nissl"] for d in (a, b))
    assert sorted(ma) == sorted(m for m in methods if m != "random") == sorted(mb)
    for m in methods:
        wa, wb = weights_of(ckpt_of(a, m)), weights_of(ckpt_of(b, m))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), m
        if m != "random":
            assert losses_of(a, m) == losses_of(b, m) and len(losses_of(a, m)) == 8
            assert ma[m]["final_loss"] == mb[m]["final_loss"] and ma[m]["steps"] == 8


def test_train_many_stops_on_a_workers_error_and_checks_its_arguments(tmp_path, one_thread):
    with pytest.raises(T.TrainingDiverged, match="non-finite embeddings"):
        T.train_many(_jobs(tmp_path, ["simclr", "supcon"], nan_at=(0, 5)), workers=2, progress=False)
    ck = T.checkpoint_path(tmp_path, "nissl", "supcon")
    assert not ck.exists() or torch.load(ck, weights_only=False)["step"] < 8  # the last good checkpoint, if any
    m = json.loads((tmp_path / "metrics.json").read_text())["training"]["nissl"] if (tmp_path / "metrics.json").exists() else {}
    assert "supcon" not in m
    with pytest.raises(DataError, match="workers must be a positive number"):
        T.train_many(_jobs(tmp_path, ["simclr"]), workers=-1)
    with pytest.raises(DataError, match="TrainJob"):
        T.train_many([cfg_()])
    assert T.train_many([]) == []
