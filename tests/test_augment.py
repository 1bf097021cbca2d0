"Tests of cytoclr.augment: modality-aware augmentation (the PLI direction turns with the image), one patch or a batch."
import numpy as np
import pytest
import torch

from cytoclr.augment import Augment
from cytoclr.core import DataError
from cytoclr.sampling import extract_patch, sample_locations


def stripes(size, phi_deg, period=8.0):
    "A (size, size) patch of stripes running along direction phi (counter-clockwise from +col, row 0 at top)."
    d = np.arange(size) - (size - 1) / 2
    r, c = np.meshgrid(d, d, indexing="ij")
    x, y = c, -r  # screen coordinates, y up
    a = np.deg2rad(phi_deg)
    across = -np.sin(a) * x + np.cos(a) * y  # coordinate across the stripes
    return (0.5 + 0.5 * np.cos(2 * np.pi * across / period)).astype(np.float32)


def orientation_deg(img):
    "Dominant stripe direction (deg, [0, 180), counter-clockwise from +col) from the structure tensor."
    gy, gx = np.gradient(img.astype(np.float64))  # gy along rows (down), gx along cols
    gy = -gy  # y up
    jxx, jyy, jxy = (gx * gx).sum(), (gy * gy).sum(), (gx * gy).sum()
    grad_dir = 0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy))  # dominant gradient direction
    return (grad_dir + 90) % 180  # stripes run perpendicular to the gradient


def angle_diff(a, b):
    d = np.abs((np.asarray(a) - np.asarray(b)) % 180)
    return np.minimum(d, 180 - d)


# --- sampling -------------------------------------------------------------------------------------

# --- one patch --------------------------------------------------------------------------------

def test_stripe_orientation_helper_is_right():
    for phi in (0, 30, 90, 135):
        assert angle_diff(orientation_deg(stripes(64, phi)), phi) < 2


@pytest.mark.parametrize("theta", [0.0, 30.0, 90.0, 137.0, 250.0])
@pytest.mark.parametrize("flip", [False, True])
def test_pli_direction_follows_rotation_and_flip(theta, flip):
    "Rotate/flip a stripe patch whose direction channel matches its stripes: the channel must match the new stripes."
    phi0 = 20.0
    big = 91
    t = stripes(big, phi0)
    pli = np.stack([t, 0.5 * np.ones_like(t), np.full_like(t, phi0)])  # (3, h, w)
    aug = Augment("pli", blur=0, intensity=0, contrast=0)
    out = aug.apply(pli, 63, theta=theta, flip=flip)
    seen = orientation_deg(out[0])  # where the stripes point after the transform
    expected = (-(phi0 + theta) if flip else phi0 + theta) % 180
    assert angle_diff(seen, expected) < 2.5
    assert angle_diff(np.median(out[2]), seen) < 2.5  # the direction channel agrees with the image
    assert angle_diff(out[2], expected).max() < 1.0  # everywhere, no wrap-around artefacts


def test_direction_interpolation_wraps():
    "A field of 179 deg and 1 deg is nearly uniform (horizontal): a plain image rotation would average to 90."
    h = 31
    d = np.where(np.arange(h)[None, :] % 2 == 0, 179.0, 1.0) * np.ones((h, 1))
    pli = np.stack([np.ones((h, h)), np.ones((h, h)), d]).astype(np.float32)
    out = Augment("pli").apply(pli, 21, theta=45.0, sigma=1.0)
    assert angle_diff(out[2], 45.0).max() < 1.5


def test_rotation_sign_consistent_between_exact_and_interpolated_paths(rng):
    x = rng.random((1, 41, 41)).astype(np.float32)
    aug = Augment("nissl")
    exact = aug.apply(x, 29, theta=90.0)
    near = aug.apply(x, 29, theta=89.999)
    np.testing.assert_allclose(exact, near, atol=2e-3)
    np.testing.assert_allclose(exact[0], np.rot90(x[0])[6:35, 6:35], atol=1e-6)  # counter-clockwise as displayed


