"Tests of cytoclr.checkpoints: where a run's files live, atomic checkpoints, random states, the per-step log."
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cytoclr.checkpoints import (LOG_FIELDS, checkpoint_meta, checkpoint_path, checkpoint_spacing, load_checkpoint,
                                 log_dir, read_log, rng_state, save_checkpoint, seed_everything, set_rng_state,
                                 truncate_log)
from cytoclr.core import DataError


def test_layout_of_a_run_folder(tmp_path):
    assert checkpoint_path(tmp_path, "pli", "simclr") == Path(tmp_path) / "checkpoints" / "pli" / "simclr" / "last.pt"
    assert log_dir(tmp_path, "nissl", "geodesic") == Path(tmp_path) / "training" / "nissl" / "geodesic"
    assert LOG_FIELDS[0] == "step" and "loss" in LOG_FIELDS


def test_save_and_load_a_checkpoint(tmp_path):
    p = save_checkpoint(tmp_path / "a" / "last.pt", {"step": 5, "w": torch.arange(3)})
    st = load_checkpoint(p)
    assert st["step"] == 5 and torch.equal(st["w"], torch.arange(3))
    assert [q.name for q in p.parent.iterdir()] == ["last.pt"]  # no temporary file left behind
    with pytest.raises(DataError, match="checkpoint not found") as e:
        load_checkpoint(tmp_path / "missing.pt")
    assert e.value.file == tmp_path / "missing.pt"
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(DataError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_random_states_round_trip():
    seed_everything(11)
    s = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(s)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    seed_everything(11)
    assert torch.equal(torch.rand(3), a[0])


def test_truncate_log_keeps_the_rows_up_to_a_step_byte_for_byte(tmp_path):
    p = tmp_path / "log.csv"
    text = "step,loss\n1,0.5\n2,0.25\n3,0.125\n"
    p.write_text(text)
    truncate_log(p, 3)
    assert p.read_text() == text  # nothing to drop
    truncate_log(p, 2)
    assert p.read_text() == "step,loss\n1,0.5\n2,0.25\n"
    assert read_log(p) == [{"step": 1.0, "loss": 0.5}, {"step": 2.0, "loss": 0.25}]
    assert read_log(tmp_path / "none.csv") == []
    truncate_log(tmp_path / "none.csv", 1)  # a missing log is left missing
    assert not (tmp_path / "none.csv").exists()


def test_the_pixel_size_of_the_training_patches_round_trips_and_old_checkpoints_load(tmp_path):
    secs = [SimpleNamespace(spacing_um=s) for s in (64.0, 64, 64.0)]
    meta = checkpoint_meta(secs, 64, data={"patch_px": 64, "split": "train"})
    assert meta == {"data": {"patch_px": 64, "split": "train"}, "spacing_um": 64.0, "patch_px": 64,
                    "patch_mm": 64 * 64.0 / 1000}
    p = save_checkpoint(tmp_path / "new.pt", {"step": 3, "model": {"w": torch.ones(2)}, "meta": meta})
    assert load_checkpoint(p)["meta"] == meta and checkpoint_spacing(p) == (64.0,) == checkpoint_spacing(load_checkpoint(p))
    mixed = checkpoint_meta([SimpleNamespace(spacing_um=s) for s in (32.0, 16.0, 32.0)], 128)
    assert mixed["spacing_um"] == [16.0, 32.0] and mixed["patch_mm"] == [128 * 16.0 / 1000, 128 * 32.0 / 1000]
    assert checkpoint_spacing(save_checkpoint(tmp_path / "mixed.pt", {"meta": mixed})) == (16.0, 32.0)
    for old in ({"step": 3, "meta": {"data": {"patch_px": 64}}}, {"step": 3, "meta": {}}, {"step": 3}):
        assert checkpoint_spacing(save_checkpoint(tmp_path / "old.pt", old)) is None  # written before: unknown
    with pytest.raises(DataError) as e:
        checkpoint_spacing(save_checkpoint(tmp_path / "bad.pt", {"meta": {"spacing_um": float("nan")}}))
    assert e.value.field == "spacing_um" and e.value.file == tmp_path / "bad.pt"
    with pytest.raises(DataError, match="checkpoint not found"):
        checkpoint_spacing(tmp_path / "missing.pt")
