"Tests of cytoclr.training_config: the configuration, the weights of each method, the schedule, model and optimiser."
import math

import numpy as np
import pytest
import torch

from cytoclr.core import DataError
from cytoclr.models import PairModel
from cytoclr.training_config import TrainConfig, build_model, lr_factor, make_optimizer, make_weighting


def test_lr_factor_warmup_then_cosine():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert np.allclose(f[:10], np.arange(1, 11) / 10)  # linear warm-up reaching the peak at step 9
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then non-increasing
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)  # cosine midpoint


@pytest.mark.parametrize("field,value", [("method", "byol"), ("steps", 0), ("tau", 0.0), ("lr", float("nan")),
                                         ("views", 3), ("amp", "fp16"), ("weight_kind", "box")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(DataError) as e:
        TrainConfig(**{field: value}).validate()
    assert e.value.field == field


def test_simclr_needs_two_views():
    with pytest.raises(DataError, match="two views"):
        TrainConfig(method="simclr", views=1).validate()


@pytest.mark.parametrize("field,value", [("lr", "0.1"), ("tau", True), ("weight_decay", -0.1), ("grad_clip", math.inf),
                                         ("sigma_mm", -1.0), ("width", 0)])
def test_config_numbers_are_checked_with_the_field_named(field, value):
    with pytest.raises(DataError) as e:
        TrainConfig(**{field: value}).validate()
    assert e.value.field == field
    assert TrainConfig(weight_decay=0, grad_clip=0.0).validate().weight_decay == 0  # 0 is allowed where >= 0


def test_lr_factor_values_by_hand():
    assert lr_factor(0, 100, 10, 0.01) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.01) == 1.0
    assert lr_factor(55, 100, 10, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the cosine
    assert lr_factor(100, 100, 10, 0.01) == pytest.approx(0.01) and lr_factor(500, 100, 10, 0.01) == pytest.approx(0.01)


def test_supcon_and_simclr_weights_by_hand():
    keys, fn = make_weighting("supcon")
    assert keys == ("area",)
    assert fn(torch.tensor([1, 1, 2, 0])).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    keys, fn = make_weighting("simclr")
    assert keys == ("index",) and fn(torch.tensor([3, 3, 5])).tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert make_weighting("clip")[0] == ("index",)
    with pytest.raises(DataError):
        make_weighting("byol")


def test_build_model_is_seeded_and_decay_skips_biases():
    cfg = TrainConfig(proj_hidden=16, proj_dim=8, seed=3)
    a, b = build_model(cfg), build_model(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_model(TrainConfig(proj_hidden=16, proj_dim=8, seed=4))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    opt, sched = make_optimizer(a, TrainConfig(lr=1e-3, weight_decay=0.05, warmup_steps=4, steps=10))
    decay, no_decay = opt.param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)  # warm-up: step 0 of 4
    pair = build_model(TrainConfig(method="clip", modality="multimodal", views=1, proj_hidden=16, proj_dim=8))
    assert isinstance(pair, PairModel) and pair.nissl is not pair.pli
