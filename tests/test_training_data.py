"Tests of cytoclr.training_data: the restartable batch stream, the toy data, the data configuration and samples."
import shutil
from pathlib import Path

import pytest
import torch

import cytoclr.training_data as D
from cytoclr.core import DataError
from cytoclr.training_data import BatchStream, DataConfig, ToyBatches, ToyPatches, run_identity, spread

ROOT = Path(__file__).resolve().parents[1]


def test_toy_patches_are_seeded_by_epoch_and_index():
    ds = ToyPatches(10, px=6, views=2)
    a = ds[3]
    assert a["image"].shape == (2, 1, 6, 6) and a["index"] == 3 and a["section"] == 0
    assert torch.equal(ToyPatches(10, px=6)[3]["image"], a["image"])  # the same (seed, epoch, index): the same views
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["image"], a["image"])  # another epoch: other noise
    base = torch.from_numpy(ds.base[3])
    assert (ds[3]["image"][:, 0] - base).abs().mean() < 0.5  # noise of scale 0.3 around the position's image
    assert (ToyPatches(10).area[:3] == 0).all() and set(ToyPatches(40).hemi) == {0, 1}
    nan = ToyPatches(10, nan_at=(0, 4))
    assert torch.isnan(nan[4]["image"]).all() and not torch.isnan(nan[5]["image"]).any()


def test_toy_batches_shard_a_seeded_permutation():
    one = ToyBatches(40, 8)
    assert len(one) == 5 and sorted(sum(list(one), [])) == list(range(40))
    r0, r1 = ToyBatches(40, 4, rank=0, world_size=2), ToyBatches(40, 4, rank=1, world_size=2)
    assert len(r0) == 5 and [a + b for a, b in zip(r0, r1)] == list(one)  # the ranks' slices make the global batch
    one.set_epoch(1)
    assert list(one) != list(ToyBatches(40, 8))


def test_batch_stream_restarts_mid_epoch():
    s = BatchStream(ToyPatches(24, 8), ToyBatches(24, 8))
    assert len(s) == 3
    full = [b["index"].tolist() for b in s.epoch(2)]
    rest = [b["index"].tolist() for b in s.epoch(2, start=2)]
    assert rest == full[2:] and list(s.epoch(2, start=3)) == []
    imgs = [b["image"] for b in s.epoch(2)]
    assert torch.equal([b["image"] for b in s.epoch(2, start=1)][0], imgs[1])


def test_spread_by_hand():
    assert spread(list("abcdefghij"), 4) == ["a", "d", "g", "j"]
    assert spread([1, 2, 3], 0) == [1, 2, 3] and spread([1, 2, 3], 5) == [1, 2, 3]


def test_data_config_rejects_unknown_fields():
    with pytest.raises(DataError) as e:
        DataConfig.from_dict({"patch_pxx": 3}, file="c.yml")
    assert e.value.field == "patch_pxx" and e.value.file == "c.yml"


def test_run_identity_sees_the_manifest_content(tmp_path):
    from cytoclr.manifest import load_manifest
    shutil.copy(ROOT / "data_manifest.yml", tmp_path / "m.yml")
    d = DataConfig(manifest=str(tmp_path / "m.yml"))
    a = run_identity(d, load_manifest(tmp_path / "m.yml"))
    assert "manifest" not in a["data"] and a["data"]["patch_px"] == d.patch_px
    (tmp_path / "m.yml").write_text((tmp_path / "m.yml").read_text().replace(
        "{id: phantom-0, phantom: {seed: 0}}", "{id: phantom-0, phantom: {seed: 0}, description: a}"))
    b = run_identity(d, load_manifest(tmp_path / "m.yml"))
    assert b["data_fingerprint"] != a["data_fingerprint"] and b["code_fingerprint"] == a["code_fingerprint"]
    moved = DataConfig(manifest="elsewhere/m.yml")  # the same content under another name: the same identity
    assert run_identity(moved, load_manifest(tmp_path / "m.yml")) == b


class _Sec:
    def __init__(self, brain, section):
        self.brain, self.section = brain, section


class _Manifest:
    path, reference = "m.yml", "REF"

    def split(self, split, modality):
        return [_Sec(b, i) for b in ("b0", "b1") for i in range(3)]


def test_training_data_can_be_restricted_to_some_brains(monkeypatch):
    monkeypatch.setattr(D, "sample_locations", lambda secs, n, seed, ref, level: ("samples", len(secs)))
    secs, smp, ref = D.load_training_samples(DataConfig(brains=["b1"]), _Manifest())
    assert [s.brain for s in secs] == ["b1"] * 3 and smp == ("samples", 3) and ref == "REF"
    secs, *_ = D.load_training_samples(DataConfig(brains="b0", max_sections=2), _Manifest())
    assert [(s.brain, s.section) for s in secs] == [("b0", 0), ("b0", 2)]  # spread within the chosen brain
    assert len(D.load_training_samples(DataConfig(), _Manifest())[0]) == 6  # None: every brain
    for dcfg in (DataConfig(brains=["b1"]), DataConfig(brains="b0", max_sections=2), DataConfig()):
        key = lambda secs: [(s.brain, s.section) for s in secs]
        assert key(D.training_sections(dcfg, _Manifest())) == key(D.load_training_samples(dcfg, _Manifest())[0])
    for bad in (["b7"], []):
        with pytest.raises(DataError) as e:
            D.load_training_samples(DataConfig(brains=bad), _Manifest())
        assert e.value.field == "brains" and "b0" in str(e.value) and e.value.file == "m.yml"