def test_intensity_and_blur():
    x = np.zeros((1, 33, 33), np.float32)
    x[0, 16, 16] = 1
    out = Augment("nissl").apply(x, 33, gain=1.0, offset=0.2, sigma=1.0)
    assert out.max() < 0.5 + 0.2 and abs(out.sum() - (1 + 0.2 * 33 * 33)) < 0.02  # blurred, mass kept, offset
    y = np.linspace(0, 1, 33 * 33, dtype=np.float32).reshape(1, 33, 33)
    c = Augment("nissl").apply(y, 33, gain=1.5)
    np.testing.assert_allclose(c.std(), 1.5 * y.std(), rtol=1e-4)
    np.testing.assert_allclose(c.mean(), y.mean(), atol=1e-5)


def test_augment_bad_input():
    with pytest.raises(DataError):
        Augment("ct")
    with pytest.raises(DataError, match="3 channels"):
        Augment("pli").apply(np.zeros((1, 9, 9), np.float32), 9)


@pytest.fixture(scope="module")
def phantom_pli(ref):
    from cytoclr.phantom import PhantomBrain
    b = PhantomBrain(0, ref=ref)
    kw = dict(y_mm=-18.0, tilt_deg=(0.0, 0.0), spacing_um=64.0, modality="pli")
    s0 = b.section(0, **kw)
    return b, kw, s0, sample_locations([s0], 40, seed=1, ref=ref, level=2)


@pytest.mark.parametrize("rotation_deg, flip", [(90.0, False), (0.0, True), (90.0, True)])
def test_pli_augment_matches_phantom_rendered_turned(phantom_pli, rotation_deg, flip):
    """Independent check of the direction convention: a phantom section rendered rotated/mirrored on the slide
    (its direction channel computed from the 3D fibres) must equal our augmentation of the unrotated rendering."""
    b, kw, s0, smp = phantom_pli
    s1 = b.section(0, rotation_deg=rotation_deg, flip=flip, **kw)
    rc0 = smp.rc[np.argsort(-smp.depth)[:6]]  # deep in the cortex: strong radial fibres
    rc1 = s1.from_reference(s0.to_reference(np.rint(rc0)))
    aug = Augment("pli")
    best = []
    for a, b_ in zip(rc0, rc1):
        p0, p1 = extract_patch(s0, a, 31), extract_patch(s1, b_, 31)
        ret = p1[1] > np.percentile(p1[1], 50)  # where the direction is well defined
        errs = {}
        for theta in (0.0, 90.0, 180.0, 270.0):
            for fl in (False, True):
                q = aug.apply(p0, 31, theta=theta, flip=fl)
                img_err = np.abs(q[0] - p1[0]).mean()
                errs[(theta, fl)] = (img_err, np.median(angle_diff(q[2][ret], p1[2][ret])))
        key = min(errs, key=lambda k: errs[k][0])  # the transform that matches the transmittance image ...
        best.append(errs[key][1])  # ... must also match the direction channel
    assert np.median(best) < 12.0, best


@pytest.mark.parametrize("modality", ["nissl", "pli"])
def test_batched_augmentation_equals_the_reference(modality, rng):
    "Augment.apply_batch (one pass for a batch) gives what Augment.apply gives view by view."
    aug = Augment(modality, blur=1.2)
    size = 24
    h = aug.crop_px(size)
    c = 1 if modality == "nissl" else 3
    crops = rng.random((9, c, h, h)).astype(np.float32)
    if modality == "pli":
        crops[:, 2] *= 180.0
    params = [aug.draw(rng) for _ in range(9)]
    params[0].update(theta=90.0, flip=True)  # the exact rot90 path of the reference
    params[1].update(sigma=0.0)
    ref = np.stack([aug.apply(crops[i], size, **params[i]) for i in range(9)])
    got = aug.apply_batch(torch.from_numpy(crops), size, **{k: [p[k] for p in params] for k in params[0]}).numpy()
    if modality == "pli":  # directions are angles mod 180: compare on the circle
        dd = np.abs(got[:, 2] - ref[:, 2])
        assert np.minimum(dd, 180 - dd).max() < 1e-2
        got, ref = got[:, :2], ref[:, :2]
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_bad_parameters_name_the_field():
    for name in ("intensity", "contrast", "blur"):
        with pytest.raises(DataError) as e:
            Augment("nissl", **{name: float("nan")})
        assert e.value.field == name
    assert Augment("nissl", blur=0).blur == 0.0
