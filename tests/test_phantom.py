"Phantom brains: subjects, area types and laminar profiles, what the chapter measures (depth profiles, classification), bad input."
import numpy as np
import pytest

from cytoclr.core import DataError
from cytoclr.phantom import (AREA_TYPES, PhantomBrain, accuracy_difference_se, area_type_index, area_type_of,
                             depth_profile, displacement_summary, gallery_centres, laminar_profile, patch_at,
                             patch_centres, profile_classification, profile_dataset, spacing_check)
from helpers import cortex_centre


@pytest.fixture(scope="module")
def brain(ref):
    return PhantomBrain(1, ref=ref)


def test_same_seed_same_bytes_different_seed_different_brain(ref, rng):
    a, b, c = PhantomBrain(5, ref=ref), PhantomBrain(5, ref=ref), PhantomBrain(6, ref=ref)
    for mod in ("nissl", "pli"):
        sa, sb, sc = (x.section(3, spacing_um=64, modality=mod) for x in (a, b, c))
        r, cc = cortex_centre(sa, rng)
        w = (slice(r - 40, r + 40), slice(cc - 40, cc + 40))
        assert np.array_equal(sa.read(*w), sb.read(*w))
        assert not np.array_equal(sa.read(*w), sc.read(*w))
    assert a.stain == b.stain and a.stain != c.stain
    x = ref.mid["L"][::100]
    assert np.array_equal(a.deform(x), b.deform(x))
    assert np.abs(a.deform(x) - c.deform(x)).mean() > 1.0  # brains differ by millimetres


def test_deformation_rms_is_the_parameter(ref):
    x = np.concatenate([ref.mid[h][::20] for h in ref.hemis])
    for mm in (1.0, 3.0):
        d = PhantomBrain(2, ref=ref, deform_mm=mm).deform(x)
        rms = np.sqrt((d ** 2).sum(1).mean())
        assert 0.5 * mm < rms < 1.6 * mm
    assert np.abs(PhantomBrain(2, ref=ref, deform_mm=0.0).deform(x)).max() == 0


def _type_patches(brain, planes, per_type, rng, size=64, spacing=32.0):
    "Nissl and PLI patches with their ground truth, centred on mid-depth cortex of each area type."
    types = area_type_index(brain)
    out = []
    for idx in planes:
        low = brain.section(idx, spacing_um=256, tilt_deg=(0, 0))
        gt = low.ground_truth(slice(None), slice(None))
        t = np.where(gt["inside"] & (np.abs(np.nan_to_num(gt["depth"], nan=9) - 0.5) < 0.2), types[gt["area"]], -1)
        secs = {m: brain.section(idx, spacing_um=spacing, tilt_deg=(0, 0), modality=m) for m in ("nissl", "pli")}
        for k in range(len(AREA_TYPES)):
            r, c = np.nonzero(t == k)
            for j in rng.choice(len(r), min(per_type, len(r)), replace=False):
                rc = np.rint(secs["nissl"].from_reference(gt["xyz"][r[j], c[j]][None])[0]).astype(int) - size // 2
                if (rc < 0).any() or (rc + size > secs["nissl"].shape).any():
                    continue
                w = (slice(rc[0], rc[0] + size), slice(rc[1], rc[1] + size))
                out.append((k, secs["nissl"].read(*w)[0], secs["pli"].read(*w), secs["nissl"].ground_truth(*w)))
    return out


def test_depth_profiles_separate_the_area_types(brain, rng):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    patches = _type_patches(brain, [-150, -20, 40], 12, rng)
    y = np.array([k for k, *_ in patches])
    X = np.array([depth_profile(n, gt["depth"], 10) for k, n, p, gt in patches])
    X = np.where(np.isnan(X), np.nanmean(X, 0), X)
    assert len(np.unique(y)) == len(AREA_TYPES)
    acc = cross_val_score(LogisticRegression(C=10.0, max_iter=2000), X, y, cv=4).mean()
    chance = np.bincount(y).max() / len(y)
    assert acc > chance + 0.25, (acc, chance)


def test_profile_classification_scores_separable_noise_and_bad_input(rng):
    y = np.repeat(np.arange(3), 20)
    signal = np.eye(3)[y] @ rng.normal(size=(3, 10)) * 5  # three well-separated class profiles
    X = signal + rng.normal(size=(60, 10))
    X[::7, 3] = np.nan  # empty depth bins are imputed, not fatal
    r = profile_classification(X, y)
    assert r["accuracy"] > 0.95 and r["chance"] == pytest.approx(1 / 3) and r["n"] == 60 and r["folds"] == 4
    noise = profile_classification(rng.normal(size=(60, 10)), y)
    assert noise["accuracy"] < 0.6  # labels carry no information: near the 1/3 chance level
    with pytest.raises(DataError, match="2 classes"):
        profile_classification(X[:3], [0, 1, 1])
    with pytest.raises(DataError, match="one label each"):
        profile_classification(X, y[:10])


