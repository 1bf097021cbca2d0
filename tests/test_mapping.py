"Tests of cytoclr.mapping: linear probe, cosine kNN, scores and input checks."
from collections import Counter

import numpy as np
import pytest

from cytoclr.mapping import (chance_scores, classification_scores, evaluate_mapping, knn_predict, linear_probe,
                             load_frozen_encoder)
from cytoclr.core import DataError


def _clusters(rng, n_classes=4, per=40, d=12, spread=5.0):
    centres = rng.normal(size=(n_classes, d)) * spread
    y = np.repeat(np.arange(n_classes), per)
    return centres[y] + rng.normal(size=(len(y), d)), y


def knn_reference(x_train, y_train, x_test, k):
    "Slow kNN from the definition: rank by (-cosine, index), majority of k, ties to the best-ranked class."
    a = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    out = []
    for q in x_test:
        q = q / np.linalg.norm(q)
        sims = [float(np.dot(a[i], q)) for i in range(len(a))]
        ranked = sorted(range(len(a)), key=lambda i: (-sims[i], i))[:k]
        votes = Counter(y_train[i] for i in ranked)
        best = max(votes.values())
        out.append(next(y_train[i] for i in ranked if votes[y_train[i]] == best))
    return np.array(out)


def test_linear_probe_equals_sklearn_pipeline(rng):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    x, y = _clusters(rng, spread=1.0)
    xq = rng.normal(size=(30, x.shape[1]))
    pred, probe = linear_probe(x, y, xq, C=0.3, seed=3)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=2000, random_state=3)).fit(x, y)
    np.testing.assert_array_equal(pred, ref.predict(xq))
    np.testing.assert_allclose(probe.predict_proba(xq), ref.predict_proba(xq), atol=1e-8)


@pytest.mark.parametrize("k", [1, 2, 5, 17])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_knn_equals_brute_force(rng, k, chunk):
    x = rng.normal(size=(60, 8))
    y = rng.integers(0, 4, 60)
    xq = rng.normal(size=(25, 8))
    np.testing.assert_array_equal(knn_predict(x, y, xq, k=k, chunk=chunk), knn_reference(x, y, xq, k))


def test_knn_string_labels_and_k_equals_n(rng):
    x = rng.normal(size=(10, 5))
    y = np.array(list("aabbbccaab"))
    xq = rng.normal(size=(6, 5))
    for k in (3, 10):
        np.testing.assert_array_equal(knn_predict(x, y, xq, k=k), knn_reference(x, y, xq, k))


def test_knn_ties_are_deterministic():
    # exact similarities: one-hot features; training rows 0..3 are copies of e0 with labels 2, 1, 1, 2
    e = np.eye(3)
    x = np.stack([e[0], e[0], e[0], e[0], e[1]])
    y = np.array([2, 1, 1, 2, 0])
    q = e[[0]]
    # k=2: equal similarities -> lowest indices 0, 1 (labels 2, 1): one vote each -> the best-ranked, label 2
    assert knn_predict(x, y, q, k=2)[0] == 2
    # k=3: rows 0, 1, 2 -> labels 2, 1, 1 -> 1 has the majority
    assert knn_predict(x, y, q, k=3)[0] == 1
    # k=4: 2 votes each -> the best-ranked neighbour (row 0, label 2) wins
    assert knn_predict(x, y, q, k=4)[0] == 2
    # row order of the training set decides, not the label order: permute labels, same rule
    assert knn_predict(x, np.array([1, 2, 2, 1, 0]), q, k=2)[0] == 1
    for k in (1, 2, 3, 4, 5):
        assert knn_predict(x, y, q, k=k)[0] == knn_reference(x, y, q, k)[0]
        assert all(knn_predict(x, y, q, k=k, chunk=c)[0] == knn_predict(x, y, q, k=k)[0] for c in (1, 3))


def test_separable_problem_scores_one_and_random_labels_near_chance(rng):
    x, y = _clusters(rng, n_classes=5, per=60)
    tr, te = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    yr = rng.permutation(y[te])
    r = evaluate_mapping(x[tr], y[tr], {"same": (x[te], y[te]), "random": (x[te], yr)}, k=5, C=1.0)
    for kind in ("probe", "knn"):
        assert r[kind]["same"]["accuracy"] == pytest.approx(1.0)
        assert r[kind]["same"]["macro_f1"] == pytest.approx(1.0)
        assert r[kind]["random"]["accuracy"] < 0.2 + 0.15  # 5 balanced classes: chance 0.2
        assert len(r["predictions"][kind]["same"]) == te.sum()
    assert r["chance"]["same"]["accuracy"] == pytest.approx(0.2)


