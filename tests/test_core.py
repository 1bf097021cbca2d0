"The core module: errors, atomic writes, metrics and figures that a rerun replaces, fingerprints, progress."
import ast
import json
import os
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from cytoclr import core
from cytoclr.core import (CHAPTER_ENV, STATUS_ENV, DataError, atomic_path, forget_outputs, parse_assignment,
                          path_fingerprint, progress, provenance, read_json, read_metrics, read_yaml_mapping,
                          save_figure, source_fingerprint, update_metrics, write_json_atomic)

ROOT = Path(__file__).resolve().parents[1]


def test_data_error_names_file_and_field():
    e = DataError("must be > 0", file="m.yml", field="a.b")
    assert str(e) == "m.yml: a.b: must be > 0" and e.field == "a.b" and isinstance(e, ValueError)
    assert str(DataError("plain")) == "plain"


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "m.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:  # on success the file appears whole, and nothing else
        tmp.write_text("{}")
    assert target.read_text() == "{}" and list(tmp_path.iterdir()) == [target]
    write_json_atomic(target, {"x": np.float32(1.5), "p": Path("a")})
    assert read_json(target) == {"p": "a", "x": 1.5}


def test_read_json_and_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(DataError, match="bad.json: broken JSON"):
        read_json(bad)
    assert read_json(tmp_path / "none.json", {"d": 1}) == {"d": 1}
    y = tmp_path / "p.yml"
    y.write_text("- a\n- b\n")
    with pytest.raises(DataError, match="p.yml: a profile must be a mapping"):
        read_yaml_mapping(y, "a profile")
    with pytest.raises(DataError, match="file not found"):
        read_yaml_mapping(tmp_path / "nope.yml")
    binary = tmp_path / "b.yml"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="b.yml: is not a text file"):
        read_yaml_mapping(binary, "a profile")
    with pytest.raises(DataError, match="is a folder, not a profile"):
        read_yaml_mapping(tmp_path, "a profile")


@pytest.mark.parametrize("text,expected", [("a=1", ("a", 1)), ("m=[x, y]", ("m", ["x", "y"])), ("s=a=b", ("s", "a=b")),
                                           ("f=1e-3", ("f", 0.001)), ("s=e5", ("s", "e5")), ("f=1.0e-3", ("f", 0.001))])
def test_parse_assignment(text, expected):
    assert parse_assignment(text) == expected


@pytest.mark.parametrize("bad", ["noequals", "=3", "a=[1,"])
def test_parse_assignment_refuses(bad):
    with pytest.raises(DataError):
        parse_assignment(bad)


def test_update_metrics_deep_merges(tmp_path):
    update_metrics(tmp_path, {"anchoring": {"geodesic": {"top1": 0.5}}, "profile": "quick"})
    m = update_metrics(tmp_path, {"anchoring": {"simclr": {"top1": 0.4}, "geodesic": {"top5": 0.9}}})
    assert m["anchoring"] == {"geodesic": {"top1": 0.5, "top5": 0.9}, "simclr": {"top1": 0.4}}
    assert read_metrics(tmp_path) == m


def test_a_chapter_rerun_replaces_its_own_keys_and_figures(tmp_path, monkeypatch):
    monkeypatch.setenv(CHAPTER_ENV, "09_a")
    update_metrics(tmp_path, {"anch": {"nissl": {"geodesic": {"top1": 0.4, "ci95": {"top1": [0.3, 0.5]}}, "simclr": {"top1": 0.3}}}})
    fig = plt.figure()
    save_figure(fig, tmp_path, "old_figure")
    monkeypatch.setenv(CHAPTER_ENV, "10_b")
    update_metrics(tmp_path, {"anch": {"nissl": {"geodesic": {"after": {"top1": 0.6}}}}, "other": 1})
    save_figure(fig, tmp_path, "kept_figure")
    gone = forget_outputs(tmp_path, "09_a")
    assert gone["figures"] == ["old_figure"] and not (tmp_path / "figures" / "old_figure.png").exists()
    assert (tmp_path / "figures" / "kept_figure.png").exists()
    m = read_metrics(tmp_path)
    assert m == {"anch": {"nissl": {"geodesic": {"after": {"top1": 0.6}}}}, "other": 1}
    assert forget_outputs(tmp_path, "09_a") == {"metrics": [], "figures": []}  # nothing left to forget
    monkeypatch.delenv(CHAPTER_ENV)
    update_metrics(tmp_path, {"free": 1})  # outside the runner: nothing is recorded
    assert "free" not in json.dumps(read_json(tmp_path / "outputs.json"))


