"Multimodal: pairing sections, paired patches, CLIP in the trainer, cross-modal scores, the decoder and its baselines."
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cytoclr import training as T
from cytoclr.core import DataError
from helpers import Bomb, Interrupt
from cytoclr.core import MetricKeys as K
from cytoclr.multimodal import (PairedDataset, area_type_probe, chance_cross_modal, cross_modal_scores, majority_chance,
                                multimodal_metrics, nearest_copy, paired_test_rows, pair_sections, pli_in_nissl_frame,
                                pli_positions, pli_targets, predict_pli, prediction_errors, retrieval_scores,
                                train_decoder)


def coronal(brain, y, shape=(100, 120), tilt_deg=0.0):
    "A stand-in registered section: a coronal plane at y (mm), 0.1 mm pixels, optionally tilted about x."
    t = np.radians(tilt_deg)
    row = np.array([0.0, np.sin(t), -np.cos(t)]) * 0.1  # rows go down (-z) and, when tilted, along y
    col = np.array([0.1, 0.0, 0.0])
    origin = np.array([0.0, y, 0.0]) - row * (shape[0] - 1) / 2 - col * (shape[1] - 1) / 2  # centre at (0, y, 0)
    return SimpleNamespace(brain=brain, shape=shape, affine=np.column_stack([row, col, origin]))


# ---------------------------------------------------------------- pairing
def test_pair_sections_takes_the_nearest_parallel_plane_of_the_same_brain():
    n = [coronal("a", 0.0), coronal("b", 0.0), coronal("a", 10.0)]
    p = [coronal("a", 0.3), coronal("a", 0.1), coronal("b", 0.45), coronal("a", 10.2, tilt_deg=20)]
    got = pair_sections(n, p, max_distance_mm=0.5, max_angle_deg=5)
    assert [(a is n[0], b is p[1]) for a, b, _ in got[:1]] == [(True, True)]  # 0.1 mm beats 0.3 mm
    assert got[0][2] == pytest.approx(0.1)
    assert got[1][0] is n[1] and got[1][1] is p[2] and got[1][2] == pytest.approx(0.45)  # brain b pairs with brain b
    assert len(got) == 2  # the section at y = 10 has only a tilted partner: no pair
    assert len(pair_sections(n, p, max_distance_mm=0.5, max_angle_deg=25)) == 3  # a wider angle admits it
    assert pair_sections(n, p, max_distance_mm=0.05) == []  # nothing that close


def test_pli_positions_project_onto_the_pli_plane(ref):
    from cytoclr.phantom import PhantomBrain
    from cytoclr.sampling import sample_locations
    b = PhantomBrain(0, ref=ref)
    # 128 um pixels, sampled from 512 um mask cells (level 2): Nissl rendering at coarser pixels needs a Poisson table
    # of far more cells per pixel (about 25 s to build at 512 um)
    nis = b.section(0, spacing_um=128, tilt_deg=(0, 0))
    same = b.section(0, spacing_um=128, tilt_deg=(0, 0), modality="pli")
    shifted = b.section(0, spacing_um=128, tilt_deg=(0, 0), modality="pli", y_mm=nis.y_mm + 0.25)
    samples = sample_locations([nis], 50, seed=0, ref=ref, level=2)
    rc, d = pli_positions([(nis, same, 0.0)], samples)
    np.testing.assert_allclose(rc, samples.rc, atol=1e-6)  # the same plane: the same pixels
    np.testing.assert_allclose(d, 0, atol=1e-6)
    rc, d = pli_positions([(nis, shifted, 0.25)], samples)
    np.testing.assert_allclose(d, 0.25, atol=1e-6)
    np.testing.assert_allclose(shifted.to_reference(rc)[:, [0, 2]], samples.xyz[:, [0, 2]], atol=1e-6)  # straight across

    ds = PairedDataset([(nis, same, 0.0)], samples, 8, augment=False, progress=False)
    items = ds.__getitems__([0, 3])
    assert items[0]["image"].shape == (1, 8, 8) and items[0]["image_pli"].shape == (3, 8, 8)
    r, c = np.rint(samples.rc[3]).astype(int) - 4
    want = same.read(slice(r, r + 8), slice(c, c + 8))
    np.testing.assert_allclose(np.asarray(items[1]["image_pli"], np.float32), want, rtol=1e-3, atol=2e-3)  # float16 cache
    assert items[1]["index"] == 3 and ds[3]["image_pli"].shape == (3, 8, 8)


