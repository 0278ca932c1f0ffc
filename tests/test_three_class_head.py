"""The built-in ``three_class`` head: targets, weighted loss, activation, instances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import ndimage

from denoiseg_plugins.class_heads import THRESHOLDS, ForegroundThreshold
from denoiseg_plugins.three_class_head import ThreeClassHead, ThreeClassParams


def _head(**params) -> ThreeClassHead:
    return ThreeClassHead(ThreeClassParams(**params))


def _probabilities(targets: np.ndarray, confidence: float = 0.9) -> np.ndarray:
    """Hand-made probabilities (3, *spatial): `confidence` on the target class."""
    other = (1 - confidence) / 2
    probs = np.full((3, *targets.shape), other, dtype=np.float32)
    np.put_along_axis(probs, targets[None], confidence, axis=0)
    return probs


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal instance label images up to renumbering."""
    if a.shape != b.shape or ((a > 0) != (b > 0)).any():
        return False
    pairs = {(int(x), int(y)) for x, y in zip(a[a > 0], b[b > 0])}
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})


# --- targets ---------------------------------------------------------------------------


def test_outer_targets_of_touching_squares(touching_squares):
    targets = _head().targets(touching_squares)
    expected = np.zeros((12, 12), dtype=np.int64)
    expected[2:6, 2:5] = 1  # square 1 without its column touching square 2
    expected[2:6, 7:10] = 1  # square 2 likewise
    expected[2:6, 5:7] = 2  # the two touching columns separate the objects
    expected[1, 2:10] = 2  # background ring, 4-connected to the objects (no corners)
    expected[6, 2:10] = 2
    expected[2:6, 1] = 2
    expected[2:6, 10] = 2
    assert targets.dtype == np.int64
    np.testing.assert_array_equal(targets, expected)


def test_inner_targets_of_touching_squares(touching_squares):
    targets = _head(border_mode="inner").targets(touching_squares)
    expected = np.where(touching_squares > 0, 2, 0)
    expected[3:5, 3:5] = 1
    expected[3:5, 7:9] = 1
    np.testing.assert_array_equal(targets, expected)


def test_targets_3d_cube():
    labels = np.zeros((7, 7, 7), dtype=np.uint16)
    labels[2:5, 2:5, 2:5] = 4
    targets = _head().targets(labels)
    cube = labels > 0
    shell = ndimage.binary_dilation(cube) & ~cube  # 6-connected outer shell
    np.testing.assert_array_equal(targets == 1, cube)
    np.testing.assert_array_equal(targets == 2, shell)
    assert (targets == 2).sum() == 6 * 9


def test_targets_without_objects_are_background():
    assert not _head().targets(np.zeros((8, 8), dtype=np.int32)).any()


# --- loss ------------------------------------------------------------------------------


def test_loss_counts_labelled_patches_only_with_class_weights():
    head = _head()
    logits = torch.zeros(2, 3, 4, 4, requires_grad=True)  # uniform probabilities: CE = log 3
    targets = torch.zeros(2, 4, 4, dtype=torch.int64)
    targets[0, :2] = 2  # labelled patch: half border (weight 5), half background (weight 1)
    targets[1] = 1
    labelled = torch.tensor([True, False])
    loss = head.loss(logits, targets, labelled)
    assert loss.item() == pytest.approx(3 * math.log(3), rel=1e-6)  # mean of 5 and 1 times log 3
    # The unlabelled patch has no influence, whatever its logits or targets.
    other = logits.detach().clone()
    other[1] = torch.randn(3, 4, 4) * 10
    assert head.loss(other, targets, labelled).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0


def test_border_weight_is_configurable():
    logits = torch.zeros(1, 3, 2, 2)
    targets = torch.full((1, 2, 2), 2, dtype=torch.int64)
    labelled = torch.tensor([True])
    default = _head().loss(logits, targets, labelled).item()
    unweighted = _head(class_weights=(1.0, 1.0, 1.0)).loss(logits, targets, labelled).item()
    assert default == pytest.approx(5 * unweighted, rel=1e-6)
    assert unweighted == pytest.approx(math.log(3), rel=1e-6)


def test_confident_correct_logits_give_small_loss_3d():
    targets = torch.randint(0, 3, (2, 4, 4, 4))
    logits = torch.nn.functional.one_hot(targets, 3).permute(0, 4, 1, 2, 3).float() * 20
    assert _head().loss(logits, targets, torch.tensor([True, True])).item() < 1e-6