def test_source_fingerprint_ignores_comments_and_docstrings(tmp_path):
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text('"mod"\ndef f(x):\n    "doc"\n    return x + 1  # add\n')
    b.write_text('"another doc"\n\ndef f(x):\n    # a comment\n    return x + 1\n')
    c.write_text('def f(x):\n    return x + 2\n')
    assert source_fingerprint(a) == source_fingerprint(b) != source_fingerprint(c)
    assert source_fingerprint("cytoclr.core") == source_fingerprint(core) == source_fingerprint(Path(core.__file__))


def test_path_fingerprint_of_files_and_folders(tmp_path):
    (tmp_path / "d" / "s").mkdir(parents=True)
    (tmp_path / "d" / "x").write_bytes(b"1")
    (tmp_path / "d" / "s" / "y").write_bytes(b"2")
    f1 = path_fingerprint(tmp_path / "d")
    import hashlib
    sha = lambda b: hashlib.sha256(b).hexdigest()
    want = sha(f"s/y\t{sha(b'2')}\nx\t{sha(b'1')}\n".encode())  # the manifest's rule for folders (zarr stores)
    assert f1 == want and path_fingerprint(tmp_path / "d" / "x") == sha(b"1")
    (tmp_path / "d" / "s" / "y").write_bytes(b"3")
    assert path_fingerprint(tmp_path / "d") != f1 and path_fingerprint(tmp_path / "none") == "missing"


def test_progress_mirrors_its_line_to_the_status_file(tmp_path, monkeypatch):
    monkeypatch.setenv(STATUS_ENV, str(tmp_path / "status"))
    for _ in progress(range(5), desc="steps", mininterval=0, file=open(os.devnull, "w")):
        pass
    line = (tmp_path / "status").read_text()
    assert line.startswith("steps") and "5/5" in line


def test_provenance_has_commit_and_packages():
    p = provenance(ROOT)
    assert set(p) >= {"commit", "dirty", "python", "packages"}
    assert "numpy" in p["packages"] and "torch" in p["packages"]
    if (ROOT / ".git").exists():
        assert len(p["commit"]) == 40


