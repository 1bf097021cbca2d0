"The anchoring protocol (chapter 9a): sets, patches, settings, density, tables and metrics, on hand-computed cases."
import hashlib
from types import SimpleNamespace as S

import numpy as np
import pytest

import cytoclr.anchoring_eval as ae
from cytoclr.anchoring import Frame, anchor_errors, anchoring_scores, evaluate_anchoring
from cytoclr.anchoring_eval import (AnchoringStudy, anchoring_metrics, assemble_sets, brain_shift, brain_shift_rows,
                                    density_study, embed_sets, every_fth_plane, frame_of_brain, frame_plan, gather,
                                    grid_density, held_out_sections, image_feature_sets, own_frame, peer_comparison,
                                    plane_seed, posters_setting, protocol_summary, render_jobs, run_setting,
                                    scores_table, unseen_setting, weight_sample)
from cytoclr.core import MetricKeys as K
from cytoclr.sampling import Samples


def toy_study(n_boot: int = 50) -> AnchoringStudy:
    """Two test sections of brain "b" (planes y = 0 and y = 20) and one of brain "u" (y = 0), 8 patches each on a
    2 mm grid in x and z; a frame of "b" on planes y = -6, 5, 9, 13, 25, 30 on the same grid; random unit features.
    Half the test patches carry the feature of their closest usable frame patch (error 5 mm, rank 0), the other
    half that of the same grid point on another usable plane (y = -6 and y = 30: errors 6 and 10 mm)."""
    rng = np.random.default_rng(0)
    grid = np.array([(x, z) for x in (0.0, 2.0) for z in (0.0, 2.0, 4.0, 6.0)])  # (8, 2)
    ys = np.array([-6.0, 5.0, 9.0, 13.0, 25.0, 30.0])
    fxyz = np.array([(x, y, z) for y in ys for x, z in grid])
    frame = Frame(xyz=fxyz, hemi=(fxyz[:, 0] > 0).astype(np.int8), section=np.repeat(np.arange(6), 8),
                  rc=np.zeros((48, 2)), brain=np.array(["b"] * 48), section_ids=[f"f{i}" for i in range(6)],
                  meta={"series": "coronal"})
    qy = np.repeat([0.0, 20.0, 0.0], 8)
    qxyz = np.column_stack([np.tile(grid[:, 0], 3), qy, np.tile(grid[:, 1], 3)])
    queries = Frame(xyz=qxyz, hemi=(qxyz[:, 0] > 0).astype(np.int8), section=np.repeat(np.arange(3), 8),
                    rc=np.zeros((24, 2)), brain=np.array(["b"] * 16 + ["u"] * 8), section_ids=["t0", "t1", "u0"])
    ff = rng.normal(size=(48, 16))
    ff /= np.linalg.norm(ff, axis=1, keepdims=True)
    closest = {0.0: 1, 20.0: 4}  # frame plane (index) closest to each test plane beyond 4 mm
    other = {0.0: 0, 20.0: 5}
    j = np.arange(24) % 8
    target = np.array([(closest if j_ % 2 == 0 else other)[y] * 8 + j_ for y, j_ in zip(qy, j)])
    tests = {"nissl": [S(brain=b, series="coronal") for b in ("b", "b", "u")]}
    plane = lambda y: (np.array([0.0, y, 0.0]), np.array([0.0, 1.0, 0.0]))
    return AnchoringStudy(tests=tests, query_sets={"nissl": (queries, None)},
                          frame_sets={("nissl", "b", "coronal"): (frame, None)},
                          feats={("nissl", "enc"): {"frame": {("b", "coronal"): ff}, "query": ff[target]}},
                          planes={"nissl": [plane(0.0), plane(20.0), plane(0.0)]}, gaps={"nissl": 4.0},
                          series_frames=("sagittal",), kmax=5, n_boot=n_boot, seed=0)


def _sec(brain, series, section, **kw):
    return S(brain=brain, series=series, section=section, spacing_um=100.0, **kw)


def test_held_out_sections_add_the_unseen_brain_at_the_same_planes():
    test = [_sec("b", "coronal", 10), _sec("b", "coronal", 30)]
    unseen = [_sec("u", "coronal", 10), _sec("u", "coronal", 20)]
    man = S(split=lambda split, mod: list(test if split == "test" else unseen))
    got = held_out_sections(man, ["nissl", "pli"])
    assert [(s.brain, s.section) for s in got["nissl"]] == [("b", 10), ("b", 30), ("u", 10)] and list(got) == ["nissl", "pli"]
    assert [s.section for s in held_out_sections(man, ["nissl"], per_series=1)["nissl"]] == [10, 10]