# ---------------------------------------------------------------- cross-modal scores
def brute_ranks(q, g, groups):
    "Rank of each query's own pair among its group's gallery, by cosine similarity (slow reference)."
    out = np.empty(len(q), np.int64)
    qn, gn = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    for i in range(len(q)):
        sel = np.flatnonzero(groups == groups[i])
        s = gn[sel] @ qn[i]
        own = s[sel == i][0]
        out[i] = int((s > own).sum() + ((s == own) & (sel < i)).sum())  # ties broken by gallery index
    return out


def test_cross_modal_scores_against_brute_force(rng):
    q = rng.normal(size=(60, 8))
    g = q + rng.normal(size=(60, 8)) * 1.2  # noisy partners
    groups = np.repeat([0, 1, 2], 20)
    xyz = rng.uniform(-50, 50, (60, 3))
    s = cross_modal_scores(q, g, xyz, xyz, groups, kmax=20, n_boot=50)
    ranks = brute_ranks(q, g, groups)
    k = np.arange(1, 21)
    want = [(ranks < kk).mean() for kk in k]
    np.testing.assert_allclose(s["topk_curve"], want, atol=1e-12)
    exact = cross_modal_scores(q, q, xyz, xyz, groups, kmax=5, n_boot=20)
    assert exact["top1"] == 1.0 and exact["median_error_mm"] == 0.0  # its own pair is always the best match
    with pytest.raises(DataError, match="same pairs"):
        cross_modal_scores(q, g[:10], xyz, xyz, groups)


def test_cross_modal_search_stays_within_a_section(rng):
    q = rng.normal(size=(40, 8))
    g = np.concatenate([q[20:], q[:20]])  # every query's twin sits in the other group
    groups = np.repeat([0, 1], 20)
    xyz = rng.uniform(-50, 50, (40, 3))
    s = cross_modal_scores(q, g, xyz, xyz, groups, kmax=20, n_boot=20)
    assert s["top1"] < 0.3  # the twins are not found: the other group is never searched


def test_chance_cross_modal_is_k_over_n(rng):
    groups = np.repeat(np.arange(10), 100)
    xyz = rng.uniform(-50, 50, (1000, 3))
    s = chance_cross_modal(xyz, xyz, groups, kmax=50, n_boot=20, seed=1)
    acc = np.asarray(s["topk_curve"])
    np.testing.assert_allclose(acc[[0, 9, 49]], [0.01, 0.10, 0.50], atol=0.04)


# ---------------------------------------------------------------- prediction
def test_pli_targets_against_block_means(rng):
    x = np.concatenate([rng.random((2, 2, 32, 32)), rng.random((2, 1, 32, 32)) * 180], 1)
    t = pli_targets(x, 4)
    phi = np.radians(x[:, 2]) * 2
    want = np.stack([x[:, 1], np.cos(phi), np.sin(phi)], 1).reshape(2, 3, 4, 8, 4, 8).mean((3, 5))
    np.testing.assert_allclose(t, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match=r"\(n, 3, H, W\)"):
        pli_targets(x[:, :1], 4)


def test_decoder_learns_a_mapping_and_beats_the_mean(rng):
    f = rng.normal(size=(400, 16)).astype(np.float32)
    w = rng.normal(size=(16, 3 * 4 * 4)).astype(np.float32) * 0.3
    t = np.tanh(f @ w).reshape(-1, 3, 4, 4)
    dec = train_decoder(f[:300], t[:300], steps=400, lr=3e-3, batch=64)
    with torch.no_grad():
        pred = dec(torch.as_tensor(f[300:])).numpy()
    err = prediction_errors(pred, t[300:])["mse"]
    mean_err = prediction_errors(np.broadcast_to(t[:300].mean(0), t[300:].shape), t[300:])["mse"]
    assert err < 0.5 * mean_err, (err, mean_err)
    with pytest.raises(DataError, match="features for"):
        train_decoder(f[:10], t[:5])


def test_prediction_errors_and_nearest_copy_by_hand(rng):
    p, t = np.zeros((2, 3, 2, 2)), np.zeros((2, 3, 2, 2))
    p[:, 0] = 1.0  # retardation off by 1 everywhere, direction exact
    e = prediction_errors(p, t)
    assert e["mse_retardation"] == 1.0 and e["mse_direction"] == 0.0 and e["mse"] == pytest.approx(1 / 3)
    train_f = rng.normal(size=(30, 5))
    targets = rng.normal(size=(30, 3, 2, 2))
    q = train_f[[4, 17]] * 3 + 1e-3  # scaled copies: cosine finds them
    np.testing.assert_array_equal(nearest_copy(q, train_f, targets), targets[[4, 17]])


