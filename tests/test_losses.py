"Tests of cytoclr.losses: slow reference, analytic limits, invariances, gradients, pytorch-metric-learning."
import math

import numpy as np
import pytest
import torch

from cytoclr.losses import clip_loss, label_weights, spatial_nce, view_weights
from cytoclr.core import DataError
from helpers import formula_nce, slow_spatial_nce


@pytest.fixture
def batch(rng):
    def make(n=10, d=6, density=0.4, seed=None):
        r = np.random.default_rng(seed) if seed is not None else rng
        z = torch.tensor(r.normal(size=(n, d)))
        w = torch.tensor(r.uniform(size=(n, n)) * (r.uniform(size=(n, n)) < density))
        w.fill_diagonal_(5.0)  # must be ignored
        return z, w
    return make


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.5), (7, 4, 0.1), (16, 9, 0.05), (12, 2, 1.0)])
def test_matches_slow_reference(batch, n, d, tau):
    z, w = batch(n, d, density=0.5)
    w[0, 1] = 0.7  # at least one row with a positive
    assert float(spatial_nce(z, w, tau)) == pytest.approx(slow_spatial_nce(z, w, tau), rel=1e-10, abs=1e-12)


def test_float32_matches_float64(batch):
    z, w = batch(20, 8)
    assert float(spatial_nce(z.float(), w.float(), 0.1)) == pytest.approx(float(spatial_nce(z, w, 0.1)), rel=1e-5)


def test_all_similarities_equal_gives_log_n_minus_1(rng):
    n = 9
    z = torch.ones(n, 5) + torch.tensor(rng.uniform(0, 1, (n, 1)))  # all rows parallel: cosine 1 everywhere
    w = torch.tensor(rng.uniform(size=(n, n)))
    assert float(spatial_nce(z, w, 0.3)) == pytest.approx(math.log(n - 1), rel=1e-6)
    # and for any embedding when tau -> infinity
    zr = torch.tensor(rng.normal(size=(n, 5)))
    assert float(spatial_nce(zr, w, 1e8)) == pytest.approx(math.log(n - 1), rel=1e-6)


def test_single_positive_pair_limits():
    # two orthogonal pairs: each row's positive is identical, negatives orthogonal
    z = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]], dtype=torch.float64)
    w = view_weights([0, 0, 1, 1])
    tau = 0.5
    # l = -log(e^{2} / (e^{2} + 2 e^{0}))
    assert float(spatial_nce(z, w, tau)) == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)), rel=1e-12)


def test_batch_order_invariance(batch, rng):
    z, w = batch(15, 5)
    p = torch.tensor(rng.permutation(15))
    assert float(spatial_nce(z[p], w[p][:, p], 0.2)) == pytest.approx(float(spatial_nce(z, w, 0.2)), rel=1e-12)


def test_scale_invariance_of_embeddings_and_weights(batch):
    z, w = batch(11, 4)
    ref = float(spatial_nce(z, w, 0.2))
    scale = torch.linspace(0.1, 10, 11, dtype=torch.float64)[:, None]
    assert float(spatial_nce(z * scale, w, 0.2)) == pytest.approx(ref, rel=1e-12)  # z is normalised inside
    assert float(spatial_nce(z, w * scale, 0.2)) == pytest.approx(ref, rel=1e-12)  # per-row weight scale cancels


def test_gradcheck_float64(batch):
    z, w = batch(8, 5)
    w[0] = 0  # a row without positives
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: spatial_nce(x, w, 0.3), (z,), eps=1e-6, atol=1e-7)