def test_frame_plan_takes_a_brains_other_sections_and_one_patch_width():
    entries = [S(brain="b", modality="nissl", series="coronal", id=f"b{i}") for i in (10, 20, 30, 40)]
    secs = [_sec("b", "coronal", i) for i in (10, 20, 30, 40)]
    man = S(split_ids=lambda split: ["b10", "b30"], brains={"b": {}}, entries=entries, sections=secs, path="m.yml")
    frames, gaps = frame_plan(man, {"nissl": [secs[0], secs[2]]}, {"nissl": {"patch_px": 40}}, ["b"])
    assert gaps == {"nissl": 4.0} and list(frames) == [("nissl", "b", "coronal")]
    assert [s.section for s in frames["nissl", "b", "coronal"]] == [20, 40]
    frames, gaps = frame_plan(man, {"nissl": [secs[0], secs[2]]}, {"nissl": {"patch_px": 40}}, ["b"], min_gap_mm=6,
                              max_sections=1)
    assert gaps == {"nissl": 6.0} and [s.section for s in frames["nissl", "b", "coronal"]] == [20]


def test_plane_seed_and_render_jobs():
    assert plane_seed(_sec("b", "coronal", 7), 3) == int(hashlib.sha256(b"b/coronal/7").hexdigest()[:8], 16) + 3
    assert plane_seed(_sec("b", "coronal", 7)) != plane_seed(_sec("b", "coronal", 8))
    fr = {("nissl", "b", "coronal"): [_sec("b", "coronal", 20), _sec("b", "coronal", 40)]}
    groups = render_jobs(fr, {"nissl": [_sec("b", "coronal", 10)]}, {"nissl": ("nissl", "b", "coronal"), "pli": None})
    key = ("nissl", "b", "coronal")
    assert sorted(j for g in groups for j in g) == sorted([("frame", key, 0), ("frame", key, 1), ("fine", key, 0),
                                                          ("fine", key, 1), ("test", "nissl", 0)])
    assert sorted(map(len, groups)) == [1, 2, 2]  # a frame section and its finer grid share their plane


def _samples(n, section, x0=0.0):
    xyz = np.column_stack([np.arange(n) + x0, np.zeros(n), np.zeros(n)])
    return Samples(section=np.full(n, section, np.int64), rc=np.zeros((n, 2)), xyz=xyz, hemi=np.zeros(n, np.int8),
                   vertex=np.zeros(n, np.int64), area=np.zeros(n, np.int64), brain=np.array(["b"] * n),
                   depth=np.zeros(n), surface_xyz=xyz)