# ---------------------------------------------------------------- CLIP in the trainer
class ToyPairs(torch.utils.data.Dataset):
    "n locations; the Nissl and the PLI image are different functions of the position plus seeded noise."

    def __init__(self, n=48, px=16):
        g = np.random.default_rng(3)
        self.xyz = g.uniform(-20, 20, (n, 3)).astype(np.float32)
        yy, xx = np.mgrid[:px, :px] / px
        self.a = np.stack([np.sin(x * 6 * xx + y * 6 * yy + z) for x, y, z in self.xyz / 20]).astype(np.float32)
        self.b = np.stack([np.stack([np.cos(3 * x * yy + z), np.sin(4 * y * xx), 90 + 80 * np.sin(x + 3 * z * xx)])
                           for x, y, z in self.xyz / 20]).astype(np.float32)
        self.epoch = 0

    def set_epoch(self, e):
        self.epoch = e

    def __len__(self):
        return len(self.xyz)

    def __getitem__(self, i):
        r = np.random.default_rng([self.epoch, i])
        noise = 0.1 * r.standard_normal((4,) + self.a.shape[1:]).astype(np.float32)
        return dict(image=torch.from_numpy(self.a[i][None] + noise[:1]), image_pli=torch.from_numpy(self.b[i] + noise[1:]),
                    index=i, hemi=int(self.xyz[i, 0] > 0), vertex=i, area=1, section=0)


class ToyDistances:
    def weights(self, hemi, vertex, sigma_mm, kind="gaussian", metric="geodesic", device="cpu"):
        from cytoclr.geodesic import geodesic_weights
        xyz = ToyPairs().xyz[np.asarray(vertex)]
        d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
        d[np.asarray(hemi)[:, None] != np.asarray(hemi)[None]] = np.inf
        return geodesic_weights(torch.as_tensor(d, dtype=torch.float32, device=device), sigma_mm, kind)

    def matrix(self, hemi, vertex, kind="geodesic"):
        raise NotImplementedError


class ToySampler:
    "Batches of `b` from a seeded per-epoch permutation."

    def __init__(self, n, b):
        self.n, self.b, self.epoch = n, b, 0

    def set_epoch(self, e):
        self.epoch = e

    def __len__(self):
        return self.n // self.b

    def __iter__(self):
        perm = np.random.default_rng([0, self.epoch]).permutation(self.n)
        return (perm[t * self.b:(t + 1) * self.b].tolist() for t in range(len(self)))




def _stream():
    return T.BatchStream(ToyPairs(), ToySampler(48, 12))


def _cfg(method, steps=12):
    return T.TrainConfig(method=method, modality="multimodal", views=1, arch="quick", width=0.25, steps=steps,
                         batch_size=12, lr=3e-3, warmup_steps=2, checkpoint_every=4, log_every=1, seed=0, proj_dim=16,
                         proj_hidden=32).validate()


@pytest.mark.parametrize("method", ["clip", "clip_geodesic"])
def test_clip_trains_in_the_trainer_and_resumes_exactly(tmp_path, method):
    a, b = tmp_path / "a", tmp_path / "b"
    r = T.train(_cfg(method), _stream(), a, model=T.build_model(_cfg(method)), distances=ToyDistances(), progress=False)
    assert r.steps == 12 and T.checkpoint_path(a, "multimodal", method).exists()
    log = T.read_log(T.log_dir(a, "multimodal", method) / "log.csv")
    assert np.mean([x["loss"] for x in log[-3:]]) < np.mean([x["loss"] for x in log[:3]])  # it learns
    with pytest.raises(Interrupt):
        T.train(_cfg(method), Bomb(_stream(), 6), b, model=T.build_model(_cfg(method)), distances=ToyDistances(),
                progress=False)
    T.train(_cfg(method), _stream(), b, model=T.build_model(_cfg(method)), distances=ToyDistances(), progress=False)
    la = [x["loss"] for x in T.read_log(T.log_dir(a, "multimodal", method) / "log.csv")]
    lb = [x["loss"] for x in T.read_log(T.log_dir(b, "multimodal", method) / "log.csv")]
    np.testing.assert_allclose(lb, la, rtol=0, atol=1e-5)
    m = T.load_model(a, method, "multimodal")
    assert m.nissl.encoder.modality == "nissl" and m.pli.encoder.modality == "pli"
    from cytoclr.models import embed
    from cytoclr.multimodal import SharedSpace
    data = ToyPairs()
    xa, xb = torch.from_numpy(data.a[:, None]), torch.from_numpy(data.b)
    fa, fb = embed(SharedSpace(m.nissl), xa), embed(SharedSpace(m.pli), xb)  # the aligned space: the projections
    with torch.no_grad():
        want = torch.nn.functional.normalize(m.pli(xb)[1], dim=1).numpy()
    np.testing.assert_allclose(fb, want, atol=1e-5)
    assert fa.shape == fb.shape == (48, 16)