def test_gradient_equals_plain_autograd(batch):
    z, w = batch(13, 6)
    w[2] = 0
    a = z.clone().requires_grad_()
    b = z.clone().requires_grad_()
    la, lb = spatial_nce(a, w, 0.07), formula_nce(b, w, 0.07)
    la.backward()
    lb.backward()
    assert la.item() == pytest.approx(lb.item(), rel=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_rows_without_positives_are_excluded(batch):
    z, w = batch(10, 4)
    w[:4] = 0  # rows 0..3 have no positives (they still serve as negatives and as positives of others)
    w[4:, :4] += 0.5
    loss = float(spatial_nce(z, w, 0.2))
    assert loss == pytest.approx(slow_spatial_nce(z, w, 0.2), rel=1e-10)
    # the same rows computed one at a time: the mean runs over rows 4..9 only
    zn = torch.nn.functional.normalize(z, dim=1)
    logits = (zn @ zn.T / 0.2).fill_diagonal_(float("-inf"))
    w0 = w.clone().fill_diagonal_(0)
    per_row = torch.logsumexp(logits, 1) - (w0 * logits.nan_to_num(neginf=0)).sum(1) / w0.sum(1).clamp_min(1e-300)
    assert loss == pytest.approx(float(per_row[4:].mean()), rel=1e-10)
    assert loss != pytest.approx(float(per_row.mean()), rel=1e-3)


def test_no_positives_anywhere_gives_zero_with_gradient():
    z = torch.randn(5, 3, requires_grad=True)
    loss = spatial_nce(z, torch.eye(5), 0.1)  # only the (ignored) diagonal
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_small_temperature_is_finite_in_float32_and_half(rng):
    z = torch.tensor(rng.normal(size=(64, 16)), dtype=torch.float32, requires_grad=True)
    w = label_weights(torch.tensor(rng.integers(0, 4, 64)))
    loss = spatial_nce(z, w, 0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    ref = slow_spatial_nce(z, w, 0.01)  # float64 with exp up to e^100: still representable
    assert loss.item() == pytest.approx(ref, rel=1e-4)
    for dt in (torch.float16, torch.bfloat16):
        lh = spatial_nce(z.detach().to(dt), w, 0.01)
        assert lh.dtype == torch.float32 and torch.isfinite(lh)
        assert float(lh) == pytest.approx(ref, rel=0.05)


def test_full_precision_under_autocast(batch):
    z, w = batch(12, 8)
    z, w = z.float(), w.float()
    ref, ref_clip = spatial_nce(z, w, 0.05), clip_loss(z[:6], z[6:], 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_clip = spatial_nce(z, w, 0.05), clip_loss(z[:6], z[6:], 0.05)
    assert got.dtype == torch.float32 and float(got) == pytest.approx(float(ref), rel=1e-6)
    assert float(got_clip) == pytest.approx(float(ref_clip), rel=1e-6)


def test_dtype_follows_input_and_numpy_weights_are_accepted():
    z = torch.randn(6, 3, dtype=torch.float64)
    w = np.ones((6, 6))
    assert spatial_nce(z, w, 0.1).dtype == torch.float64
    assert spatial_nce(z.float(), w, 0.1).dtype == torch.float32
    assert float(spatial_nce(z.float(), w, 0.1)) == pytest.approx(float(spatial_nce(z, torch.ones(6, 6), 0.1)), rel=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(tau=0.0), "tau: must be > 0"), (dict(tau=-1.0), "tau: must be > 0"), (dict(tau=float("nan")), "tau: must be a finite"),
    (dict(tau="warm"), "tau: must be a number"),
    (dict(w=-1), "non-negative"), (dict(w=float("nan")), "NaN"), (dict(w=float("inf")), "finite"),
    (dict(wshape=(4, 5)), "shape"), (dict(z=float("nan")), "non-finite"), (dict(zdim=1), "2D"),
])
def test_bad_arguments_raise_early(bad, match):
    z = torch.randn(5, 3)
    w = torch.ones(5, 5)
    tau = bad.get("tau", 0.1)
    if "w" in bad:
        w[1, 2] = bad["w"]
    if "wshape" in bad:
        w = torch.ones(*bad["wshape"])
    if "z" in bad:
        z[0, 0] = bad["z"]
    if "zdim" in bad:
        z = torch.randn(5)
    with pytest.raises(DataError, match=match):
        spatial_nce(z, w, tau)
    with pytest.raises(DataError):
        spatial_nce(torch.randn(1, 3), torch.ones(1, 1), 0.1)  # one sample has no pairs


def test_label_and_view_weights():
    w = label_weights(torch.tensor([3, 1, 3, 2]))
    assert w.shape == (4, 4) and w.dtype == torch.float32
    assert w.tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]
    assert torch.equal(label_weights(np.array(["V1", "4", "V1", "3b"])), w)  # strings work too
    assert torch.equal(view_weights([7, 7, 8, 8]), torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1.0]]))
    with pytest.raises(DataError, match="one-dimensional"):
        label_weights(torch.zeros(2, 2))


def test_geodesic_weights_is_reexported():
    from cytoclr import geodesic, losses
    assert losses.geodesic_weights is geodesic.geodesic_weights and "geodesic_weights" in losses.__all__
    d = torch.tensor([[0.0, 3.0, float("inf")], [3.0, 0.0, 1.0], [float("inf"), 1.0, 0.0]])
    w = losses.geodesic_weights(d, 3.0, "gaussian")
    assert float(w[0, 1]) == pytest.approx(math.exp(-0.5)) and float(w[0, 2]) == 0.0  # other hemisphere: weight 0
    assert math.isfinite(float(spatial_nce(torch.randn(3, 4), w, 0.1)))


