"""pipelines/augment.py: the augmentation recipe and the per-image parameters drawn from it."""
import numpy as np
import pytest

from pipelines.augment import Augment, draw_augment, graph_inputs


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


def test_what_the_graph_reads_is_one_inverse_matrix_with_the_flip_and_a_mask_per_image():
    d = draw_augment(Augment(), 2000, np.random.default_rng(1))
    g = graph_inputs(d)
    m, flip = g["matrix"].astype(np.float64), d["flip"].astype(bool)
    forward = np.concatenate([d["matrix"], np.tile([[[0, 0, 1]]], (2000, 1, 1))], 1).astype(np.float64)
    mirror = np.array([[-1.0, 0, 32], [0, 1, 0], [0, 0, 1]])
    for i in range(2000):  # destination -> source: undo the warp, then the mirror where drawn
        total = forward[i] @ (mirror if flip[i] else np.eye(3))  # forward: flip first, then warp
        np.testing.assert_allclose(m[i] @ np.vstack([total[:2], [0, 0, 1]]), np.eye(3)[:2], atol=1e-5)
    neither = ~flip & np.all(np.isclose(d["matrix"], [[1, 0, 0], [0, 1, 0]]), axis=(1, 2))
    assert neither.any() and (g["matrix"][neither] == np.float32([[1, 0, 0], [0, 1, 0]])).all()  # exactly identity
    holes = (g["mask"] == 0).sum(axis=(1, 2, 3))
    assert g["mask"].shape == (2000, 32, 32, 1) and g["mask"].dtype == np.uint8 and set(np.unique(g["mask"])) == {0, 1}
    assert (holes[d["shape"][:, 0] == 0] == 0).all() and holes.max() == 256  # none where not drawn, 16 x 16 at most
    centred = (d["anchor"] >= 8).all(1) & (d["anchor"] < 24).all(1) & (d["shape"][:, 0] > 0)
    assert (holes[centred] == 256).all() and (holes[(d["shape"][:, 0] > 0) & ~centred] < 256).any()  # clipped
    top, left = np.floor(d["anchor"][centred][0] - 8).astype(int)
    assert (g["mask"][np.flatnonzero(centred)[0], top:top + 16, left:left + 16] == 0).all()  # where DALI's erase cut


def test_the_draws_scale_with_the_image_size():
    g = graph_inputs(draw_augment(Augment(flip_p=1, ssr_p=0, cutout_p=1), 8, np.random.default_rng(0), size=1), size=1)
    assert g["mask"].shape == (8, 1, 1, 1)
    np.testing.assert_array_equal(g["matrix"], np.tile(np.float32([[-1, 0, 1], [0, 1, 0]]), (8, 1, 1)))  # x -> 1 - x