def test_gather_and_assemble_put_parts_back_in_section_order():
    img = lambda n, v: np.full((n, 1, 2, 2), v, np.float32)
    key = ("nissl", "b", "coronal")
    parts = {("frame", key): {1: (_samples(2, 1, 10.0), img(2, 1.0)), 0: (_samples(3, 0), img(3, 0.0))},
             ("test", "nissl"): {0: (_samples(1, 0, 5.0), img(1, 2.0))}}
    smp, im = gather(parts, "frame", key)
    np.testing.assert_array_equal(smp.section, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(im[:, 0, 0, 0], [0, 0, 0, 1, 1])
    frames = {key: [_sec("b", "coronal", 20), _sec("b", "coronal", 40)]}
    fs, qs = assemble_sets(parts, frames, {"nissl": [_sec("b", "coronal", 10)]}, {"nissl": {"patch_px": 2}}, 1, 2.0, 3.0)
    fr, fimg = fs[key]
    assert len(fr) == 5 and fr.meta == {"modality": "nissl", "brain": "b", "series": "coronal", "step_mm": 2.0,
                                        "grid_mm": 3.0, "patch_px": 2, "spacing_um": 100.0, "patch_mm": 2 * 100.0 / 1000}
    np.testing.assert_array_equal(fr.xyz[:, 0], [0, 1, 2, 10, 11])
    assert len(qs["nissl"][0]) == 1 and qs["nissl"][0].meta == {"modality": "nissl", "n_per_section": 1, "spacing_um": 100.0}


def test_image_feature_sets_are_standardised_with_the_frames_together(rng):
    imgs = {k: rng.uniform(0, 1, (n, 1, 16, 16)).astype(np.float32) for k, n in (("a", 5), ("b", 3), ("q", 4))}
    fs = {("nissl", "b", "a"): (np.zeros(5), imgs["a"]), ("nissl", "b", "b"): (np.zeros(3), imgs["b"]),
          ("pli", "b", "a"): (np.zeros(2), None)}
    f = image_feature_sets(fs, imgs["q"], "nissl")
    raw_f = ae.image_features(np.concatenate([imgs["a"], imgs["b"]]), "nissl")
    raw_q = ae.image_features(imgs["q"], "nissl")
    mu, sd = raw_f.mean(0), raw_f.std(0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    np.testing.assert_allclose(np.concatenate([f["frame"]["b", "a"], f["frame"]["b", "b"]]), (raw_f - mu) / sd, rtol=1e-6)
    np.testing.assert_allclose(f["query"], (raw_q - mu) / sd, rtol=1e-6)
    assert list(f["frame"]) == [("b", "a"), ("b", "b")] and len(f["frame"]["b", "b"]) == 3


def test_embed_sets_embeds_the_modalitys_frames_and_the_queries(monkeypatch):
    monkeypatch.setattr(ae, "embed", lambda enc, x, device, batch: np.asarray(x).reshape(len(x), -1)[:, :1] * enc)
    fs = {("nissl", "b", "c"): (None, np.ones((3, 1, 2, 2))), ("pli", "b", "c"): (None, np.ones((2, 1, 2, 2)))}
    out = embed_sets(2.0, fs, np.full((4, 1, 2, 2), 3.0), "nissl")
    assert list(out["frame"]) == [("b", "c")] and out["frame"]["b", "c"].tolist() == [[2.0]] * 3
    assert out["query"].tolist() == [[6.0]] * 4


def test_run_setting_on_the_hand_computed_study():
    st = toy_study()
    scores, raw = run_setting(st, "nissl", ["b"], own_frame(st.frame_sets))
    enc, best = scores["enc"][K.REGISTERED], scores["best_achievable"][K.REGISTERED]
    assert (enc[K.TOP1], enc[K.MEDIAN_MM], enc[K.WITHIN_10MM], enc[K.WITHIN_5MM], enc["n"], enc["sections"]) == \
        (0.5, 5.5, 0.75, 0.0, 16, 2)
    assert (best[K.TOP1], best[K.MEDIAN_MM], best[K.P90_MM]) == (1.0, 5.0, 5.0)
    assert set(scores) == {"enc", "chance", "best_achievable"} and K.HOMOLOGOUS not in scores["enc"]
    assert set(raw) == {(n, "b", "coronal") for n in scores}
    # the slow reference: anchor_errors on the brain's test patches, scored by anchoring_scores
    q = st.query_sets["nissl"][0]
    keep = q.brain == "b"
    fr = st.frame_sets["nissl", "b", "coronal"][0]
    f = st.feats["nissl", "enc"]
    r = anchor_errors(q.subset(keep), fr, st.planes["nissl"], 4.0, f["query"][keep], f["frame"]["b", "coronal"], kmax=5)
    ref = anchoring_scores(r["errors"][K.REGISTERED], r["ranks"][K.REGISTERED], q.section[keep], kmax=5, n_boot=50)
    assert enc == ref


def test_settings_posters_unseen_and_shift():
    st = toy_study()
    a, raw, gap = posters_setting(st, ["b"])
    assert gap == 5.0 and a["nissl"]["enc"][K.SAME_HEMISPHERE][K.TOP1] == 0.5 and list(raw) == ["nissl"]
    u, _ = unseen_setting(st, ["u"], "b")
    reg = u["nissl"]["enc"][K.REGISTERED]
    assert (reg[K.WITHIN_10MM], reg[K.MEDIAN_MM], reg["sections"]) == (1.0, 5.5, 1)
    assert unseen_setting(st, ["nobody"], "b") == ({}, {})
    assert frame_of_brain(st.frame_sets, "b")("u", "coronal") == ("b", "coronal")
    assert frame_of_brain(st.frame_sets, "x")("u", "coronal") is None and own_frame(st.frame_sets)("u", "coronal") is None
    shift = brain_shift(st, "b", ["u"], "nissl", models=("enc", "absent"))
    assert list(shift["enc"]) == ["same brain (b)", "unseen brain (u)"] and set(shift) == {"enc", "chance", "best_achievable"}
    rows = brain_shift_rows(shift)
    assert rows[1] == {"model": "enc", "queries": "unseen brain (u)", "within_5mm": 0.0, "median_mm": 5.5,
                       "within_5mm_homologous": pytest.approx(np.nan, nan_ok=True)}


def test_density_thins_the_frame_planes():
    st = toy_study()
    fr = st.frame_sets["nissl", "b", "coronal"][0]
    np.testing.assert_array_equal(every_fth_plane(2)(fr), fr.section % 2 == 0)
    assert every_fth_plane(2, series_frames=("coronal",))(fr).all()
    d = density_study(st, ["b"], ["enc", "absent"], factors=(1, 2), step_mm=2.0)
    # every 2nd plane leaves y = -6, 9, 25: the closest usable plane is 6 mm from y = 0 and still 5 mm from y = 20
    assert d["nissl"]["best_achievable"]["2"][K.MEDIAN_MM] == 5.0 and d["nissl"]["best_achievable"]["4"][K.MEDIAN_MM] == 5.5
    assert set(d["nissl"]) == {"enc", "best_achievable"}
    st.series_frames = ("coronal",)  # a series that keeps its own sections is not thinned: left out
    assert density_study(st, ["b"], ["enc"], factors=(1,)) == {}


def test_grid_density_equals_one_evaluation_per_grid():
    st = toy_study()
    fr = st.frame_sets["nissl", "b", "coronal"][0]
    ff = st.feats["nissl", "enc"]["frame"]["b", "coronal"]
    half = fr.section < 3
    g = grid_density(st, "nissl", ("b", "coronal"), [(2.0, fr, ff), (1.5, fr.subset(half), ff[half])], method="enc")
    assert list(g) == ["2", "1.5"] and g["2"]["frame_locations"] == 48 and g["1.5"]["frame_locations"] == 24
    q = st.query_sets["nissl"][0]
    keep = q.brain == "b"
    ref = evaluate_anchoring(q.subset(keep), fr, st.planes["nissl"], 4.0, st.feats["nissl", "enc"]["query"][keep], ff,
                             kmax=5, n_boot=50)
    assert g["2"] == {**ref[K.REGISTERED], "frame_locations": 48} and g["2"][K.MEDIAN_MM] == 5.5


def test_scores_table_formats_scores_with_intervals():
    sc = {K.TOP1: 0.5, K.TOP5: 0.75, K.TOP10: 1.0, K.WITHIN_5MM: 0.25, K.WITHIN_10MM: 0.5, K.OUTLIER_FRACTION: 0.125,
          K.MEDIAN_MM: 5.25, K.P90_MM: 12.0, "n": 8, "sections": 2,
          K.CI95: {K.TOP1: [0.25, 0.75], K.MEDIAN_MM: [4.0, 6.5]}}
    t = scores_table({"nissl": {"enc": {K.REGISTERED: sc, K.SAME_HEMISPHERE: sc}}}, extra=(K.SAME_HEMISPHERE,))
    row = t.loc[("nissl", "enc", K.REGISTERED)]
    assert (row["top1"], row["top5"], row["median mm"], row["p90 mm"], row["n"]) == \
        ("0.50 [0.25, 0.75]", "0.75", "5.2 [4.0, 6.5]", "12.0", 8)
    assert len(t) == 2 and len(scores_table({"nissl": {"enc": {K.REGISTERED: sc}}})) == 1


def test_protocol_and_metrics_layout():
    st = toy_study()
    a, _, gap = posters_setting(st, ["b"])
    p = protocol_summary(st, {("nissl", "b", "coronal"): [0] * 6, ("pli", "b", "coronal"): [0] * 2}, gap, 2.0, 3.0,
                         ["b"], 8)
    assert p == {"min_plane_gap_mm": 5.0, "rule_min_gap_mm": 4.0, "frame_planes": 6, "frame_locations": 48,
                 "test_planes": 3, "outlier_mm": 10.0, "frame_step_mm": 2.0, "frame_grid_mm": 3.0, "frame_brains": ["b"],
                 "series_frames": ["sagittal"], "test_patches_per_section": 8}
    m = anchoring_metrics(p, a, {}, {"enc": {}}, "b", {"nissl": {}}, {})
    assert list(m) == [K.ANCHORING, K.ANCHORING_UNSEEN, "anchoring_brain_shift", K.ANCHORING_DENSITY,
                       "anchoring_density_grid"]
    assert m[K.ANCHORING][K.PROTOCOL] == p and m[K.ANCHORING]["nissl"] == a["nissl"]
    assert m["anchoring_brain_shift"] == {"frame_brain": "b", "nissl": {"enc": {}}}


def test_peer_comparison_and_weight_sample():
    st = toy_study()
    sc, _ = run_setting(st, "nissl", ["b"], own_frame(st.frame_sets))
    rows = peer_comparison({"nissl": {"geodesic": sc["best_achievable"], "random": sc["enc"]}, "pli": {"random": {}}})
    assert len(rows) == 1 and rows[0]["peer"] == "random"
    assert rows[0][K.MEDIAN_MM][:2] == (5.0, 5.5) and rows[0][K.MEDIAN_MM][2].startswith("better")
    assert rows[0][K.WITHIN_10MM][:2] == (1.0, 0.75)
    np.testing.assert_array_equal(weight_sample(10, 0, 4), np.random.default_rng(0).choice(10, 4, replace=False))
    assert sorted(weight_sample(3)) == [0, 1, 2]