def test_only_the_cli_imports_the_runner_and_core_imports_no_chapter():
    "core is the bottom layer; pipeline (the runner) sits on top and only the command line uses it."
    for py in sorted((ROOT / "cytoclr").glob("*.py")):
        if py.name == "_modidx.py":
            continue
        tree = ast.parse(py.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                names.add(mod.replace("cytoclr.", ".") if mod.startswith("cytoclr") else mod)
            elif isinstance(node, ast.Import):
                names |= {a.name.replace("cytoclr.", ".") for a in node.names}
        imports_pipeline = any(n in (".pipeline",) for n in names)
        if py.stem not in ("cli", "pipeline"):
            assert not imports_pipeline, f"{py.name} imports the runner (cytoclr.pipeline): use cytoclr.core"
        if py.stem == "core":
            assert not {n for n in names if n.startswith(".")}, f"core imports other cytoclr modules: {names}"


# ---- cosine_topk: the one exact, chunked nearest-neighbour search --------------------------------------------------

from cytoclr.core import cosine_topk, topk_agreement


def unit32(x):
    "Definition: each row divided by its L2 norm in float64 (zero rows stay zero), rounded to float32."
    x = np.asarray(x, np.float64)
    nrm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(nrm > 0, x / np.where(nrm > 0, nrm, 1), 0).astype(np.float32)


def exact_sims(q, f):
    "(q, n) float32: the float64 (exact-product) cosines of the float32 unit rows, rounded to float32."
    return (unit32(q).astype(np.float64) @ unit32(f).astype(np.float64).T).astype(np.float32)


def brute_topk(q, f, k):
    "Straight from the definition: every row sorted by (-similarity, frame index), the first min(k, n) kept."
    s = exact_sims(q, f)
    idx = np.array([sorted(range(s.shape[1]), key=lambda j: (-s[i, j], j))[:k] for i in range(len(s))], np.int64)
    return idx.reshape(len(s), min(k, s.shape[1])), np.take_along_axis(s, idx.reshape(len(s), -1), 1)


def assert_topk_equal(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0].dtype == np.int64 and got[1].dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("q,n,d,k", [(1, 1, 1, 1), (17, 60, 8, 5), (40, 300, 33, 20), (5, 25, 3, 25)])
def test_cosine_topk_equals_brute_force(rng, dtype, as_torch, q, n, d, k):
    import torch
    qa, fa = rng.standard_normal((q, d)).astype(dtype), rng.standard_normal((n, d)).astype(dtype)
    want = brute_topk(qa, fa, k)
    args = (torch.from_numpy(qa), torch.from_numpy(fa)) if as_torch else (qa, fa)
    assert_topk_equal(cosine_topk(*args, k), want)
    # and against float64 cosines of the unrounded rows: the same up to near-ties
    c = (qa / np.linalg.norm(qa, axis=1, keepdims=True)).astype(np.float64) @ \
        (fa / np.linalg.norm(fa, axis=1, keepdims=True)).astype(np.float64).T
    o = np.argsort(-c, axis=1, kind="stable")[:, :min(k, n)]
    assert topk_agreement(want[0], want[1], o, np.take_along_axis(c, o, 1), tol=1e-6) == 1.0


def test_float32_and_float64_of_the_same_values_give_the_same_result(rng):
    qa, fa = rng.standard_normal((20, 16)).astype(np.float32), rng.standard_normal((200, 16)).astype(np.float32)
    assert_topk_equal(cosine_topk(qa.astype(np.float64), fa.astype(np.float64), 10), cosine_topk(qa, fa, 10))


def test_ties_go_to_the_lower_frame_index(rng):
    f = rng.standard_normal((400, 12))
    f[[50, 3, 399, 200]] = f[120]  # five equal rows, scattered
    f[250:330] = f[9]  # 81 equal rows (with 9): k = 20 cuts through the group, beyond the k + 16 candidates
    q = np.vstack([f[120], f[9] * 3.0, f[9] + 0.05 * rng.standard_normal(12), rng.standard_normal((10, 12))])
    for k in (1, 3, 5, 20, 90):
        got = cosine_topk(q, f, k)
        assert_topk_equal(got, brute_topk(q, f, k))
    idx, sim = cosine_topk(q, f, 7)
    assert idx[0, :5].tolist() == [3, 50, 120, 200, 399] and (sim[0, :5] == sim[0, 0]).all()
    assert idx[1].tolist() == [9, *range(250, 256)]


def test_all_equal_rows_and_integer_vectors(rng):
    f = np.ones((50, 4))
    idx, sim = cosine_topk(rng.standard_normal((6, 4)), f, 8)
    assert (idx == np.arange(8)).all() and (sim == sim[:, :1]).all()
    f = rng.integers(-1, 2, (300, 5)).astype(float)  # few distinct directions: ties everywhere
    q = rng.integers(-1, 2, (30, 5)).astype(float)
    for k in (1, 10, 40, 300):
        assert_topk_equal(cosine_topk(q, f, k), brute_topk(q, f, k))


@pytest.mark.parametrize("chunk", [1, 7, 30, 31, 1000, None])
def test_the_result_does_not_depend_on_chunk(rng, chunk):
    q, f = rng.standard_normal((30, 24)), rng.standard_normal((500, 24))
    f[100:160] = f[4]
    q[:3] = f[4]
    assert_topk_equal(cosine_topk(q, f, 25, chunk=chunk), brute_topk(q, f, 25))
    assert_topk_equal(cosine_topk(q, f, 25, chunk=chunk), cosine_topk(q, f, 25, chunk=30))


def test_k_at_least_n_returns_every_frame_row_sorted(rng):
    q, f = rng.standard_normal((9, 6)), rng.standard_normal((13, 6))
    f[5] = f[2]
    for k in (13, 14, 100):
        idx, sim = cosine_topk(q, f, k)
        assert idx.shape == sim.shape == (9, 13)
        assert (np.sort(idx, 1) == np.arange(13)).all()
        assert_topk_equal((idx, sim), brute_topk(q, f, 13))


def test_unnormalised_and_zero_rows(rng):
    q, f = rng.standard_normal((12, 10)), rng.standard_normal((80, 10))
    base = cosine_topk(q, f, 15)
    scale = lambda m, lo, hi: m * np.exp(rng.uniform(lo, hi, (len(m), 1)))
    assert_topk_equal(cosine_topk(scale(q, -3, 3), scale(f, -3, 3), 15), base)
    assert_topk_equal(cosine_topk(q * 1e200, f * 1e-200, 15), base)  # float64 beyond float32 (squares overflow)
    f0, q0 = f.copy(), q.copy()
    f0[[0, 40]] = 0
    q0[3] = 0
    idx, sim = cosine_topk(q0, f0, 80)
    assert (idx[3] == np.arange(80)).all() and (sim[3] == 0).all()  # a zero query ties with everything at 0
    assert (sim[np.arange(12)[:, None], np.argsort(idx, 1)][:, [0, 40]] == 0).all()  # zero frame rows: similarity 0
    assert_topk_equal((idx, sim), brute_topk(q0, f0, 80))
    assert_topk_equal(cosine_topk(q0, f0, 5), brute_topk(q0, f0, 5))


def test_empty_queries_and_threads(rng):
    import torch
    idx, sim = cosine_topk(np.zeros((0, 4)), rng.standard_normal((9, 4)), 3)
    assert idx.shape == sim.shape == (0, 3) and idx.dtype == np.int64 and sim.dtype == np.float32
    before = torch.get_num_threads()
    q, f = rng.standard_normal((8, 4)), rng.standard_normal((30, 4))
    assert_topk_equal(cosine_topk(q, f, 4, threads=1), cosine_topk(q, f, 4))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("make,field", [
    (lambda q, f: dict(k=0), "k"), (lambda q, f: dict(k=-2), "k"), (lambda q, f: dict(k=2.5), "k"),
    (lambda q, f: dict(k=True), "k"), (lambda q, f: dict(chunk=0), "chunk"), (lambda q, f: dict(threads=0), "threads"),
    (lambda q, f: dict(queries=np.where(np.arange(4) == 2, np.nan, q)), "queries"),
    (lambda q, f: dict(frame=np.where(np.arange(4) == 1, np.inf, f)), "frame"),
    (lambda q, f: dict(queries=q[:, :3]), "queries"), (lambda q, f: dict(frame=f[:0]), "frame"),
    (lambda q, f: dict(queries=q[0]), "queries"), (lambda q, f: dict(frame=f.astype(complex)), "frame"),
    (lambda q, f: dict(queries=q.astype(str)), "queries"), (lambda q, f: dict(frame=f[:, :0]), "frame"),
])
def test_cosine_topk_refuses_bad_input(rng, make, field):
    q, f = rng.standard_normal((5, 4)), rng.standard_normal((10, 4))
    args = {"queries": q, "frame": f, "k": 3, **make(q, f)}
    with pytest.raises(DataError) as e:
        cosine_topk(**args)
    assert e.value.field == field


def test_a_reduced_precision_product_is_detected(rng, monkeypatch):
    "The exactness argument needs IEEE float32 products: an imprecise one raises instead of answering wrongly."
    import torch
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, out=None: out.copy_(mm(a, b) + 1e-3 * torch.randn(len(a), b.shape[1])))
    with pytest.raises(RuntimeError, match="less precise"):
        cosine_topk(rng.standard_normal((4, 8)), rng.standard_normal((50, 8)), 3)