def test_agrees_with_pml_supcon(rng):
    from pytorch_metric_learning.losses import SupConLoss
    z = torch.tensor(rng.normal(size=(40, 8)))
    y = torch.tensor(rng.integers(0, 6, 40))
    y[0] = 99  # a label with a single sample: no positive, excluded by both
    for tau in (0.07, 0.5):
        ours = spatial_nce(z, label_weights(y), tau)
        theirs = SupConLoss(temperature=tau)(z, y)
        assert float(ours) == pytest.approx(float(theirs), rel=1e-9)


def test_agrees_with_pml_ntxent(rng):
    from pytorch_metric_learning.losses import NTXentLoss
    ids = torch.tensor(rng.permutation(np.repeat(np.arange(12), 2)))  # two views per patch, shuffled
    z = torch.tensor(rng.normal(size=(24, 8)))
    for tau in (0.1, 0.5):
        assert float(spatial_nce(z, view_weights(ids), tau)) == pytest.approx(float(NTXentLoss(temperature=tau)(z, ids)), rel=1e-9)


def slow_soft_clip(a, b, tau, w):
    "Soft-target CLIP straight from the definition, in float64 loops."
    a = a.double() / a.double().norm(dim=1, keepdim=True)
    b = b.double() / b.double().norm(dim=1, keepdim=True)
    n = len(a)
    s = (a @ b.T / tau).tolist()
    tot = []
    for mat in (s, [list(r) for r in zip(*s)]):  # a -> b, then b -> a
        wm = w.tolist() if mat is s else [list(r) for r in zip(*w.tolist())]
        rows = []
        for i in range(n):
            ws = sum(wm[i])
            if ws == 0:
                continue
            lse = math.log(sum(math.exp(x) for x in mat[i]))
            rows.append(-sum(wm[i][j] / ws * (mat[i][j] - lse) for j in range(n)))
        tot.append(sum(rows) / len(rows))
    return 0.5 * (tot[0] + tot[1])


def test_clip_loss(rng):
    a, b = torch.tensor(rng.normal(size=(7, 5))), torch.tensor(rng.normal(size=(7, 5)))
    plain = slow_soft_clip(a, b, 0.2, torch.eye(7, dtype=torch.float64))  # plain CLIP: the pair itself is the target
    assert float(clip_loss(a, b, 0.2)) == pytest.approx(plain, rel=1e-10)
    assert float(clip_loss(a, b, 0.2)) == pytest.approx(float(clip_loss(b, a, 0.2)), rel=1e-12)  # symmetric
    assert float(clip_loss(a, a, 1e8)) == pytest.approx(math.log(7), rel=1e-6)
    assert float(clip_loss(a, a, 0.01)) < 1e-3
    x = a.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: clip_loss(t, b, 0.3), (x,))
    with pytest.raises(DataError, match="same shape"):
        clip_loss(a, b[:5], 0.1)



def test_soft_clip_loss_against_the_formula(rng):
    a, b = torch.tensor(rng.normal(size=(7, 5))), torch.tensor(rng.normal(size=(7, 5)))
    w = torch.tensor(rng.uniform(0, 1, (7, 7))) * (torch.rand(7, 7, generator=torch.Generator().manual_seed(0)) < 0.5)
    w = w + torch.eye(7, dtype=w.dtype)
    assert float(clip_loss(a, b, 0.3, w)) == pytest.approx(slow_soft_clip(a, b, 0.3, w), rel=1e-10)
    eye = torch.eye(7, dtype=torch.float64)
    assert float(clip_loss(a, b, 0.3, eye)) == pytest.approx(float(clip_loss(a, b, 0.3)), rel=1e-12)  # identity: plain CLIP
    with pytest.raises(DataError, match="non-negative"):
        clip_loss(a, b, 0.3, -eye)
    from cytoclr.losses import clip_loss_distributed
    assert float(clip_loss_distributed(a, b, (), None, 0.3)) == pytest.approx(float(clip_loss(a, b, 0.3)))


@pytest.mark.parametrize("tau, what", [(0.0, "> 0"), (float("inf"), "a finite"), ("warm", "a number"), (True, "a number")])
def test_every_loss_checks_its_temperature_with_the_one_validator(tau, what):
    from cytoclr.losses import spatial_nce_distributed
    z = torch.randn(4, 3, dtype=torch.float64)
    for loss in (lambda: spatial_nce(z, torch.ones(4, 4), tau), lambda: clip_loss(z, z, tau),
                 lambda: spatial_nce_distributed(z, torch.arange(4), view_weights, tau)):
        with pytest.raises(DataError, match=f"tau: must be {what}") as e:
            loss()
        assert e.value.field == "tau"