def test_area_types_from_names():
    assert area_type_of("L_V1_ROI") == "koniocortex" and area_type_of("R_3b_ROI") == "koniocortex"
    assert area_type_of("L_4_ROI") == "agranular" and area_type_of("L_EC_ROI") == "limbic"
    assert area_type_of("L_46_ROI") == "granular"
    p = laminar_profile("koniocortex")
    assert np.argmax(p["density"]) == 3  # layer IV
    with pytest.raises(DataError, match="area_type"):
        laminar_profile("neocortex")


def test_bad_parameters_name_the_parameter(brain, ref):
    with pytest.raises(DataError, match="spacing_um"):
        brain.section(0, spacing_um=0)
    with pytest.raises(DataError, match="spacing_um"):
        brain.section(0, spacing_um=-2.0)
    with pytest.raises(DataError, match="modality"):
        brain.section(0, modality="mri")
    with pytest.raises(DataError, match="axis"):
        brain.section(0, axis="oblique")
    with pytest.raises(DataError, match="y_mm"):
        brain.section(0, y_mm=500.0)
    sec = brain.section(0, spacing_um=200)
    with pytest.raises(DataError, match="rows"):
        sec.read(slice(-5, 10), slice(0, 10))
    with pytest.raises(DataError, match="cols"):
        sec.read(slice(0, 10), slice(sec.shape[1] - 5, sec.shape[1] + 5))
    with pytest.raises(DataError, match="rows"):
        sec.read(slice(10, 10), slice(0, 10))
    with pytest.raises(DataError, match="level"):
        sec.cortex_mask(-1)
    with pytest.raises(DataError, match="deform_mm"):
        PhantomBrain(1, ref=ref, deform_mm=-1)
    with pytest.raises(DataError, match="geometry_mm"):
        PhantomBrain(1, ref=ref, geometry_mm=0)
    with pytest.raises(DataError, match="colour"):
        PhantomBrain(1, ref=ref, colour=3)
    with pytest.raises(DataError, match="seed"):
        PhantomBrain(-1, ref=ref)


# -- what chapter 1 measures: each number from a function, checked on a small case ---------------------------------
def test_depth_profile_by_hand():
    v = np.array([1.0, 2.0, 3.0, 4.0, 9.0])
    d = np.array([0.05, 0.07, 0.95, np.nan, 1.0])  # NaN depth: outside cortex; depth 1 falls in the last bin
    assert np.array_equal(depth_profile(v, d, 2), [1.5, 6.0])
    assert np.isnan(depth_profile(v[:2], d[:2], 4)[1:]).all()


def test_accuracy_difference_se_by_hand():
    se = accuracy_difference_se({"accuracy": 0.5, "n": 100}, {"accuracy": 0.8, "n": 50})
    assert se == pytest.approx(np.sqrt(0.5 * 0.5 / 100 + 0.8 * 0.2 / 50), rel=1e-12)
    assert accuracy_difference_se({"accuracy": 1.0, "n": 10}, {"accuracy": 0.0, "n": 3}) == 0.0


def test_displacement_summary(ref):
    x = ref.mid["L"][::400]
    b = PhantomBrain(2, ref=ref)
    d = np.sqrt((b.deform(x) ** 2).sum(1))
    s = displacement_summary(b, x)
    assert s == {"median_mm": pytest.approx(np.median(d), rel=1e-12), "max_mm": pytest.approx(d.max(), rel=1e-12)}
    assert displacement_summary(PhantomBrain(2, ref=ref, deform_mm=0.0), x) == {"median_mm": 0.0, "max_mm": 0.0}