def test_the_same_neighbours_as_mapping_top_k(rng):
    "mapping's kNN (`cytoclr.mapping._top_k` on a cosine matrix) and cosine_topk pick the same neighbours, ties too."
    mapping = pytest.importorskip("cytoclr.mapping")
    top_k = getattr(mapping, "_top_k", None)
    if top_k is None:
        pytest.skip("cytoclr.mapping._top_k is gone (mapping uses cosine_topk itself)")
    f = rng.standard_normal((250, 16))
    f[60:110] = f[2]  # ties at the cut
    f[200:] = rng.integers(-1, 2, (50, 16))
    q = np.vstack([rng.standard_normal((20, 16)), f[2], f[2] + 0.1, f[220], rng.integers(-1, 2, (8, 16))])
    for k in (1, 10, 30, 60, 250):
        np.testing.assert_array_equal(cosine_topk(q, f, k)[0], top_k(exact_sims(q, f), k))
    a = f / np.linalg.norm(f, axis=1, keepdims=True)  # mapping's own float64 cosines: random data has no near-ties
    b = rng.standard_normal((30, 16))
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    np.testing.assert_array_equal(cosine_topk(b, a[:200], 12)[0], top_k(b @ a[:200].T, 12))


def test_topk_agreement_allows_near_ties_only():
    idx = np.array([[4, 1, 7], [2, 3, 5]])
    sim = np.array([[0.9, 0.5, 0.5], [0.8, 0.7, 0.6]])
    assert topk_agreement(idx, sim, idx, sim) == 1.0
    swapped = np.array([[4, 7, 1], [2, 3, 5]])  # 1 and 7 tie: the same answer
    assert topk_agreement(idx, sim, swapped, sim + 1e-7) == 1.0
    cut = np.array([[4, 1, 8], [2, 3, 5]])  # 8 ties with 7 at the cut
    assert topk_agreement(idx, sim, cut, sim) == 1.0
    assert topk_agreement(idx, sim, np.array([[4, 1, 8], [3, 2, 5]]), sim) == 0.5  # 2 and 3 differ by 0.1
    assert topk_agreement(idx, sim, cut, np.array([[0.9, 0.5, 0.49], [0.8, 0.7, 0.6]])) == 0.5
    with pytest.raises(DataError) as e:
        topk_agreement(idx, sim, idx[:, :2], sim)
    assert e.value.field == "idx_b"