def test_clip_aligns_the_two_modalities(tmp_path):
    "Longer CLIP training: the pairs are found across modalities in the shared space, far above chance."
    from cytoclr.models import embed
    from cytoclr.multimodal import SharedSpace
    cfg = T.TrainConfig(**{**_cfg("clip").__dict__, "steps": 120, "checkpoint_every": 120}).validate()
    T.train(cfg, _stream(), tmp_path, model=T.build_model(cfg), progress=False)
    m, data = T.load_model(tmp_path, "clip", "multimodal"), ToyPairs()
    fa = embed(SharedSpace(m.nissl), torch.from_numpy(data.a[:, None]))
    fb = embed(SharedSpace(m.pli), torch.from_numpy(data.b))
    s = cross_modal_scores(fb, fa, data.xyz, data.xyz, np.zeros(48), kmax=10, n_boot=10)
    assert s["top1"] > 0.3, s["top1"]  # chance: 1/48


def test_clip_batches_need_both_modalities(tmp_path):
    class NoPli(ToyPairs):
        def __getitem__(self, i):
            d = super().__getitem__(i)
            d.pop("image_pli")
            return d
    with pytest.raises(DataError, match="image_pli"):
        T.train(_cfg("clip", 2), T.BatchStream(NoPli(), ToySampler(48, 12)), tmp_path, model=T.build_model(_cfg("clip")),
                progress=False)


# ---------------------------------------------------------------- the chapter's numbers
def _queries(ids, counts, rc):
    from cytoclr.anchoring import Frame
    sec = np.concatenate([np.full(c, i) for i, c in enumerate(counts)]).astype(np.int64)
    n = len(sec)
    return Frame(xyz=np.zeros((n, 3)), hemi=np.zeros(n, np.int8), section=sec, rc=rc, brain=np.array(["b"] * n),
                 section_ids=ids)