def test_loss_without_labelled_patches_is_differentiable_zero():
    logits = torch.randn(3, 3, 8, 8, requires_grad=True)
    targets = torch.full((3, 8, 8), -1, dtype=torch.int64)  # garbage: must not be looked at
    loss = _head().loss(logits, targets, torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_activation_is_softmax_over_channels():
    activation = _head().activation()
    probs = torch.jit.script(activation)(torch.randn(2, 3, 5, 5))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 5, 5))


# --- instances -------------------------------------------------------------------------


def test_instances_separate_touching_objects_and_restore_their_size(touching_squares):
    head = _head()
    probs = _probabilities(head.targets(touching_squares))
    instances = head.instances(probs, ForegroundThreshold())
    assert instances.dtype == np.int32
    assert _same_partition(instances, touching_squares)  # the outer ring is not added


def test_instances_without_growing_keep_the_border_out(touching_squares):
    head = _head(grow_into_border=False)
    instances = head.instances(_probabilities(head.targets(touching_squares)), ForegroundThreshold())
    assert instances.max() == 2
    assert (instances > 0).sum() == 2 * 4 * 3


@pytest.mark.parametrize("mode", ["inner", "thick"])
def test_instances_grow_back_inner_borders(mode, touching_squares):
    head = _head(border_mode=mode)
    instances = head.instances(_probabilities(head.targets(touching_squares)), ForegroundThreshold())
    assert _same_partition(instances, touching_squares)


def test_instances_3d_touching_cubes():
    labels = np.zeros((8, 8, 12), dtype=np.int32)
    labels[2:6, 2:6, 2:6] = 1
    labels[2:6, 2:6, 6:10] = 2
    head = _head()
    instances = head.instances(_probabilities(head.targets(labels)), ForegroundThreshold())
    assert _same_partition(instances, labels)


def test_threshold_and_min_size():
    probs = np.zeros((3, 10, 10), dtype=np.float32)
    probs[0] = 1.0
    probs[:, 1:5, 1:5] = np.array([0.2, 0.8, 0.0])[:, None, None]  # 16 px, confident
    probs[:, 7, 7] = np.array([0.4, 0.6, 0.0])  # 1 px, less confident
    head = _head(min_size=2)
    instances = head.instances(probs, ForegroundThreshold())
    assert instances.max() == 1 and (instances == 1).sum() == 16
    assert _head().instances(probs, ForegroundThreshold()).max() == 2
    assert _head().instances(probs, ForegroundThreshold(threshold=0.7)).max() == 1


def test_diagonal_neighbours_are_separate_instances():
    probs = np.zeros((3, 4, 4), dtype=np.float32)
    probs[0] = 1
    probs[:, 0, 0] = probs[:, 1, 1] = np.array([0, 1, 0])
    assert _head().instances(probs, ForegroundThreshold()).max() == 2


def test_instances_reject_wrong_channel_count():
    with pytest.raises(ValueError, match="probabilities"):
        _head().instances(np.zeros((2, 4, 4)), ForegroundThreshold())


def test_tuning_grid_settings_and_protocol_attributes(touching_squares):
    head = _head()
    assert THRESHOLDS[0] == pytest.approx(0.1) and THRESHOLDS[-1] == pytest.approx(0.9)
    assert list(THRESHOLDS) == sorted(THRESHOLDS) and 0.5 in THRESHOLDS
    assert head.num_classes == 3 and [c.name for c in head.outputs().channels] == ["background", "foreground", "border"]
    assert head.settings() == ForegroundThreshold(threshold=0.5)
    probs = _probabilities(head.targets(touching_squares))
    full, quick = head.tune([probs], [touching_squares]), head.tune([probs], [touching_squares], quick=True)
    assert [s.threshold for s, _ in full.table] == list(THRESHOLDS)
    assert [s.threshold for s, _ in quick.table] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert full.score == 1.0 and full.settings == full.table[0][0]  # the first of equally good ones


def test_macro_carries_the_settings():
    macro = _head(grow_into_border=False, border_mode="inner", min_size=7).imagej_macro(ForegroundThreshold(threshold=0.35), 2)
    for line in ("threshold = 0.35;", "denoisedChannels = 2;", "growIntoBorder = 0;", "outerBorder = 0;", "minSize = 7;"):
        assert f"\n{line}\n" in macro


def test_spec_and_params(registry):
    spec = registry.spec("head", "three_class")
    head = spec.build(ThreeClassParams(class_weights=(1, 2, 3)))
    assert head.params.class_weights == (1.0, 2.0, 3.0)
    for bad in ({"border_mode": "outside"}, {"class_weights": (1, 1)}, {"min_size": -1}, {"weights": 1}):
        with pytest.raises(ValidationError):
            ThreeClassParams(**bad)