def test_cosine_topk_agrees_with_faiss(rng):
    faiss = pytest.importorskip("faiss")
    f = rng.standard_normal((2000, 32)).astype(np.float32)
    q = rng.standard_normal((50, 32)).astype(np.float32)
    f, q = f / np.linalg.norm(f, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(32)
    index.add(f)
    d_f, i_f = index.search(q, 20)
    idx, sim = cosine_topk(q, f, 20)
    assert topk_agreement(idx, sim, i_f, d_f, tol=1e-6) == 1.0


# ---- cosine_topk through faiss, without faiss, and the approximate index -------------------------------------------

def argsort_topk(q, f, k):
    "Reference: a stable argsort of the exact (float64) products of the float32 unit rows: ties to the lower index."
    s = exact_sims(q, f)  # (q, n) float32 of the exact products
    idx = np.argsort(-s.astype(np.float64), axis=1, kind="stable")[:, :k]
    return idx.astype(np.int64), np.take_along_axis(s, idx, 1)


@pytest.fixture
def faiss_path(monkeypatch):
    "cosine_topk searches through faiss whatever the size; the fixture's value counts faiss.knn calls."
    faiss = pytest.importorskip("faiss")
    monkeypatch.setattr(core, "_FAISS_MIN_QUERIES", 0)
    calls, knn = [], faiss.knn
    monkeypatch.setattr(faiss, "knn", lambda *a, **kw: calls.append(len(a[0])) or knn(*a, **kw))
    return calls


def tie_heavy(rng, n=400, d=12):
    "A frame with exact ties (81 equal rows: beyond the k + 16 candidates), integer directions and zero rows."
    f = rng.standard_normal((n, d))
    f[[50, 3, 399, 200]] = f[120]
    f[250:330] = f[9]
    f[330:380] = rng.integers(-1, 2, (50, d))
    f[[17, 390]] = 0
    q = np.vstack([f[120], f[9] * 3.0, f[9] + 0.05 * rng.standard_normal(d), np.zeros(d), f[340],
                   rng.integers(-1, 2, (5, d)), rng.standard_normal((10, d))])
    return q, f


@pytest.mark.parametrize("k", [1, 5, 20, 90, 400])
def test_the_faiss_path_equals_an_argsort_of_the_exact_products(rng, faiss_path, k):
    import torch
    q, f = tie_heavy(rng)
    mm = torch.mm
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "mm", lambda *a, **kw: pytest.fail("torch searched"))
        got = cosine_topk(q, f, k)
    assert faiss_path  # faiss proposed the candidates
    assert_topk_equal(got, argsort_topk(q, f, k))
    assert_topk_equal(got, brute_topk(q, f, k))
    assert torch.mm is mm


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_the_faiss_path_does_not_depend_on_chunk_or_threads(rng, faiss_path, chunk):
    import faiss
    import torch
    q, f = tie_heavy(rng)
    settings = lambda: (torch.get_num_threads(), faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold)
    before = settings()
    want = argsort_topk(q, f, 25)
    assert_topk_equal(cosine_topk(q, f, 25, chunk=chunk), want)
    assert_topk_equal(cosine_topk(q, f, 25, chunk=chunk, threads=1), want)
    assert settings() == before  # restored
    assert max(faiss_path) == min(chunk or len(q), len(q))


