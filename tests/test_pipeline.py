import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from cytoclr.core import DataError, PipelineError
from cytoclr.pipeline import (declared_parameters, list_chapters,
                              load_profile, run_pipeline, toc_chapters)

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"


def _nb(path, params: str, body: str):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), p, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, str(path))


@pytest.fixture
def tiny_book(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _nb(nbs / "00_a.ipynb", 'run_dir = "x"\nsize = 3', "from pathlib import Path\nPath(run_dir, 'a.txt').write_text(str(size))")
    _nb(nbs / "01_b.ipynb", 'run_dir = "x"\nfactor = 2',
        "from pathlib import Path\nn = int(Path(run_dir, 'a.txt').read_text())\nPath(run_dir, 'b.txt').write_text(str(n * factor))")
    prof = tmp_path / "tiny.yml"
    prof.write_text("size: 5\n")
    return nbs, prof


def test_runner_executes_in_order_and_resumes(tiny_book, tmp_path):
    nbs, prof = tiny_book
    out = tmp_path / "run"
    r1 = run_pipeline(str(prof), out, nbs_dir=nbs, progress=False)
    assert r1["ran"] == ["00_a", "01_b"]
    assert (out / "b.txt").read_text() == "10"
    assert (out / "00_a.ipynb").exists() and (out / "01_b.ipynb").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["profile"] == "tiny" and set(m["seconds"]) == {"00_a", "01_b"}
    # unchanged: nothing runs again
    assert run_pipeline(str(prof), out, nbs_dir=nbs, progress=False)["ran"] == []
    # an override on the second chapter reruns only that chapter
    r3 = run_pipeline(str(prof), out, overrides={"factor": 3}, nbs_dir=nbs, progress=False)
    assert r3["ran"] == ["01_b"] and (out / "b.txt").read_text() == "15"
    # a changed first chapter reruns everything after it
    r4 = run_pipeline(str(prof), out, overrides={"size": 1, "factor": 3}, nbs_dir=nbs, progress=False)
    assert r4["ran"] == ["00_a", "01_b"] and (out / "b.txt").read_text() == "3"
    # --only runs one chapter on earlier artifacts
    assert run_pipeline(str(prof), out, overrides={"factor": 4}, only="01_b", nbs_dir=nbs, progress=False)["ran"] == ["01_b"]


def test_runner_names_failing_notebook_and_cell(tiny_book, tmp_path):
    nbs, prof = tiny_book
    _nb(nbs / "02_c.ipynb", 'run_dir = "x"', "x = 1\nraise ValueError('boom in chapter c')")
    with pytest.raises(PipelineError, match=r"02_c.ipynb failed in cell \d+.*ValueError: boom in chapter c"):
        run_pipeline(str(prof), tmp_path / "run", nbs_dir=nbs, progress=False)
    assert (tmp_path / "run" / "02_c.failed.ipynb").exists()
    assert not (tmp_path / "run" / "02_c.ipynb").exists()  # no half-written result that looks complete
    # the chapters before it are done and are skipped on the next call
    with pytest.raises(PipelineError):
        r = run_pipeline(str(prof), tmp_path / "run", nbs_dir=nbs, progress=False)
    state = json.loads((tmp_path / "run" / "pipeline_state.json").read_text())
    assert set(state["chapters"]) == {"00_a", "01_b"}


def test_unknown_parameters_and_profiles_are_refused(tiny_book, tmp_path):
    nbs, prof = tiny_book
    with pytest.raises(DataError, match="declared by no chapter.*sizee"):
        run_pipeline(str(prof), tmp_path / "r", overrides={"sizee": 1}, nbs_dir=nbs, progress=False)
    with pytest.raises(DataError, match="unknown profile 'huge'"):
        load_profile("huge")
    bad = tmp_path / "bad.yml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(DataError, match="bad.yml: broken YAML"):
        load_profile(str(bad))
    with pytest.raises(DataError, match="no chapter named"):
        run_pipeline(str(prof), tmp_path / "r", only="07_nothing", nbs_dir=nbs, progress=False)


def test_cli_errors_have_no_traceback(tiny_book, tmp_path):
    nbs, prof = tiny_book
    cmd = [sys.executable, "-m", "cytoclr", "run", "--profile", str(prof), "--out", str(tmp_path / "r"),
           "--nbs", str(nbs), "-p", "nope=1", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    assert "error:" in r.stderr and "nope" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "cytoclr", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "run" in r.stdout and "book" in r.stdout and "data" in r.stdout


# --- the book's own notebooks -------------------------------------------------------------------

def test_every_chapter_has_exactly_one_parameters_cell_with_run_dir():
    for nb_path in list_chapters(NBS):
        nb = nbformat.read(str(nb_path), as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{nb_path.name}: {len(tagged)} parameters cells"
        assert "run_dir" in declared_parameters(nb_path), nb_path.name
        assert nb.metadata.get("kernelspec", {}).get("name") == "python3", nb_path.name


def test_notebooks_are_committed_without_outputs():
    for nb_path in NBS.glob("*.ipynb"):
        nb = nbformat.read(str(nb_path), as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                assert not c.outputs and c.execution_count is None, nb_path.name


def test_quarto_and_jupyter_book_list_the_same_chapters():
    q = yaml.safe_load((ROOT / "_quarto.yml").read_text())

    def walk(items):
        for it in items:
            if isinstance(it, str):
                yield Path(it).stem
            else:
                yield from walk(it.get("chapters", []))
    assert list(walk(q["book"]["chapters"])) == toc_chapters(ROOT / "book" / "_toc.yml")
    # and the book contains every chapter the runner executes
    assert sorted(toc_chapters(ROOT / "book" / "_toc.yml")) == sorted(p.stem for p in list_chapters(NBS))


def test_profiles_parse_and_quick_matches_notebook_defaults():
    declared = {}
    for nb in list_chapters(NBS):
        for k, v in declared_parameters(nb).items():
            declared.setdefault(k, set()).add(v)
    for name in ("smoke", "quick", "paper"):
        _, params = load_profile(name)
        for k in params:
            assert k in declared, f"profile {name}: parameter {k} is declared by no chapter"
    _, quick = load_profile("quick")
    for k, v in quick.items():
        defaults = {yaml.safe_load(d) for d in declared[k]}
        assert defaults == {v}, f"quick.yml {k}={v!r} but notebooks default to {defaults}"


def test_papermill_parses_every_parameter():
    "A parameter papermill cannot parse (e.g. '=' in its comment) could not be set from a profile."
    import re
    for nb_path in list_chapters(NBS):
        nb = nbformat.read(str(nb_path), as_version=4)
        src = "\n".join(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        assigned = {m.group(1) for m in re.finditer(r"^(\w+)\s*(?::[^=\n]*)?=", src, re.M)}
        assert assigned == set(declared_parameters(nb_path)), f"{nb_path.name}: papermill misses {assigned - set(declared_parameters(nb_path))}"


# --- issue 10: the cache key sees contents; a folder remembers its parameters; nothing stale survives ----------

def test_editing_the_manifest_reruns_the_chapters_that_read_it(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _nb(nbs / "00_x.ipynb", 'run_dir = "x"', "1")
    _nb(nbs / "01_a.ipynb", 'run_dir = "x"\nmanifest = "m.yml"', "from pathlib import Path\nPath(run_dir, 'a.txt').write_text(Path(manifest).read_text())")
    _nb(nbs / "02_b.ipynb", 'run_dir = "x"', "2")
    man = tmp_path / "m.yml"
    man.write_text("brains:\n  - {id: p0, phantom: {seed: 0}}\n")
    prof = tmp_path / "p.yml"
    prof.write_text(f"manifest: {man}\n")
    out = tmp_path / "run"
    assert run_pipeline(str(prof), out, nbs_dir=nbs, progress=False)["ran"] == ["00_x", "01_a", "02_b"]
    assert run_pipeline(str(prof), out, nbs_dir=nbs, progress=False)["ran"] == []
    man.write_text("brains:\n  - {id: p0, phantom: {seed: 0}, description: the first brain}\n")  # same name, new content
    assert run_pipeline(str(prof), out, nbs_dir=nbs, progress=False)["ran"] == ["01_a", "02_b"]
    assert "the first brain" in (out / "a.txt").read_text()
    assert run_pipeline(str(prof), out, nbs_dir=nbs, progress=False)["ran"] == []


def test_a_file_named_by_the_manifest_without_checksum_is_part_of_the_key(tmp_path):
    from cytoclr.manifest import manifest_fingerprint
    (tmp_path / "mask.png").write_bytes(b"one")
    man = tmp_path / "m.yml"
    man.write_text("sections:\n  - {path: a.png, sha256: " + "0" * 64 + ", mask: {path: mask.png}}\n")
    f1 = manifest_fingerprint(man)
    (tmp_path / "mask.png").write_bytes(b"two")
    assert manifest_fingerprint(man) != f1


def test_profile_paths_resolve_relative_to_the_working_folder(tiny_book, tmp_path, monkeypatch):
    nbs, _ = tiny_book
    _nb(nbs / "02_c.ipynb", 'run_dir = "x"\nmanifest = "none.yml"', "from pathlib import Path\nPath(run_dir, 'c.txt').write_text(manifest)")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "m.yml").write_text("{}\n")
    prof = tmp_path / "work" / "p.yml"
    prof.write_text("manifest: m.yml\n")
    monkeypatch.chdir(tmp_path / "work")
    run_pipeline(str(prof), tmp_path / "run", only="02_c", nbs_dir=nbs, progress=False)  # the chapter that reads it
    assert (tmp_path / "run" / "c.txt").read_text() == str((tmp_path / "work" / "m.yml").resolve())


def test_a_run_folder_remembers_its_overrides_until_reset(tiny_book, tmp_path, capsys):
    nbs, prof = tiny_book
    out = tmp_path / "run"
    run_pipeline(str(prof), out, nbs_dir=nbs, progress=False)
    assert (out / "b.txt").read_text() == "10"
    assert run_pipeline(str(prof), out, overrides={"factor": 3}, only="01_b", nbs_dir=nbs, progress=False)["ran"] == ["01_b"]
    assert (out / "b.txt").read_text() == "15"
    capsys.readouterr()
    r = run_pipeline(None, out, nbs_dir=nbs, progress=False)  # no profile, no -p: the folder's own
    assert r["ran"] == [] and (out / "b.txt").read_text() == "15"
    assert "factor=3" in capsys.readouterr().err
    with pytest.raises(DataError, match="declared by no chapter"):  # reset forgets the folder's profile too: quick
        run_pipeline(None, out, nbs_dir=nbs, progress=False, reset=True)
    r = run_pipeline(str(prof), out, nbs_dir=nbs, progress=False, reset=True)
    assert r["ran"] == ["01_b"] and (out / "b.txt").read_text() == "10"


def test_failure_message_repeats_the_users_overrides(tiny_book, tmp_path):
    nbs, prof = tiny_book
    _nb(nbs / "02_c.ipynb", 'run_dir = "x"\nfactor = 1', "raise ValueError('boom')")
    with pytest.raises(PipelineError) as e:
        run_pipeline(str(prof), tmp_path / "run", overrides={"factor": 7}, nbs_dir=nbs, progress=False)
    assert "-p factor=7" in str(e.value) and "--only 02_c" in str(e.value) and str(prof) in str(e.value)


def test_metrics_record_provenance(tiny_book, tmp_path):
    nbs, prof = tiny_book
    run_pipeline(str(prof), tmp_path / "run", only="00_a", nbs_dir=nbs, progress=False)  # one chapter is enough
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"commit", "packages", "seed", "python"} <= set(m["provenance"]) and "numpy" in m["provenance"]["packages"]


def test_a_rerun_chapter_replaces_its_metrics_and_figures(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    body = ("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
            "from cytoclr.core import update_metrics, save_figure\n"
            "for m in methods:\n    update_metrics(run_dir, {'scores': {m: 1.0}})\n    save_figure(plt.figure(), run_dir, f'fig_{m}')\n")
    _nb(nbs / "00_a.ipynb", 'run_dir = "x"\nmethods = ["a", "b"]', body)
    _nb(nbs / "01_z.ipynb", 'run_dir = "x"', "from cytoclr.core import update_metrics\nupdate_metrics(run_dir, {'scores': {'z': 2.0}})")
    prof = tmp_path / "p.yml"
    prof.write_text("{}\n")
    out = tmp_path / "run"
    run_pipeline(str(prof), out, nbs_dir=nbs, progress=False)
    assert json.loads((out / "metrics.json").read_text())["scores"] == {"a": 1.0, "b": 1.0, "z": 2.0}
    run_pipeline(str(prof), out, overrides={"methods": ["a"]}, only="00_a", nbs_dir=nbs, progress=False)
    assert json.loads((out / "metrics.json").read_text())["scores"] == {"a": 1.0, "z": 2.0}
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["fig_a.png"]


def test_no_kernel_warning_reaches_the_terminal(tiny_book, tmp_path):
    nbs, prof = tiny_book
    cmd = [sys.executable, "-m", "cytoclr", "run", "--profile", str(prof), "--out", str(tmp_path / "r"), "--nbs", str(nbs)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "without encryption" not in r.stderr and "WARNING" not in r.stderr
    assert "00_a: done" in r.stderr and "01_b: done" in r.stderr


# --- prepare_page: an executed notebook made fit for the book (hand-made notebook dicts, no files) ---
import copy  # noqa: E402
import itertools  # noqa: E402

from cytoclr.pipeline import prepare_page  # noqa: E402

HOME, PROJ, RUN = "/home/ana", "/home/ana/cytoclr", "/home/ana/cytoclr/runs/quick"
REPS = {RUN: "runs/quick", PROJ: ".", HOME: "~"}
_ids = itertools.count()


def _code(src, outputs=(), tags=None, **metadata) -> dict:
    md = dict(metadata, **({"tags": list(tags)} if tags else {}))
    return {"cell_type": "code", "execution_count": 1, "id": f"c{next(_ids)}",
            "metadata": md, "outputs": list(outputs), "source": src}


def _md(src) -> dict:
    return {"cell_type": "markdown", "id": "m0", "metadata": {}, "source": src}


def _stream(text, name="stdout") -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def _page_nb(*cells, metadata=None) -> dict:
    return {"cells": list(cells), "metadata": metadata or {"kernelspec": {"name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def _src(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _tags(cell) -> list:
    return cell.get("metadata", {}).get("tags", [])


def test_prepare_page_hides_the_injected_parameters_input():
    injected = _code(["# Parameters\n", f'run_dir = "{RUN}"\n', "n_steps = 3\n"], tags=["injected-parameters"])
    page = prepare_page(_page_nb(_code('run_dir = "../runs/quick"', tags=["parameters"]), injected,
                            _code("print(n_steps)", [_stream("3\n")])), REPS)
    params, inj, body = page["cells"]
    assert "remove-input" in _tags(inj) and "remove-cell" not in _tags(inj)  # the page keeps the cell, not its code
    assert "remove-input" not in _tags(params) and "remove-input" not in _tags(body)
    assert _src(inj) == '# Parameters\nrun_dir = "runs/quick"\nn_steps = 3'  # and names no absolute path


def test_prepare_page_replaces_absolute_paths_everywhere_but_binary_data():
    png = "iVBORw0KGgo+/home/ana/cytoclr/runs/quick+AAAA"  # base64 may contain anything: left alone
    cell = _code(f'fig_path = "{RUN}/figures/a.png"\nsrc = "{PROJ}/nbs"\ncache = "{HOME}/.cache/x"\nother = "{PROJ}2/x"',
                 [_stream(f"wrote {RUN}/figures/a.png\n"),
                  {"output_type": "execute_result", "execution_count": 1, "metadata": {},
                   "data": {"text/plain": [f"PosixPath('{PROJ}/data/x.tif')"], "image/png": png,
                            "text/html": f"<a href='{RUN}/metrics.json'>metrics</a>"}},
                  {"output_type": "error", "ename": "DataError", "evalue": f"bad file {PROJ}/data/y.tif",
                   "traceback": [f"File {PROJ}/cytoclr/core.py:12"]}],
                 papermill={"input_path": f"{PROJ}/nbs/03_x.ipynb"})
    meta = {"kernelspec": {"name": "python3"},
            "papermill": {"input_path": f"{PROJ}/nbs/03_x.ipynb", "output_path": f"{RUN}/03_x.ipynb",
                          "parameters": {"run_dir": RUN}}}
    page = prepare_page(_page_nb(_md(f"Made in `{RUN}`."), cell, metadata=meta), REPS)
    md, c = page["cells"]
    assert _src(md) == "Made in `runs/quick`."
    assert _src(c) == ('fig_path = "runs/quick/figures/a.png"\nsrc = "./nbs"\ncache = "~/.cache/x"\n'
                       'other = "~/cytoclr2/x"')  # a longer folder name is not the project, but is under home
    stream, result, error = c["outputs"]
    assert "".join(stream["text"]) == "wrote runs/quick/figures/a.png\n"
    assert result["data"]["text/plain"] == ["PosixPath('./data/x.tif')"]
    assert result["data"]["text/html"] == "<a href='runs/quick/metrics.json'>metrics</a>"
    assert result["data"]["image/png"] == png
    assert error["evalue"] == "bad file ./data/y.tif" and error["traceback"] == ["File ./cytoclr/core.py:12"]
    assert c["metadata"]["papermill"]["input_path"] == "./nbs/03_x.ipynb"
    assert page["metadata"]["papermill"] == {"input_path": "./nbs/03_x.ipynb", "output_path": "runs/quick/03_x.ipynb",
                                             "parameters": {"run_dir": "runs/quick"}}
    no_png = {**result, "data": {k: v for k, v in result["data"].items() if k != "image/png"}}
    assert HOME not in json.dumps({**page, "cells": [md, {**c, "outputs": [stream, no_png, error]}]})


def test_prepare_page_strips_directives_and_drops_default_exp_cells():
    page = prepare_page(_page_nb(_md("# Title"), _code("#| default_exp core\n"), _code(["#| default_exp core\n", "#|  hide\n"]),
                            _code(["#| export\n", "def f(x):\n", "    return x\n"]),
                            _code("#| hide\nsecret = 1"), _code("#|eval: false\nx = 2\n#| echo: false\ny = 3")))
    assert [c["cell_type"] for c in page["cells"]] == ["markdown", "code", "code", "code"]
    exported, hidden, plain = page["cells"][1:]
    assert _src(exported) == "def f(x):\n    return x"
    assert not any(l.lstrip().startswith("#|") for c in page["cells"] for l in _src(c).splitlines())
    assert "remove-cell" in _tags(hidden) and _src(hidden) == "secret = 1"
    assert _src(plain) == "x = 2\ny = 3" and _tags(plain) == []
    assert all(isinstance(c["source"], list) for c in page["cells"][1:])


def test_prepare_page_removes_the_input_of_silent_import_cells():
    page = prepare_page(_page_nb(
        _code("import numpy as np\nfrom pathlib import Path  # comment\n\nimport matplotlib.pyplot as plt\n"),
        _code("import warnings", [_stream("a deprecation warning\n", "stderr")]),  # its output needs its context
        _code("import numpy as np\nx = np.zeros(3)"),
        _code("%matplotlib inline\nimport numpy as np"),  # not Python: left as it is
        _code("#| export\nimport numpy as np")))
    silent, noisy, mixed, magic, exported = page["cells"]
    assert "remove-input" in _tags(silent)
    assert _tags(noisy) == [] and _tags(mixed) == [] and _tags(magic) == [] and _tags(exported) == []


def test_prepare_page_folds_the_code_of_figure_cells_but_not_exported_code():
    page = prepare_page(_page_nb(
        _code("fig, ax = plt.subplots()\nax.plot([1, 2])"),
        _code("from cytoclr.pipeline import save_figure\nsave_figure(f, run_dir, 'loss')"),
        _code("pipeline.save_figure(f, run_dir, 'loss')"),
        _code("%time fig = plt.figure()"),  # a magic: Python cannot parse it, the regex decides
        _code('print("call plt.show() or fig.savefig")'),  # only inside a string: not a figure cell
        _code("#| export\ndef show(x):\n    fig = plt.figure()\n    return fig"),
        _code("#| exports\nfig = plt.figure()")))
    tags = [_tags(c) for c in page["cells"]]
    assert all("hide-input" in t for t in tags[:4]), tags
    assert tags[4:] == [[], [], []]


def test_prepare_page_keeps_only_the_final_state_of_progress_bars():
    bar = ["  0%|          | 0/3 [00:00<?, ?it/s]\r", " 33%|###3      | 1/3 [00:00<00:01,  2.0it/s]\r",
           "100%|##########| 3/3 [00:01<00:00,  2.9it/s]\r", "100%|##########| 3/3 [00:01<00:00,  2.9it/s]\n"]
    cleared = "  0%|          | 0/5 [00:00<?, ?it/s]\r 40%|####      | 2/5\r                    \r"  # leave=False
    page = prepare_page(_page_nb(
        _code("train()", [_stream(bar[0], "stderr"), _stream(bar[1], "stderr"), _stream(bar[2:], "stderr"),
                          _stream("epoch 1 loss 0.5\n"), _stream("epoch 2 loss 0.4\n")]),
        _code("step()", [_stream(cleared, "stderr"), _stream("done\n")]),
        _code("warn()", [_stream("UserWarning: careful\n", "stderr")])))
    train, step, warn = page["cells"]
    assert [(o["name"], "".join(o["text"])) for o in train["outputs"]] == [
        ("stderr", "100%|##########| 3/3 [00:01<00:00,  2.9it/s]\n"), ("stdout", "epoch 1 loss 0.5\nepoch 2 loss 0.4\n")]
    assert [(o["name"], "".join(o["text"])) for o in step["outputs"]] == [("stdout", "done\n")]  # a cleared bar goes
    assert "".join(warn["outputs"][0]["text"]) == "UserWarning: careful\n"  # stderr without \r stays as it was


def test_prepare_page_does_not_modify_its_input():
    nb = _page_nb(_md(f"in {RUN}"), _code("#| default_exp core"), _code("import numpy as np"),
             _code(["# Parameters\n", f'run_dir = "{RUN}"\n'], tags=["injected-parameters"]),
             _code("#| export\ndef f(): pass"), _code("fig = plt.figure()"),
             _code("train()", [_stream("  0%|\r", "stderr"), _stream("100%|\n", "stderr")]),
             metadata={"papermill": {"parameters": {"run_dir": RUN}}})
    before = copy.deepcopy(nb)
    page = prepare_page(nb, REPS)
    assert nb == before
    assert page is not nb and page["cells"] is not nb["cells"]
    page["cells"][0]["metadata"]["x"] = 1
    assert "x" not in nb["cells"][0]["metadata"]  # no cell is shared either
    assert prepare_page(nb) == prepare_page(nb, {})  # no replacements: the same page without path changes


def test_run_summary_reads_the_metric_keys():
    from cytoclr.core import MetricKeys as K
    from cytoclr.pipeline import add_run_summary, run_summary
    sc = {K.WITHIN_5MM: 0.25, K.MEDIAN_MM: 7.46, K.TOP5: 0.5, K.CI95: {K.WITHIN_5MM: [0.125, 0.375]}}
    m = {K.PROFILE: "smoke", K.SECONDS: {"08_mapping": 12.4, "09_anchoring": 30.0, "not a chapter": 5.0},
         K.PROVENANCE: {"commit": "0123456789abcdef", "dirty": True},
         K.TRAINING: {"nissl": {"geodesic": {K.FINAL_LOSS: 1.23456, K.IMAGES_PER_SECOND: 99.6, K.STEPS: 10}}},
         K.MAPPING: {"nissl": {"geodesic": {K.HELDOUT: {K.ACCURACY: 0.5, K.CI95: {K.ACCURACY: [0.25, 0.75]}},
                                            K.UNSEEN: {K.ACCURACY: 0.4}}}},
         K.ANCHORING: {K.PROTOCOL: {"frame_planes": 3}, "nissl": {"geodesic": {K.REGISTERED: sc,
                                                                             K.AFTER_ALIGNMENT: {K.WITHIN_5MM: 0.5}}}},
         K.ALIGNMENT: {"nissl": {"geodesic": {K.REGISTERED: {K.SECTIONS_PLACED: 3, K.SECTIONS: 4, K.POINT_ERROR_MM: 2.5,
                                                             K.PLANE_ANGLE_DEG: float("nan")}}}},
         K.MULTIMODAL: {"clip": {K.PLI_TO_NISSL: {K.TOP1: 0.1, K.TOP5: 0.3}, K.NISSL_TO_PLI: {K.TOP1: 0.2, K.TOP5: 0.4}}}}
    state = {"chapters": {"08_mapping": {"finished": "2026-01-01T10:00:00"}, "09_anchoring": {"finished": "2026-01-01T11:00:00"}}}
    lines = run_summary(m, state).splitlines()
    assert lines[0] == ("**This run**: profile `smoke`, finished 2026-01-01T11:00:00, 0.7 minutes of chapter time, "
                        "commit `0123456789` (with local changes).")
    assert "| chapter | 08_mapping | 09_anchoring |" in lines and "| seconds | 12 | 30 |" in lines
    assert "| nissl | geodesic | 1.235 | 100 | 10 |" in lines
    assert "| geodesic | 0.50 [0.25, 0.75] | 0.40 |" in lines
    assert "| geodesic | 0.25 [0.12, 0.38] | 7.5 | 0.50 | 0.50 |" in lines  # the protocol is not an encoder
    assert not any(l.startswith("| protocol") for l in lines)
    assert "| geodesic | 3/4 | 2.50 | – |" in lines and "| clip | 0.10 / 0.30 | 0.20 / 0.40 |" in lines
    assert run_summary({}).startswith("**This run**: profile `?`, finished unknown, 0.0 minutes")
    page = add_run_summary({"cells": [{"cell_type": "markdown", "source": ["## How to run\n"]}]}, m, state)
    assert "".join(page["cells"][0]["source"]).startswith("## This run's results")
