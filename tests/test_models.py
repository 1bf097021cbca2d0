"Tests of cytoclr.models: shapes, parameter counts against torchvision's published numbers, PLI encoding."
import inspect
import math

import pytest
import torch

import cytoclr.losses
import cytoclr.models
from cytoclr.models import (ARCHS, PLI_CHANNELS, BasicBlock, Bottleneck, ContrastiveModel, ProjectionHead,
                            build_encoder, count_parameters, embed, encode_pli, encoder_metrics, encoder_table, input_channels,
                            measure_throughput)
from cytoclr.core import DataError

# torchvision's resnet{18,34,50} without the 1000-class fc layer, 3 input channels
# (11,689,512 / 21,797,672 / 25,557,032 parameters minus 512*1000+1000 or 2048*1000+1000)
TORCHVISION_BACKBONE_PARAMS = {"resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032}


@pytest.mark.parametrize("arch", sorted(TORCHVISION_BACKBONE_PARAMS))
def test_parameter_counts_match_torchvision(arch):
    assert count_parameters(ARCHS[arch](3, 1.0)) == TORCHVISION_BACKBONE_PARAMS[arch]  # the backbone alone, RGB
    # a Nissl encoder has one input channel (2 x 64 x 7 x 7 stem weights fewer), a PLI encoder four (one more);
    # the PLI input layer has no parameters
    assert count_parameters(build_encoder(arch, "nissl")) == TORCHVISION_BACKBONE_PARAMS[arch] - 2 * 64 * 49
    assert count_parameters(build_encoder(arch, "pli")) == TORCHVISION_BACKBONE_PARAMS[arch] + 64 * 49


def test_quick_encoder_is_about_0_3M():
    enc = build_encoder("quick", "nissl")
    assert 0.25e6 < count_parameters(enc) < 0.35e6


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("channels", [1, 3, PLI_CHANNELS, 7])
def test_backbone_shapes_and_out_dim(arch, channels):
    enc = ARCHS[arch](channels, 0.25).eval()
    out = enc(torch.randn(2, channels, 48, 40))  # non-square, not a power of two
    assert out.shape == (2, enc.out_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_encoders_take_patches_as_stored(arch):
    "A PLI encoder takes (transmittance, retardation, direction in degrees) and encodes the direction itself."
    enc = build_encoder(arch, "pli", width=0.25).eval()
    x = torch.rand(3, 3, 40, 40) * torch.tensor([1.0, 1.0, 180.0])[None, :, None, None]
    torch.testing.assert_close(enc(x), enc.backbone(encode_pli(x)))
    y = x.clone()
    y[:, 2] = (y[:, 2] + 180.0)  # the same fibre directions
    torch.testing.assert_close(enc(x), enc(y), atol=1e-4, rtol=1e-4)
    assert enc.in_channels == 3 and build_encoder(arch, "nissl", width=0.25).in_channels == 1


def test_an_encoder_refuses_the_other_modality():
    with pytest.raises(DataError, match="takes pli patches.*a Nissl patch"):
        build_encoder("quick", "pli")(torch.rand(2, 1, 32, 32))
    with pytest.raises(DataError, match="takes nissl patches.*a PLI patch"):
        build_encoder("quick", "nissl")(torch.rand(2, 3, 32, 32))


def test_out_dims_and_width():
    assert build_encoder("resnet18").out_dim == 512
    assert build_encoder("resnet34").out_dim == 512
    assert build_encoder("resnet50").out_dim == 2048
    assert build_encoder("resnet18", width=0.5).out_dim == 256
    assert build_encoder("resnet50", width=0.5).out_dim == 1024
    assert build_encoder("resnet18", width=1.5).out_dim == 768
    full, half = count_parameters(build_encoder("resnet18")), count_parameters(build_encoder("resnet18", width=0.5))
    assert 0.2 < half / full < 0.3  # parameters scale with the square of the width


def test_residual_blocks_start_as_identity():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 8, 8)
    for block in (BasicBlock(16, 16), Bottleneck(16, 4)):
        block.eval()
        assert torch.allclose(block(x), torch.relu(x))


def test_eval_mode_samples_are_independent():
    enc = build_encoder("resnet18", width=0.25)
    enc.train()
    enc(torch.randn(8, 1, 32, 32))  # move the running statistics
    enc.eval()
    x = torch.randn(5, 1, 32, 32)
    torch.testing.assert_close(enc(x)[2:3], enc(x[2:3]), rtol=1e-5, atol=1e-6)


def test_contrastive_model_and_head():
    enc = build_encoder("quick")
    model = ContrastiveModel(enc, ProjectionHead(enc.out_dim, 64, 16))
    x = torch.randn(4, 1, 64, 64)
    h, z = model(x)
    assert h.shape == (4, enc.out_dim) and z.shape == (4, 16)
    loss = cytoclr.losses.spatial_nce(z, cytoclr.losses.view_weights([0, 0, 1, 1]), 0.1)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(DataError, match="head expects"):
        ContrastiveModel(enc, ProjectionHead(enc.out_dim + 1, 8, 4))


def test_encode_pli_values_and_periodicity():
    t, r = torch.full((1, 1, 2, 3), 0.7), torch.full((1, 1, 2, 3), 0.2)
    for deg, (c, s) in {0.0: (1, 0), 45.0: (0, 1), 90.0: (-1, 0), 135.0: (0, -1), 180.0: (1, 0)}.items():
        out = encode_pli(torch.cat([t, r, torch.full_like(t, deg)], 1))
        assert out.shape == (1, PLI_CHANNELS, 2, 3)
        torch.testing.assert_close(out[:, :2], torch.cat([t, r], 1))
        torch.testing.assert_close(out[0, 2:, 0, 0], torch.tensor([c, s], dtype=torch.float32), atol=1e-6, rtol=0)
    a = torch.rand(2, 3, 4, 4) * torch.tensor([1, 1, 180.0])[None, :, None, None]
    b = a.clone()
    b[:, 2] += 180.0
    torch.testing.assert_close(encode_pli(a), encode_pli(b), atol=1e-5, rtol=0)
    assert encode_pli(a.double()).dtype == torch.float64
    assert input_channels("pli") == PLI_CHANNELS and input_channels("nissl") == 1
    with pytest.raises(DataError, match="B, 3, H, W"):
        encode_pli(torch.zeros(2, 2, 4, 4))
    with pytest.raises(DataError, match="modality"):
        input_channels("mri")


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="vgg16"), "unknown encoder"), (dict(arch="quick", modality="mri"), "modality"),
    (dict(arch="quick", modality=3), "modality"), (dict(arch="quick", width=0), "width"),
    (dict(arch="quick", width=float("nan")), "width"), (dict(arch="quick", width=True), "width"),
])
def test_build_encoder_validates(kwargs, match):
    with pytest.raises(DataError, match=match):
        build_encoder(**kwargs)