def test_the_faiss_path_runs_in_forked_workers(rng, faiss_path):
    "After faiss ran on two threads here, forked workers (one thread each, `fork_map`) search without hanging."
    from cytoclr.core import fork_map
    q, f = rng.standard_normal((200, 16)), rng.standard_normal((2000, 16))
    want = cosine_topk(q, f, 10, threads=2)
    got = fork_map(lambda i: cosine_topk(q[i::2], f, 10), range(2), workers=2)
    assert_topk_equal((np.vstack([got[0][0], got[1][0]]), np.vstack([got[0][1], got[1][1]])),
                      (np.vstack([want[0][0::2], want[0][1::2]]), np.vstack([want[1][0::2], want[1][1::2]])))


def test_the_faiss_path_detects_imprecise_products(rng, faiss_path, monkeypatch):
    import faiss
    knn = faiss.knn
    monkeypatch.setattr(faiss, "knn", lambda *a, **kw: (lambda d, i: (d + 1e-3, i))(*knn(*a, **kw)))
    with pytest.raises(RuntimeError, match="less precise"):
        cosine_topk(rng.standard_normal((4, 8)), rng.standard_normal((50, 8)), 3)


def test_without_faiss_torch_searches_and_gives_the_same_answer(rng, monkeypatch):
    import torch
    q, f = tie_heavy(rng)
    monkeypatch.setattr(core, "_FAISS_MIN_QUERIES", 0)
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    calls, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **kw: calls.append(1) or mm(*a, **kw))
    for k in (3, 20):
        assert_topk_equal(cosine_topk(q, f, k), argsort_topk(q, f, k))
    assert calls
    with pytest.raises(ModuleNotFoundError, match="faiss"):
        core.ApproxIndex(f)


def clustered(rng, n, nq, d=32, centres=40):
    c = rng.standard_normal((centres, d))
    return (c[rng.integers(0, centres, nq)] + rng.standard_normal((nq, d)),
            c[rng.integers(0, centres, n)] + rng.standard_normal((n, d)))