def test_scores_and_chance():
    s = classification_scores([0, 0, 1, 1], [0, 1, 1, 1])
    assert s["accuracy"] == 0.75 and s["n"] == 4
    assert s["macro_f1"] == pytest.approx(np.mean([2 / 3, 0.8]))
    c = chance_scores([3, 3, 1, 2], [3, 1, 1, 1])
    assert c["accuracy"] == 0.25


@pytest.mark.parametrize("call, field", [
    (lambda x, y, q: knn_predict(x, y[:-1], q), "y_train"),  # shape mismatch
    (lambda x, y, q: knn_predict(x, y, q[:, :-1]), "x_test"),  # feature dimensions differ
    (lambda x, y, q: knn_predict(x[:0], y[:0], q), "x_train"),  # empty
    (lambda x, y, q: knn_predict(x, y, q[:0]), "x_test"),
    (lambda x, y, q: knn_predict(np.where(np.arange(len(x))[:, None] == 2, np.nan, x), y, q), "x_train"),  # NaN
    (lambda x, y, q: knn_predict(x, y, q * np.inf), "x_test"),
    (lambda x, y, q: knn_predict(x, y, q, k=0), "k"),  # k < 1
    (lambda x, y, q: knn_predict(x, y, q, k=2.0), "k"),
    (lambda x, y, q: knn_predict(x, y, q, k=len(x) + 1), "k"),
    (lambda x, y, q: knn_predict(x, y, q, chunk=0), "chunk"),
    (lambda x, y, q: knn_predict(x[:, 0], y, q), "x_train"),  # 1-D features
    (lambda x, y, q: linear_probe(x, np.zeros_like(y), q), "y_train"),  # one class: nothing to learn
    (lambda x, y, q: linear_probe(x, y, q, C=0), "C"),
    (lambda x, y, q: linear_probe(x, y[:, None], q), "y_train"),
    (lambda x, y, q: evaluate_mapping(x, y, {"t": (q, np.full(len(q), 99))}), "t.y"),  # labels unseen in training
    (lambda x, y, q: evaluate_mapping(x, y, {"t": (q, y[:3])}), "t.y"),
    (lambda x, y, q: evaluate_mapping(x, y, {"t": (q[:, :2], y[:len(q)])}), "t.x"),
    (lambda x, y, q: evaluate_mapping(x, y, {"t": (q * np.nan, y[:len(q)])}), "t.x"),
    (lambda x, y, q: evaluate_mapping(x, y, {}), "tests"),
    (lambda x, y, q: classification_scores([], []), "y_true"),
    (lambda x, y, q: classification_scores([1, 2], [1]), "y_pred"),
])
def test_bad_inputs_raise_data_error_naming_the_field(rng, call, field):
    x, y = _clusters(rng, per=5, d=4)
    q = rng.normal(size=(6, 4))
    with pytest.raises(DataError) as e:
        call(x, y, q)
    assert e.value.field == field


def test_missing_checkpoint_names_the_command(tmp_path):
    with pytest.raises(DataError, match="--only 07_training") as e:
        load_frozen_encoder(tmp_path, "geodesic")
    assert e.value.field == "run_dir"
    with pytest.raises(DataError, match="--only 07_training"):
        load_frozen_encoder(tmp_path, "random")  # no checkpoint at all to take the architecture from
    with pytest.raises(DataError) as e:
        load_frozen_encoder(tmp_path, "nonsense")
    assert e.value.field == "methods"


def test_select_c_uses_only_the_training_set_and_prefers_simpler_on_ties(rng):
    from cytoclr.mapping import select_c
    x = rng.normal(size=(120, 6))
    y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0)
    c, score = select_c(x, y, [1.0, 0.01, 0.1], folds=4, seed=0)
    assert c in (0.01, 0.1, 1.0) and set(score) == {0.01, 0.1, 1.0}
    assert score[c] == max(score.values()) and all(0 <= v <= 1 for v in score.values())
    assert c == min(k for k, v in score.items() if v == score[c])  # ties: the smaller C
    assert select_c(x, y, 0.3) == (0.3, {})  # a single value is used as given
    r = evaluate_mapping(x[:80], y[:80], {"t": (x[80:], y[80:])}, C=[0.01, 1.0])
    c2, _ = select_c(x[:80], y[:80], [0.01, 1.0])
    assert r["C"] == c2  # chosen from the training part alone


@pytest.mark.parametrize("grid", [[], [0.0], [-1.0], [float("nan")], ["a"]])
def test_select_c_rejects_bad_grids(rng, grid):
    from cytoclr.mapping import select_c
    x = rng.normal(size=(40, 3))
    y = np.arange(40) % 2
    with pytest.raises(DataError) as e:
        select_c(x, y, grid)
    assert e.value.field == "C"


