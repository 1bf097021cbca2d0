"`data_manifest.yml`: parsing, types checked at every level, splits, the lazy `Manifest`, its counts."
import importlib.util
import os
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import yaml
import zarr
from PIL import Image

from cytoclr.core import DataError, path_fingerprint
from cytoclr.manifest import (DATA, MANIFEST_BRAINS, MANIFEST_SECTIONS, Manifest, _Checker, _parse, load_manifest,
                              manifest_counts, manifest_fingerprint, sections_of_split)
from cytoclr.manifest_check import check_manifest_cli, validate_manifest
from cytoclr.sections import to_reference

from test_sections import HAS_PHANTOM, ROOT, coronal_affine

# ---------------------------------------------------------------- manifests
def _good_manifest(tmp_path, ref):
    "Three file sections (OME-Zarr, tiled TIFF, PNG + mask) on a coronal plane through the reference, and a manifest."
    s_mm, H, W = 2.0, 64, 80
    A = coronal_affine(s_mm, x0=-80.0, y=-18.0, z0=78.0)
    rr, cc = np.mgrid[0:H, 0:W]
    mask = ref.locate(to_reference(A, np.stack([rr.ravel(), cc.ravel()], 1))).inside.reshape(H, W)
    assert mask.mean() > 0.05
    img = np.where(mask, 0.3, 0.9).astype(np.float32)
    d = tmp_path / "data"
    d.mkdir()
    g = zarr.open_group(str(d / "a.ome.zarr"), mode="w")
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}],
                                                         "datasets": [{"path": "0"}]}]}
    g.create_array("0", shape=(1, H, W), chunks=(1, 32, 32), dtype="float32")[:] = img[None]
    tifffile.imwrite(d / "b.tif", np.stack([img, img, img * 100], 0).astype(np.float32), tile=(32, 32),
                     photometric="minisblack", planarconfig="separate")
    Image.fromarray((img * 255).astype(np.uint8)).save(d / "c.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(d / "c_mask.png")
    aff = A.tolist()
    man = {
        "reference": {"name": "hcp-s1200"},
        "brains": [{"id": "lab-1"}, {"id": "lab-2", "description": "the held-out brain"}],
        "sections": [
            {"id": "lab-1/a", "brain": "lab-1", "path": "data/a.ome.zarr", "sha256": path_fingerprint(d / "a.ome.zarr"),
             "modality": "nissl", "spacing_um": 2000.0, "transform": {"affine": aff}, "index": 1},
            {"id": "lab-1/b", "brain": "lab-1", "path": "data/b.tif", "sha256": path_fingerprint(d / "b.tif"),
             "modality": "pli", "spacing_um": 2000.0, "transform": {"affine": aff}},
            {"id": "lab-2/c", "brain": "lab-2", "path": "data/c.png", "sha256": path_fingerprint(d / "c.png"),
             "modality": "nissl", "spacing_um": 2000.0, "transform": {"affine": aff},
             "mask": {"path": "data/c_mask.png", "sha256": path_fingerprint(d / "c_mask.png")}},
        ],
        "splits": {"train": ["lab-1/a"], "test": {"brains": "lab-1", "modality": "pli"}, "unseen_brains": ["lab-2"]},
    }
    return man


def _write(tmp_path, man, name="data_manifest.yml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(man, sort_keys=False))
    return p


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
def _base(tmp_path):
    "A small valid manifest: one file section (PNG, polygon mask) of a file brain, and a phantom brain."
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path / "a.png")
    return {"brains": [{"id": "p", "phantom": {"seed": 0}}, {"id": "f"}],
            "sections": [{"id": "f/a", "brain": "f", "path": "a.png", "sha256": path_fingerprint(tmp_path / "a.png"),
                          "modality": "nissl", "spacing_um": 2000.0, "transform": {"affine": coronal_affine(2.0).tolist()},
                          "mask": {"polygon": [[0, 0], [0, 15], [15, 15]]}}],
            "splits": {"train": ["f/a"]}}


SERIES = {"brains": ["p"], "modalities": ["nissl"], "spacing_um": 4000.0, "position_mm": [-20.0]}
# (where in the manifest, the value put there, the field path the finding must name)
WRONG_TYPES = [
    ((), ["reference", "brains"], ""), ((), "just text", ""), ((), 42, ""), ((), None, ""),
    (("brains",), 3, "brains"), (("brains",), {"id": "x"}, "brains"), (("brains", 1), "f", "brains[1]"),
    (("brains", 1, "id"), ["f"], "brains[1].id"), (("brains", 0, "phantom"), 3, "brains[0].phantom"),
    (("brains", 0, "phantom"), {"seed": "x"}, "brains[0].phantom.seed"),
    (("reference",), 5, "reference"), (("reference",), {"hemispheres": [1]}, "reference.hemispheres"),
    (("reference",), {"hemispheres": {"L": 3}}, "reference.hemispheres.L"),
    (("reference",), {"hemispheres": {"L": {"white": [1], "pial": {"a": 1}}}}, "reference.hemispheres.L.white"),
    (("reference",), {"name": ["hcp"]}, "reference.name"),
    (("pairing",), [1], "pairing"), (("pairing",), {"max_distance_mm": [1]}, "pairing.max_distance_mm"),
    (("pairing",), {"max_angle_deg": "5"}, "pairing.max_angle_deg"),
    (("sections",), {"a": 1}, "sections"), (("sections",), "a.png", "sections"), (("sections", 0), 5, "sections[0]"),
    (("sections", 0, "modality"), ["nissl"], "sections[0].modality"),
    (("sections", 0, "modality"), {"nissl": 1}, "sections[0].modality"),
    (("sections", 0, "spacing_um"), {"a": 1}, "sections[0].spacing_um"),
    (("sections", 0, "spacing_um"), [2000], "sections[0].spacing_um"),
    (("sections", 0, "spacing_um"), "2000", "sections[0].spacing_um"),
    (("sections", 0, "spacing_um"), float("inf"), "sections[0].spacing_um"),
    (("sections", 0, "index"), 1.5, "sections[0].index"), (("sections", 0, "index"), [1], "sections[0].index"),
    (("sections", 0, "path"), ["a.png"], "sections[0].path"), (("sections", 0, "path"), {"a": 1}, "sections[0].path"),
    (("sections", 0, "path"), "a" * 5000, "sections[0].path"),
    (("sections", 0, "sha256"), 5, "sections[0].sha256"), (("sections", 0, "sha256"), ["0" * 64], "sections[0].sha256"),
    (("sections", 0, "transform"), [1], "sections[0].transform"),
    (("sections", 0, "transform"), {"affine": "x"}, "sections[0].transform.affine"),
    (("sections", 0, "transform"), {"affine": {"a": 1}}, "sections[0].transform.affine"),
    (("sections", 0, "transform"), {"affine": [[1, 2], [3]]}, "sections[0].transform.affine"),
    (("sections", 0, "mask"), [1], "sections[0].mask"), (("sections", 0, "mask"), {"path": {"a": 1}}, "sections[0].mask.path"),
    (("sections", 0, "mask"), {"polygon": "x"}, "sections[0].mask.polygon"),
    (("sections", 0, "mask"), {"path": "a.png", "sha256": 7}, "sections[0].mask.sha256"),
    (("sections", 0, "channel_names"), {"a": 1}, "sections[0].channel_names"),
    (("sections", 0, "series"), [1], "sections[0].series"), (("sections", 0, "id"), {"a": 1}, "sections[0].id"),
    (("sections", 0, "brain"), ["f"], "sections[0].brain"),
    (("sections",), [{"brain": "p", "modality": "nissl", "spacing_um": 64, "phantom": 3}], "sections[0].phantom"),
    (("phantom_series",), 3, "phantom_series"), (("phantom_series",), [3], "phantom_series[0]"),
    (("phantom_series",), [{**SERIES, "modalities": [["nissl"]]}], "phantom_series[0].modalities[0]"),
    (("phantom_series",), [{**SERIES, "modalities": {"nissl": 1}}], "phantom_series[0].modalities[0]"),
    (("phantom_series",), [{**SERIES, "brains": {"p": 1}}], "phantom_series[0].brains[0]"),
    (("phantom_series",), [{**SERIES, "spacing_um": [64]}], "phantom_series[0].spacing_um"),
    (("phantom_series",), [{**SERIES, "position_mm": "x"}], "phantom_series[0].position_mm"),
    (("phantom_series",), [{**SERIES, "position_mm": [[1]]}], "phantom_series[0].position_mm[0]"),
    (("phantom_series",), [{**SERIES, "position_mm": {"start": 0, "stop": "x", "count": 2}}], "phantom_series[0].position_mm.stop"),
    (("phantom_series",), [{**SERIES, "position_mm": {"start": 0, "stop": 1, "count": [2]}}], "phantom_series[0].position_mm.count"),
    (("phantom_series",), [{**SERIES, "name": ["a"]}], "phantom_series[0].name"),
    (("splits",), [1], "splits"), (("splits", "train"), 5, "splits.train"), (("splits", "train"), [[1]], "splits.train[0]"),
    (("splits", "train"), {"index": [[1]]}, "splits.train.index"), (("splits", "train"), {"index": {"a": 1}}, "splits.train.index"),
    (("splits", "train"), {"modality": [["nissl"]]}, "splits.train.modality"),
    (("splits", "train"), {"brains": [{"f": 1}]}, "splits.train.brains"),
    (("splits", "train"), {"series": [{"a": 1}]}, "splits.train.series"),
    (("splits", "unseen_brains"), {"a": 1}, "splits.unseen_brains[0]"),
]


def _wrong(tmp_path, where, value):
    "The base manifest with `value` put at `where`, written to a file."
    man = _base(tmp_path)
    if not where:
        man = value
    else:
        node = man
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = value
    p = tmp_path / "data_manifest.yml"
    p.write_text(yaml.safe_dump(man, sort_keys=False))
    return p


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


NOT_MANIFESTS = {
    "passwd": lambda p: p.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"),
    "binary": lambda p: p.write_bytes(bytes(range(256)) * 16),
    "nul_bytes": lambda p: p.write_bytes(b"brains: \x00\x00\n"),
    "list": lambda p: p.write_text("- reference\n- brains\n"),
    "scalar": lambda p: p.write_text("42\n"),
    "empty": lambda p: p.write_text(""),
    "folder": lambda p: p.mkdir(),
    "broken": lambda p: p.write_text("brains: [\n"),
    "two_documents": lambda p: p.write_text("brains: []\n---\nbrains: []\n"),
    "python_tag": lambda p: p.write_text("brains: !!python/object:os.system {}\n"),
    "missing": lambda p: None,
}


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