def test_the_approximate_index_recall_on_clustered_embeddings():
    "Measured 0.973 (default 102 lists, 6 probed) on this seeded input; recall rises to 1 as every list is probed."
    pytest.importorskip("faiss")
    from cytoclr.core import ApproxIndex, topk_recall
    q, f = clustered(np.random.default_rng(0), 4000, 300)
    exact = cosine_topk(q, f, 10)
    ann = ApproxIndex(f, seed=0)
    idx, sim = ann.search(q, 10)
    assert (ann.nlist, ann.nprobe) == (102, 6) and idx.shape == sim.shape == (300, 10)
    assert idx.dtype == np.int64 and sim.dtype == np.float32
    assert topk_recall(idx, sim, *exact) == ann.recall(q, 10) >= 0.95
    np.testing.assert_array_equal(sim, exact_sims(q, f)[np.arange(300)[:, None], idx])  # exact similarities
    assert (np.diff(sim, axis=1) <= 0).all()
    again = ApproxIndex(f, seed=0, threads=1).search(q, 10, threads=1)  # deterministic, whatever the threads
    assert_topk_equal(again, (idx, sim))
    assert_topk_equal(ApproxIndex(f, nlist=20, nprobe=20).search(q, 10), exact)  # every list probed: exact
    assert ApproxIndex(f, nprobe=1).recall(q, 10) < ann.recall(q, 10)


def test_the_approximate_index_falls_back_where_its_lists_run_out(rng):
    pytest.importorskip("faiss")
    from cytoclr.core import ApproxIndex
    q, f = clustered(rng, 400, 30, d=8, centres=4)
    f[100:180] = f[3]  # ties
    ann = ApproxIndex(f, nlist=10, nprobe=1)
    idx, sim = ann.search(q, 60)
    assert (idx >= 0).all() and (np.diff(np.sort(idx, 1), axis=1) > 0).all()  # no -1, no repeats
    probed = ann._quantizer.search(core._unit_rows(q), 1)[1][:, 0]  # (q,) the one list each query searches
    short = np.array([ann.index.invlists.list_size(int(i)) for i in probed]) < 60
    assert 0 < short.sum() < len(q)  # some queries' lists hold fewer than k rows: those are searched exactly
    exact = cosine_topk(q, f, 60)
    assert_topk_equal((idx[short], sim[short]), (exact[0][short], exact[1][short]))
    idx, sim = ann.search(q, 10_000)  # k > n: every row, exactly
    assert_topk_equal((idx, sim), argsort_topk(q, f, 400))


@pytest.mark.parametrize("make,field", [
    (lambda q, f: dict(k=0), "k"), (lambda q, f: dict(k=-1), "k"), (lambda q, f: dict(queries=q[:, :3]), "queries"),
    (lambda q, f: dict(nlist=0), "nlist"), (lambda q, f: dict(nlist=11), "nlist"), (lambda q, f: dict(nprobe=0), "nprobe"),
    (lambda q, f: dict(seed=-1), "seed"), (lambda q, f: dict(frame=f[:0]), "frame"),
    (lambda q, f: dict(frame=np.where(np.arange(4) == 1, np.nan, f)), "frame"),
])
def test_the_approximate_index_refuses_bad_input(rng, make, field):
    pytest.importorskip("faiss")
    from cytoclr.core import ApproxIndex
    q, f = rng.standard_normal((5, 4)), rng.standard_normal((10, 4))
    args = {"queries": q, "frame": f, "k": 3, "nlist": 2, **make(q, f)}
    with pytest.raises(DataError) as e:
        ApproxIndex(args["frame"], **{a: args[a] for a in ("nlist", "nprobe", "seed") if a in args}) \
            .search(args["queries"], args["k"])
    assert e.value.field == field


@pytest.mark.parametrize("field", ["k", "queries"])
def test_the_faiss_path_refuses_bad_input(rng, faiss_path, field):
    q, f = rng.standard_normal((5, 4)), rng.standard_normal((10, 4))
    with pytest.raises(DataError) as e:
        cosine_topk(q[:, :3] if field == "queries" else q, f, 0 if field == "k" else 3)
    assert e.value.field == field and not faiss_path