def test_device_is_a_parameter_and_no_hard_coded_cuda():
    enc = build_encoder("quick", device="cpu")
    assert next(enc.parameters()).device.type == "cpu"
    for mod in (cytoclr.models, cytoclr.losses):
        assert ".cuda(" not in inspect.getsource(mod)


def test_measure_throughput():
    ips = measure_throughput(build_encoder("quick", width=0.25), 1, px=32, batch=4, repeats=1)
    assert math.isfinite(ips) and ips > 0


def test_embed_arrays_and_datasets_alike():
    "embed gives unit vectors, the same from an array as from a dataset read through a DataLoader."
    torch.manual_seed(0)
    enc = build_encoder("quick", "pli", width=0.25)
    x = torch.rand(11, 3, 32, 32) * torch.tensor([1.0, 1.0, 180.0])[None, :, None, None]
    a = embed(enc, x.numpy(), batch=4)
    b = embed(enc, torch.utils.data.TensorDataset(x), batch=5)
    assert a.shape == (11, enc.out_dim) and a.dtype == "float32"
    torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=1e-5, rtol=1e-5)
    assert abs(float((a ** 2).sum(1).mean()) - 1) < 1e-5
    with torch.no_grad():
        direct = torch.nn.functional.normalize(enc.eval()(x), dim=1)
    torch.testing.assert_close(torch.from_numpy(a), direct, atol=1e-5, rtol=1e-5)


def test_encoder_table_and_metrics_by_hand():
    rows = encoder_table(["quick", "resnet18"], px=32, batch=2, repeats=1, width=0.25)
    assert [r["arch"] for r in rows] == ["quick", "resnet18"]
    q, r18 = rows
    assert q["width"] == 1.0 and q["batch"] == 16 and r18["width"] == 0.25 and r18["batch"] == 2  # quick: 8x the batch
    assert q["params_M"] == count_parameters(build_encoder("quick", "nissl")) / 1e6
    assert r18["params_M"] == count_parameters(build_encoder("resnet18", "nissl", 0.25)) / 1e6
    assert q["out_dim"] == build_encoder("quick").out_dim and q["images_per_second"] > 0
    rows = [dict(arch="quick", width=1.0, params_M=0.2904561, out_dim=160, batch=64, images_per_second=123.456)]
    assert encoder_metrics(rows, 128) == {"quick": {"params": 290456, "out_dim": 160, "batch": 64,
                                                    "images_per_second": 123.5, "patch_px": 128}}