def test_bootstrap_intervals_against_a_slow_reference(rng):
    "bootstrap_scores: sections drawn with replacement; compare with sklearn on the same draws, replicate by replicate."
    from sklearn.metrics import accuracy_score, f1_score
    from cytoclr.mapping import bootstrap_scores
    q = 300
    groups = rng.integers(0, 6, q)
    yt = rng.choice(list("abcd"), q)
    yp = np.where(rng.random(q) < 0.6, yt, rng.choice(list("abcde"), q))
    got = bootstrap_scores(yt, yp, groups, n_boot=200, seed=3)
    ug, gi = np.unique(groups, return_inverse=True)
    draws = np.random.default_rng(3).integers(0, len(ug), (200, len(ug)))
    acc, f1 = [], []
    for d in draws:  # slow: rebuild each replicate's data set and ask sklearn
        idx = np.concatenate([np.flatnonzero(gi == j) for j in d])
        acc.append(accuracy_score(yt[idx], yp[idx]))
        f1.append(f1_score(yt[idx], yp[idx], average="macro", zero_division=0))
    np.testing.assert_allclose(got["accuracy"], np.quantile(acc, [0.025, 0.975]), atol=1e-12)
    np.testing.assert_allclose(got["macro_f1"], np.quantile(f1, [0.025, 0.975]), atol=1e-12)
    point = accuracy_score(yt, yp)
    assert got["accuracy"][0] <= point <= got["accuracy"][1]
    one = bootstrap_scores(yt, yp, np.zeros(q), n_boot=50)  # one group: no spread
    assert one["accuracy"][0] == pytest.approx(one["accuracy"][1]) == pytest.approx(point)
    with pytest.raises(DataError, match="one length"):
        bootstrap_scores(yt, yp[:-1], groups)
    with pytest.raises(DataError):
        bootstrap_scores(yt, yp, groups, n_boot=0)


def test_atlas_baseline_scores_the_lookup():
    from cytoclr.mapping import atlas_scores
    s = atlas_scores(np.array(["V1", "V1", "4", "4"]), np.array(["V1", "V2", "4", "4"]))
    assert s["accuracy"] == 0.75 and s["n"] == 4


# ---- the chapter's protocol: sets, labels, classes, scores with intervals, metrics, table ----
from types import SimpleNamespace as _S

from cytoclr.core import MetricKeys as K
from cytoclr.mapping import (area_labels, atlas_gaps, bootstrap_scores, frequent_classes, label_summary,
                             mapping_metrics, mapping_scores, mapping_sets, mapping_table)


def test_mapping_sets_use_the_test_planes_and_seeds():
    sec = lambda brain, i, series="coronal": _S(brain=brain, section=i, series=series)
    train = [sec("a", i) for i in range(0, 100, 10)]
    test, unseen = [sec("a", 15), sec("b", 35)], [sec("u", 15), sec("u", 25), sec("u", 35, "sagittal")]
    man = _S(split=lambda s, mod: {"train": train, "test": test, "unseen_brain": unseen}[s], path="m.yml")
    sets, planes = mapping_sets(man, "nissl", train_sections=3, train_samples=40, test_samples=20, seed=5)
    assert planes == [("coronal", 15), ("coronal", 35)]
    assert [s.section for s in sets["train"][0]] == [0, 40, 90] and sets["train"][1:] == (40, 15)
    assert sets[K.HELDOUT] == (test, 20, 16) and [s.section for s in sets[K.UNSEEN][0]] == [15] and sets[K.UNSEEN][2] == 17
    man.split = lambda s, mod: {"train": train, "test": test, "unseen_brain": []}[s]
    with pytest.raises(DataError, match="unseen_brain"):
        mapping_sets(man, "nissl")


def test_area_labels_drop_the_hemisphere():
    ref = _S(area_names=["???", "L_V1_ROI", "R_V1_ROI", "L_4_ROI"])
    smp = {"train": _S(area=np.array([0, 1, 2, 3]), atlas_area=np.array([1, 1, 3, 0]))}
    labels, atlas = area_labels(ref, smp)
    assert labels["train"].tolist() == ["", "V1", "V1", "4"] and atlas["train"].tolist() == ["V1", "V1", "4", ""]