def test_topk_recall_counts_neighbours_and_near_ties_at_the_cut():
    from cytoclr.core import topk_recall
    idx, sim = np.array([[4, 1, 7], [2, 3, 5]]), np.array([[0.9, 0.5, 0.5], [0.8, 0.7, 0.6]])
    assert topk_recall(idx, sim, idx, sim) == 1.0
    assert topk_recall(np.array([[4, 1, 8], [2, 3, 5]]), sim, idx, sim) == 1.0  # 8 ties with 7 at the cut
    assert topk_recall(np.array([[4, 1, 8], [2, 9, 6]]), np.array([[0.9, 0.5, 0.4], [0.8, 0.65, 0.3]]),
                       idx, sim) == 3 / 6
    assert np.isnan(topk_recall(idx[:0], sim[:0], idx[:0], sim[:0]))
    with pytest.raises(DataError) as e:
        topk_recall(idx, sim, idx[:, :2], sim)
    assert e.value.field == "idx_b"


# ---------------------------------------------------------------- fork_map
def test_fork_map_returns_in_order_what_a_loop_returns():
    from cytoclr.core import fork_map
    big = np.arange(100_000)  # a closure over a large array: it reaches the workers by fork
    fn = lambda i: (os.getpid(), int(big[i::13].sum()))
    want = [int(big[i::13].sum()) for i in range(13)]
    for chunksize in (1, 3, 20):
        got = fork_map(fn, range(13), workers=2, chunksize=chunksize)
        assert [v for _, v in got] == want
    assert len({p for p, _ in fork_map(fn, range(13), workers=2)}) == 2  # two worker processes did the work
    assert {p for p, _ in fork_map(fn, range(13), workers=1)} == {os.getpid()}  # one worker: here
    assert fork_map(fn, [], workers=2) == []


def test_fork_map_workers_run_one_thread_and_errors_come_back():
    import torch
    from cytoclr.core import fork_map
    assert fork_map(lambda _: torch.get_num_threads(), range(4), workers=2) == [1] * 4
    waits = []
    assert fork_map(lambda s: time.sleep(s) or s, [1.5, 0.1], workers=2, on_wait=lambda: waits.append(1)) == [1.5, 0.1]
    assert waits  # called while a worker was busy

    def boom(i):
        if i == 3:
            raise DataError("bad item", field="items[3]")
        return i
    with pytest.raises(DataError, match="bad item"):
        fork_map(boom, range(6), workers=2)
    for bad in (-1, 1.5, "2"):
        with pytest.raises(DataError, match="workers must be a positive number"):
            fork_map(boom, range(2), workers=bad)


@pytest.mark.parametrize("bad, what", [("ten", "must be a number"), (None, "must be a number"), (True, "must be a number"),
                                       (float("nan"), "finite"), (float("inf"), "finite"), (0, "> 0"), (-1.5, "> 0")])
def test_check_number_refuses_with_the_field(bad, what):
    with pytest.raises(DataError, match=what) as e:
        core.check_number(bad, "tau", positive=True, file="m.yml")
    assert e.value.field == "tau" and str(e.value).startswith("m.yml: tau: ")


def test_check_number_accepts_and_converts():
    assert core.check_number("0.1", "tau", positive=True) == 0.1
    assert core.check_number(np.float32(2), "x") == 2.0 and isinstance(core.check_number(np.int64(2), "x"), float)
    assert core.check_number(3.0, "rings", integer=True) == 3 and isinstance(core.check_number(3.0, "r", integer=True), int)
    assert core.check_number(0, "x", minimum=0) == 0
    with pytest.raises(DataError, match="whole number"):
        core.check_number(2.5, "rings", integer=True)
    with pytest.raises(DataError, match=">= 1"):
        core.check_number(0, "rings", minimum=1)


def test_metric_keys_match_what_the_summary_reads():
    K = core.MetricKeys
    assert set(K.SCORES) | {K.CI95} == {"top1", "top5", "top10", "median_error_mm", "p90_error_mm", "within_5mm",
                                         "within_10mm", "outlier_fraction", "ci95"}
    assert (K.REGISTERED, K.HOMOLOGOUS) == K.TRUTHS and K.ANCHORING_UNSEEN == "anchoring_unseen_brain"
