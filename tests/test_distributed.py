"Two gloo processes on the CPU: the distributed loss and its (DDP-averaged) gradients equal one process on the whole batch."
import pytest
import torch
import torch.distributed as dist

from cytoclr.losses import gather_tensor, gather_with_grad, label_weights, spatial_nce, spatial_nce_distributed
from helpers import run_ranks

SIZES = (5, 7)  # unequal local batches: the gather pads and trims
D_IN, D_OUT, TAU = 6, 4, 0.2


def _data():
    "The global batch: inputs, area labels (some without a partner: rows without positives), positions."
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 3, 1, 2, 4, 0, 5, 1, 2])[:n]  # 3, 4, 5 appear once
    pos = torch.randn(n, 3, generator=g, dtype=torch.float64) * 10
    return x, y, pos


def _weights(y, pos):
    "Labels and positions together: same area, or a Gaussian of the distance (sigma 8)."
    d2 = torch.cdist(pos, pos) ** 2
    return torch.maximum(label_weights(y).double(), torch.exp(-d2 / (2 * 8.0 ** 2)) * (d2 < 100))


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(D_IN, D_OUT).double()


def _worker(rank, world, port, out):
    torch.set_num_threads(1)  # tiny tensors: threads only cost start-up time
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y, pos = _data()
        start = sum(SIZES[:rank])
        sl = slice(start, start + SIZES[rank])
        model = _model()  # same initial weights on every rank, as DDP's broadcast would make them
        xl = x[sl].clone().requires_grad_()
        loss = spatial_nce_distributed(model(xl), (y[sl], pos[sl]), _weights, TAU)
        loss.backward()
        for p in model.parameters():  # what DDP does to gradients: all-reduce and divide by the world size
            dist.all_reduce(p.grad)  # (DDP itself is not used: its constructor imports torch._dynamo, seconds per process)
            p.grad /= world
        # the gather alone: forward concatenates in rank order, backward sums the ranks' gradients
        a = torch.full((SIZES[rank], 2), float(rank + 1), dtype=torch.float64, requires_grad=True)
        ga = gather_with_grad(a)
        (ga * torch.arange(len(ga), dtype=torch.float64)[:, None] * (rank + 1)).sum().backward()
        torch.save({"loss": loss.detach(), "grads": [p.grad for p in model.parameters()], "xgrad": xl.grad,
                    "gathered": ga.detach(), "agrad": a.grad, "ids": gather_tensor(torch.arange(SIZES[rank]) + 100 * rank)},
                   out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_processes_equal_one(tmp_path):
    world = len(SIZES)
    run_ranks(_worker, tmp_path, world=world)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    x, y, pos = _data()
    model = _model()
    xs = x.clone().requires_grad_()
    loss = spatial_nce(model(xs), _weights(y, pos), TAU)
    loss.backward()
    assert any(_weights(y, pos).fill_diagonal_(0).sum(1) == 0)  # the batch does have rows without positives

    for r in res:
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-12, atol=1e-12)  # global value on every rank
        for got, want in zip(r["grads"], model.parameters()):  # after DDP's averaging: exactly the global gradient
            torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12)
    # input gradients: each rank holds world_size x its slice of the global gradient (DDP then divides by world)
    xgrad = torch.cat([r["xgrad"] for r in res])
    torch.testing.assert_close(xgrad, world * xs.grad, rtol=1e-10, atol=1e-12)

    # gather_with_grad on its own
    want_rows = torch.cat([torch.full((s, 2), float(r + 1), dtype=torch.float64) for r, s in enumerate(SIZES)])
    n = sum(SIZES)
    # loss_r = (r + 1) * sum_i i * g_i  ->  d(sum_r loss_r)/d g_i = i * (1 + 2): summed over both ranks
    summed = torch.arange(n, dtype=torch.float64)[:, None].expand(n, 2) * sum(r + 1 for r in range(world))
    for r, out in enumerate(res):
        torch.testing.assert_close(out["gathered"], want_rows)
        start = sum(SIZES[:r])
        torch.testing.assert_close(out["agrad"], summed[start:start + SIZES[r]])
        assert out["ids"].tolist() == list(range(SIZES[0])) + [100 + i for i in range(SIZES[1])]


def test_without_process_group_it_is_the_plain_loss():
    x, y, pos = _data()
    z = _model()(x)
    assert torch.equal(spatial_nce_distributed(z, (y, pos), _weights, TAU), spatial_nce(z, _weights(y, pos), TAU))
    assert gather_with_grad(z) is z and gather_tensor(y) is y