def test_frequent_classes_and_label_summary_by_hand():
    labels = np.array(["b", "a", "", "c", "a", "b", "c", "d", "e", "e", "e"])
    classes, counts, n = frequent_classes(labels, 3)
    assert classes.tolist() == ["e", "a", "b"] and counts.tolist() == [3, 2, 2] and n == 5  # ties of two: by name
    assert frequent_classes(labels, 10)[0].tolist() == ["e", "a", "b", "c", "d"]
    keep, info = label_summary({"train": labels, K.HELDOUT: np.array(["a", "x", "", "e"]), K.UNSEEN: np.array(["b"])},
                               classes, {"train": 3, K.HELDOUT: 2, K.UNSEEN: 1})
    assert keep[K.HELDOUT].tolist() == [True, False, False, True]
    assert info[K.HELDOUT] == dict(sampled=4, no_area=1, rare_area=1, kept=2, sections=2)
    assert info["train"] == dict(sampled=11, no_area=1, rare_area=3, kept=7, sections=3)
    with pytest.raises(DataError, match="unseen_brain"):
        label_summary({K.HELDOUT: np.array(["a"]), K.UNSEEN: np.array(["x"])}, classes, {K.HELDOUT: 1, K.UNSEEN: 1})


def _mapping_case(rng):
    centres = rng.normal(size=(3, 8)) * 5
    names = np.array(["a", "b", "c"])
    y = {k: np.repeat(names, n) for k, n in (("train", 20), (K.HELDOUT, 6), (K.UNSEEN, 4))}
    x = {k: centres[np.searchsorted(names, v)] + rng.normal(size=(len(v), 8)) for k, v in y.items()}
    feats = {"enc": x, "random": {k: rng.normal(size=v.shape) for k, v in x.items()}}
    atlas = {k: np.where(np.arange(len(v)) % 2 == 0, v, "a") for k, v in y.items()}  # wrong on every 2nd b and c
    groups = {k: np.arange(len(v)) % 3 for k, v in y.items()}
    return feats, y, atlas, groups


def test_mapping_scores_against_their_definitions(rng):
    feats, y, atlas, groups = _mapping_case(rng)
    results, mapping, knn = mapping_scores(feats, y, atlas, groups, ["enc", "random"], knn_k=3, probe_c=[0.1, 1.0], seed=2)
    assert mapping["enc"][K.HELDOUT][K.ACCURACY] == 1.0 and knn["enc"][K.UNSEEN][K.ACCURACY] == 1.0
    assert mapping["atlas"][K.HELDOUT][K.ACCURACY] == pytest.approx(12 / 18)  # all a, half of b and c
    assert mapping["atlas"][K.UNSEEN][K.ACCURACY] == pytest.approx(8 / 12)
    assert mapping["chance"][K.HELDOUT] == {K.ACCURACY: pytest.approx(1 / 3), K.MACRO_F1: pytest.approx(0.5 / 3)}
    ref = evaluate_mapping(feats["random"]["train"], y["train"], {t: (feats["random"][t], y[t]) for t in (K.HELDOUT, K.UNSEEN)},
                           k=3, C=[0.1, 1.0], seed=2)
    assert results["random"]["C"] == ref["C"]
    for t in (K.HELDOUT, K.UNSEEN):
        pred = ref["predictions"]["probe"][t]
        assert mapping["random"][t] == {K.ACCURACY: ref["probe"][t][K.ACCURACY], K.MACRO_F1: ref["probe"][t][K.MACRO_F1],
                                        K.CI95: bootstrap_scores(y[t], pred, groups[t], seed=2)}
        assert knn["random"][t][K.CI95] == bootstrap_scores(y[t], ref["predictions"]["knn"][t], groups[t], seed=2)
    assert set(mapping) == {"enc", "random", "atlas", "chance"} and set(knn) == {"enc", "random"}
    gaps = atlas_gaps(mapping, ["enc", "random"])
    assert gaps == {K.HELDOUT: pytest.approx(12 / 18 - 1.0), K.UNSEEN: pytest.approx(8 / 12 - 1.0)}  # 'random' left out
    m = mapping_metrics("nissl", mapping, knn, results, np.array(["a", "b", "c"]), 3, [("coronal", 15)],
                        {"train": {"kept": 60}})
    assert m[K.MAPPING]["nissl"] is mapping and m["mapping_knn"]["nissl"] is knn
    data = m["mapping_data"]["nissl"]
    assert data["classes"] == ["a", "b", "c"] and data["planes"] == [["coronal", 15]] and data["train"] == {"kept": 60}
    assert data["probe_c"] == {"enc": results["enc"]["C"], "random": results["random"]["C"]}
    assert set(data["probe_c_cv_accuracy"]["enc"]) == {"0.1", "1.0"}
    table = mapping_table(mapping, knn, ["enc"])
    assert table.loc[("enc", "probe"), ("accuracy", K.HELDOUT)].startswith("1.00 [")
    assert table.loc[("(chance)", "most frequent"), ("accuracy", K.HELDOUT)] == "0.33"
    assert len(table) == 4
