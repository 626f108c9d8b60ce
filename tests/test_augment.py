"""pipelines/augment.py: the augmentation recipe and the per-image parameters drawn from it."""
import numpy as np
import pytest

from pipelines.augment import Augment, draw_augment


def test_drawn_parameters_follow_the_documented_distributions():
    aug, n = Augment(), 20_000
    d = draw_augment(aug, n, np.random.default_rng(0))
    assert d["flip"].dtype == np.int32 and set(np.unique(d["flip"])) == {0, 1}
    assert abs(d["flip"].mean() - aug.flip_p) < 0.015  # 4 standard deviations at n=20,000
    m = d["matrix"].astype(np.float64)
    warped = ~np.all(np.isclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-7), axis=(1, 2))
    assert abs(warped.mean() - aug.ssr_p) < 0.015
    a, b = m[warped, 0, 0], m[warped, 1, 0]  # s cos(angle), s sin(angle)
    scale, angle = np.hypot(a, b), np.degrees(np.arctan2(b, a))
    assert scale.min() >= 1 - aug.scale - 1e-6 and scale.max() <= 1 + aug.scale + 1e-6 and np.ptp(scale) > 0.19
    assert np.abs(angle).max() <= aug.rotate + 1e-4 and np.abs(angle).max() > 14.9
    np.testing.assert_allclose(m[warped, 0, 1], -b, atol=1e-6)  # a rotation and a scale, no shear
    np.testing.assert_allclose(m[warped, 1, 1], a, atol=1e-6)
    centre = np.array([16.0, 16.0])  # where the centre goes is the shift: at most 2 px each way
    moved = m[warped, :, :2] @ centre + m[warped, :, 2] - centre
    assert np.abs(moved).max() <= aug.shift * 32 + 1e-4 and np.abs(moved).max() > 1.95
    holes = d["shape"][:, 0] > 0
    assert abs(holes.mean() - aug.cutout_p) < 0.015 and set(np.unique(d["shape"])) == {0.0, 16.0}
    assert (d["shape"][:, 0] == d["shape"][:, 1]).all()
    assert d["anchor"].min() >= 0 and d["anchor"].max() < 32 and abs(d["anchor"].mean() - 16) < 0.2


def test_draws_depend_on_the_generator_only():
    one = draw_augment(Augment(), 64, np.random.default_rng([1, 2, 3]))
    two = draw_augment(Augment(), 64, np.random.default_rng([1, 2, 3]))
    for key in one:
        np.testing.assert_array_equal(one[key], two[key])


@pytest.mark.parametrize("field", ["flip_p", "ssr_p", "cutout_p"])
def test_probability_outside_unit_interval(field):
    with pytest.raises(ValueError, match=field):
        Augment(**{field: 1.5})