def test_paired_test_rows_by_hand():
    rc = np.arange(14, dtype=float).reshape(7, 2)
    qn = _queries(["b/nissl/1", "b/nissl/2", "b/nissl/3"], [2, 3, 2], rc)
    # PLI: section 2's twin first, then 1's twin at other pixels, then 3's twin
    rc_p = np.concatenate([rc[2:5], rc[:2] + 1, rc[5:]])
    qp = _queries(["b/pli/2", "b/pli/1", "b/pli/3"], [3, 2, 2], rc_p)
    rows_n, rows_p, groups = paired_test_rows(qn, qp)
    np.testing.assert_array_equal(rows_n, [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(rows_p, [0, 1, 2, 5, 6])
    np.testing.assert_array_equal(groups, [1, 1, 1, 2, 2])
    with pytest.raises(DataError, match="same places"):
        paired_test_rows(qn, _queries(["b/pli/9"], [7], rc))


def test_retrieval_scores_are_cross_modal_scores_both_ways(rng):
    groups = np.repeat([0, 1], 20)
    xyz = rng.uniform(-20, 20, (40, 3))
    fn, fp = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    r = retrieval_scores({"m": (fn, fp)}, xyz, groups, kmax=5, n_boot=10, seed=2)
    assert r["m"][K.PLI_TO_NISSL] == cross_modal_scores(fp, fn, xyz, xyz, groups, 5, 10, 2)
    assert r["m"][K.NISSL_TO_PLI] == cross_modal_scores(fn, fp, xyz, xyz, groups, 5, 10, 2)
    ch = chance_cross_modal(xyz, xyz, groups, 5, 10, 2)
    assert r["chance"] == {K.PLI_TO_NISSL: ch, K.NISSL_TO_PLI: ch} and list(r) == ["m", "chance"]
    perfect = retrieval_scores({"same": (fn, fn)}, xyz, groups, kmax=5, n_boot=10)["same"][K.PLI_TO_NISSL]
    assert perfect["top1"] == 1.0 and perfect["median_error_mm"] == 0.0


def test_majority_chance_against_pandas(rng):
    import pandas as pd
    for _ in range(5):
        tr = rng.choice(["a", "b", "c"], 11)
        te = rng.choice(["a", "b", "c"], 9)
        assert majority_chance(tr, te) == float(np.mean(te == pd.Series(tr).mode()[0]))
    assert majority_chance(["b", "a", "a", "b"], ["a", "a", "b"]) == 2 / 3  # a tie: the first in sorted order


def test_area_type_probe_against_the_probe_itself(rng):
    from cytoclr.mapping import linear_probe
    types = np.array(["x", "y", "none"])
    t_tr, t_te = types[rng.integers(0, 3, 60)], types[rng.integers(0, 3, 30)]
    code = lambda t: (t[:, None] == types[None, :2]).astype(float)  # a feature that tells the type
    tr = (code(t_tr) + 0.1 * rng.normal(size=(60, 2)), rng.normal(size=(60, 3)))
    te = (code(t_te) + 0.1 * rng.normal(size=(30, 2)), rng.normal(size=(30, 3)))
    got = area_type_probe(tr, te, t_tr, t_te, seed=0)
    ok_tr, ok_te = t_tr != "none", t_te != "none"
    want, _ = linear_probe(tr[1][ok_tr], t_tr[ok_tr], te[1][ok_te], C=0.1, seed=0)
    assert got["pli"] == float(np.mean(want == t_te[ok_te]))
    assert got["nissl"] == 1.0 and got["joint"] == 1.0  # the Nissl features tell the type


def test_predict_pli_baselines_by_hand(rng):
    f_tr, f_te = rng.normal(size=(20, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    p_tr = np.concatenate([rng.random((20, 2, 8, 8)), rng.random((20, 1, 8, 8)) * 180], 1).astype(np.float32)
    p_te = np.concatenate([rng.random((6, 2, 8, 8)), rng.random((6, 1, 8, 8)) * 180], 1).astype(np.float32)
    errors, shown = predict_pli(f_tr, f_te, p_tr, p_te, px=2, steps=3, seed=0, model="m")
    y_tr, y_te = pli_targets(p_tr, 2), pli_targets(p_te, 2)
    np.testing.assert_array_equal(shown["truth"], y_te)
    assert errors["mean_patch"]["mse"] == pytest.approx(float(((y_te - y_tr.mean(0)) ** 2).mean()))
    assert errors["nearest_pair"] == prediction_errors(nearest_copy(f_te, f_tr, y_tr), y_te)
    assert errors["decoder"] == prediction_errors(shown["decoder"], y_te)
    assert (errors["model"], errors["px"], errors["train_pairs"], errors["test_pairs"]) == ("m", 2, 20, 6)
    again, _ = predict_pli(f_tr, f_te, p_tr, p_te, px=2, steps=3, seed=0, model="m")
    assert again == errors  # seeded


def test_pli_in_nissl_frame_pools_the_placed_sections():
    "PLI test patches on y = -10, a Nissl frame on y = 0 with a perfect shared code: every anchor 10 mm away."
    from cytoclr.anchoring import anchoring_scores
    from test_alignment import _plane_setup
    q, fr, planes = _plane_setup()
    secs = [SimpleNamespace(brain="b", series="coronal", spacing_um=500.0)]
    scores, placed = pli_in_nissl_frame(fr, fr.features, q, secs, planes, lambda keep: q.features[keep], "b", 5.0,
                                        kmax=5, n_boot=10)
    want = anchoring_scores(np.full(len(q), 10.0), np.zeros(len(q), np.int64), q.section, 10.0, 5, 10, 0)
    assert placed == [True] and scores[K.REGISTERED] == want and scores[K.AFTER_ALIGNMENT] == want


def test_multimodal_metrics_layout():
    r = SimpleNamespace(final_loss=1.5, steps=3, images_per_second=10.0)
    m = multimodal_metrics({"clip": {K.PLI_TO_NISSL: {"top1": 0.5}}}, {"mse": 1}, {"clip": {}}, {"clip": {"nissl": 0.7}},
                           0.4, {"clip": r}, 96, 12, 0.5, "geodesic")[K.MULTIMODAL]
    assert m["clip"] == {K.PLI_TO_NISSL: {"top1": 0.5}} and m[K.PREDICTION] == {"mse": 1}
    assert m["area_type_probe"] == {"clip": {"nissl": 0.7}, "chance": 0.4} and m["pli_in_nissl_frame"] == {"clip": {}}
    assert m[K.TRAINING] == {"clip": {"final_loss": 1.5, "steps": 3, "images_per_second": 10.0}}
    assert m["data"] == {"train_pairs": 96, "test_pairs": 12, "pairing_mm": 0.5, "init": "geodesic"}
