"`data_manifest.yml`: parsing, types checked at every level, splits, the lazy `Manifest`, its counts."
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from cytoclr.core import DataError
from cytoclr.manifest import (DATA, MANIFEST_BRAINS, MANIFEST_SECTIONS, load_manifest,
                              manifest_counts, manifest_fingerprint, sections_of_split)
from cytoclr.manifest_check import check_manifest_cli, validate_manifest

from helpers import HAS_PHANTOM, NOT_MANIFESTS, ROOT, SERIES, WRONG_TYPES, _base, _good_manifest, _write, _wrong

# ---------------------------------------------------------------- manifests


def test_good_manifest_passes(tmp_path, ref, capsys):
    man = _good_manifest(tmp_path, ref)
    p = _write(tmp_path, man)
    assert check_manifest_cli(str(p)) == 0
    out = capsys.readouterr().out
    assert "OK (3 sections)" in out and "error" not in out and "warning" not in out
    m = load_manifest(p)
    assert [s.id for s in sections_of_split(m, "train")] == ["lab-1/a"]
    assert [s.id for s in m.split("test")] == ["lab-1/b"]
    assert [s.id for s in m.split("unseen_brain")] == ["lab-2/c"]
    b = m.section("lab-1/b")
    assert b.channels == 3 and b.read(slice(0, 4), slice(0, 4)).shape == (3, 4, 4)
    # without a mask in the manifest, the cortex mask comes from the reference through the transform
    c, a = m.section("lab-2/c"), pickle.loads(pickle.dumps(m.section("lab-1/a")))  # picklable for loader workers
    assert np.array_equal(c.cortex_mask(0), a.cortex_mask(0))

def test_pairing_defaults_and_override(tmp_path, ref):
    man = _good_manifest(tmp_path, ref)
    assert load_manifest(_write(tmp_path, man)).pairing == {"max_distance_mm": 0.5, "max_angle_deg": 5.0}
    man["pairing"] = {"max_distance_mm": 2}
    assert load_manifest(_write(tmp_path, man)).pairing == {"max_distance_mm": 2.0, "max_angle_deg": 5.0}

def test_default_manifest_loads():
    m = load_manifest(ROOT / "data_manifest.yml")
    assert len(m.brains) >= 3 and m.reference is not None
    train = {s.id for s in m.split("train")}
    for sp in ("validation", "test", "unseen_brain"):
        ids = set(m.split_ids(sp))
        assert ids and not ids & train
    unseen = set(m.splits["unseen_brains"])
    assert unseen and not any(m.entries[i].brain in unseen for i, e in enumerate(m.entries) if e.id in train)
    assert {s.modality for s in m.split("train")} == {"nissl", "pli"}
    assert all(s.modality == "pli" for s in m.split("train", modality="pli"))
    assert validate_manifest(ROOT / "data_manifest.yml", deep=False) == []

@pytest.mark.skipif(not HAS_PHANTOM, reason="cytoclr.phantom not written yet")
def test_default_manifest_phantom_sections():
    m = load_manifest(ROOT / "data_manifest.yml")
    s = m.split("test", modality="pli")[0]
    assert s.channels == 3 and s.modality == "pli" and s.spacing_um == 64.0
    w = s.read(slice(1000, 1064), slice(1000, 1064))
    assert w.shape == (3, 64, 64) and w.dtype == np.float32

def test_unknown_split_is_a_data_error():
    m = load_manifest(Path(__file__).resolve().parents[1] / "data_manifest.yml")
    with pytest.raises(DataError, match="unknown split 'tset'") as e:
        m.split_ids("tset")
    assert type(e.value) is DataError and e.value.field == "split"


# ---------------------------------------------------------------- malformed input: never a crash, always the field
def test_the_base_manifest_is_valid(tmp_path):
    assert [p for p in validate_manifest(_wrong(tmp_path, ("splits", "test"), []), deep=False) if p.level == "error"] == []


@pytest.mark.parametrize("where,value,field", WRONG_TYPES, ids=[f"{f or 'file'}={v!r}"[:50] for _, v, f in WRONG_TYPES])
def test_wrong_types_at_any_level_are_findings_naming_the_field(tmp_path, where, value, field):
    p = _wrong(tmp_path, where, value)
    errors = [q for q in validate_manifest(p, deep=False) if q.level == "error"]
    assert any(q.field == field for q in errors), [str(q) for q in errors]
    with pytest.raises(DataError) as e:
        load_manifest(p)
    assert type(e.value) is DataError and e.value.file == p and (field in str(e.value) if field else True)


@pytest.mark.parametrize("kind", list(NOT_MANIFESTS))
def test_files_that_are_not_manifests_give_one_line(tmp_path, kind):
    p = tmp_path / "m.yml"
    NOT_MANIFESTS[kind](p)
    with pytest.raises(DataError) as e:
        load_manifest(p)
    msg = str(e.value)
    assert type(e.value) is DataError and e.value.file == p and str(p) in msg and "\n" not in msg, msg
    assert [q.field for q in validate_manifest(p)] == [""]


@pytest.mark.parametrize("path", ["/etc/passwd", "/bin/ls", "/"])
def test_system_files_are_not_manifests(path):
    if not Path(path).exists():
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(DataError) as e:
        load_manifest(path)
    assert "\n" not in str(e.value) and path in str(e.value)


def test_manifest_counts_values(tmp_path):
    "Chapter 2's `data.manifest_sections` and `data.manifest_brains`: counted by hand on a small manifest."
    man = _base(tmp_path)
    man["phantom_series"] = [{**SERIES, "modalities": ["nissl", "pli"], "position_mm": [-20.0, 0.0, 20.0]}]
    p = tmp_path / "data_manifest.yml"
    p.write_text(yaml.safe_dump(man, sort_keys=False))
    m = load_manifest(p)
    assert manifest_counts(m) == {MANIFEST_SECTIONS: 1 + 2 * 3, MANIFEST_BRAINS: 2}
    assert DATA == "data" and (MANIFEST_SECTIONS, MANIFEST_BRAINS) == ("manifest_sections", "manifest_brains")


def test_fingerprint_of_a_manifest_with_odd_blocks(tmp_path):
    p = tmp_path / "m.yml"
    p.write_text("sections: 5\nreference: {hemispheres: 3}\n")
    assert len(manifest_fingerprint(p)) == 64


@pytest.mark.parametrize("kind", ["passwd", "binary", "list", "folder"])
def test_a_command_that_loads_a_bad_manifest_exits_2_with_one_line(tmp_path, kind, capsys):
    "Elsewhere than `data check` (here `cytoclr train`), a file that is not a manifest is unusable input: exit code 2."
    from cytoclr.cli import main
    p = tmp_path / "m.yml"
    NOT_MANIFESTS[kind](p)
    assert main(["train", "-p", f"manifest={p}", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}: ") and err.count("\n") == 1 and "Traceback" not in err, err