def test_patch_centres_lie_at_mid_depth_in_their_area_type(brain):
    types = area_type_index(brain)
    got = patch_centres(brain, -20, 3, np.random.default_rng(0))
    again = patch_centres(brain, -20, 3, np.random.default_rng(0))
    assert len(got) >= 3 and all(np.array_equal(got[k], again[k]) for k in got)
    low = brain.section(-20, spacing_um=256.0, tilt_deg=(0, 0))
    for k, pts in got.items():
        assert 1 <= len(pts) <= 3
        t = low.truth_at(low.from_reference(pts))
        assert t["inside"].all() and (types[t["area"]] == k).all()
        assert (np.abs(t["depth"] - 0.5) < 0.25 + 1e-6).all()
    centres = gallery_centres(brain, [-20, 40], 3, np.random.default_rng(0))
    assert set(centres) == set(range(len(AREA_TYPES)))
    for k in got:  # plane by plane with one generator: the first plane's draws are patch_centres' own
        first = centres[k][:len(got[k])]
        assert all(idx == -20 for idx, _ in first) and np.array_equal(np.array([p for _, p in first]), got[k])


def test_patch_at_is_the_centred_window(brain):
    sec = brain.section(0, spacing_um=64.0, tilt_deg=(0, 0))
    xyz = sec.to_reference(np.array([[100.0, 150.0]]))[0]
    img, gt = patch_at(sec, xyz, 16)
    assert np.array_equal(img, sec.read(slice(92, 108), slice(142, 158)))
    assert np.array_equal(gt["area"], sec.ground_truth(slice(92, 108), slice(142, 158))["area"])
    assert patch_at(sec, sec.to_reference(np.array([[3.0, 150.0]]))[0], 16) is None  # leaves the section


def _slow_profile(values, depth, n_bins=10):
    "depth_profile by a loop over pixels (the reference)."
    s, n = np.zeros(n_bins), np.zeros(n_bins)
    for v, d in zip(np.ravel(values), np.ravel(depth)):
        if np.isfinite(d) and np.isfinite(v):
            k = min(max(int(d * n_bins), 0), n_bins - 1)
            s[k] += v
            n[k] += 1
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


class _SectionsOnce:
    """`brain` whose `section` cuts each plane once and hands out that object again for the same arguments (a section
    is a pure function of them). `profile_dataset` asks for the same few planes once per patch; here they cost one
    geometry evaluation each."""

    def __init__(self, brain):
        self._brain, self._cut = brain, {}

    def __getattr__(self, name):
        return getattr(self._brain, name)

    def section(self, *args, **kw):
        key = (args, tuple(sorted(kw.items())))
        if key not in self._cut:
            self._cut[key] = self._brain.section(*args, **kw)
        return self._cut[key]


def test_profile_dataset_and_spacing_check_against_a_slow_reference(brain):
    brain = _SectionsOnce(brain)
    centres = gallery_centres(brain, [-20, 40], 3, np.random.default_rng(1))
    X, y = profile_dataset(brain, centres, 64.0, 32)
    want_X, want_y = {"nissl": [], "pli": []}, []
    for k, lst in centres.items():
        for idx, p in lst:
            secs = [brain.section(idx, spacing_um=64.0, tilt_deg=(0, 0), modality=m) for m in ("nissl", "pli")]
            r, c = np.rint(secs[0].from_reference(p[None])[0]).astype(int) - 16
            if r < 0 or c < 0 or r + 32 > secs[0].shape[0] or c + 32 > secs[0].shape[1]:
                continue
            w = (slice(r, r + 32), slice(c, c + 32))
            depth = secs[0].ground_truth(*w)["depth"]
            want_X["nissl"].append(_slow_profile(secs[0].read(*w)[0], depth))
            want_X["pli"].append(_slow_profile(secs[1].read(*w)[1], depth))
            want_y.append(k)
    assert np.array_equal(y, want_y) and len(y) >= 6
    for m in ("nissl", "pli"):
        assert np.allclose(X[m], want_X[m], rtol=1e-12, atol=0, equal_nan=True)
    rows = spacing_check(brain, centres, (64.0, 128.0), 2.048)
    assert [(r["spacing_um"], r["patch_px"], r["modality"]) for r in rows] == [
        (64.0, 32, "nissl"), (64.0, 32, "pli"), (128.0, 16, "nissl"), (128.0, 16, "pli")]
    keep = np.isin(y, [k for k in set(y.tolist()) if (y == k).sum() >= 2])
    for r, m in zip(rows[:2], ("nissl", "pli")):  # the classifier's numbers on the same profiles
        want = profile_classification(np.array(want_X[m])[keep], np.array(want_y)[keep])
        assert {k: r[k] for k in want} == want


def test_phantom_code_names_every_module_of_the_generator():
    import inspect

    from cytoclr.phantom import PHANTOM_CODE, PhantomSection
    mods = {PhantomBrain.__module__} | {k.__module__ for k in inspect.getmro(PhantomSection) if k is not object}
    assert mods == set(PHANTOM_CODE)
