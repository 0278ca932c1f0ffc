"""Behaviour specific to the n2v2 / struct_n2v masking, the n2v2_unet / res_unet backbones and
the two_class head (the generic contract is in test_conformance.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from skimage.draw import disk

from denoiseg_plugins.n2v2_masking import N2V2Masking, N2V2Params
from denoiseg_plugins.struct_n2v_masking import StructN2VMasking, StructN2VParams
from denoiseg_plugins.class_heads import ForegroundThreshold
from denoiseg_plugins.two_class_head import TwoClassHead, TwoClassParams
from denoiseg_plugins.unet_arch import MaxBlurPool, UNet

# --------------------------------------------------------------------------- n2v2


@pytest.mark.parametrize("shape", [(2, 2, 12, 10), (1, 1, 6, 8, 7)])
def test_n2v2_replaces_blind_spots_by_the_median_without_centre(shape, generator):
    radius = 2
    patches = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    masked, loss_mask = N2V2Masking(percentage=20, radius=radius)(patches, generator)
    points = loss_mask.nonzero().tolist()
    assert len(points) > 5
    array = patches.numpy()
    ndim = len(shape) - 2
    for n, c, *centre in points:
        neighbours = []
        for offset in itertools.product(range(-radius, radius + 1), repeat=ndim):
            position = [p + o for p, o in zip(centre, offset)]
            if any(offset) and all(0 <= p < s for p, s in zip(position, shape[2:])):
                neighbours.append(array[(n, c, *position)])
        lower_median = np.sort(neighbours)[(len(neighbours) - 1) // 2]
        assert masked[(n, c, *centre)].item() == pytest.approx(lower_median)
        assert masked[(n, c, *centre)].item() != array[(n, c, *centre)]
    assert torch.equal(masked[~loss_mask], patches[~loss_mask])


def test_n2v2_never_shows_the_centre_value():
    # Each plane is constant 0 except one spike: a blind spot on the spike must not see it.
    patches = torch.zeros(64, 1, 9, 9)
    patches[:, :, 4, 4] = 100.0
    masked, loss_mask = N2V2Masking(percentage=30, radius=1)(patches, torch.Generator().manual_seed(0))
    hit = loss_mask[:, 0, 4, 4]
    assert hit.any()
    assert torch.all(masked[hit, 0, 4, 4] == 0)


def test_n2v2_chunked_gathering_gives_the_same_result(monkeypatch):
    import denoiseg_plugins.n2v2_masking as n2v2

    patches = torch.randn(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = N2V2Masking(radius=2)(patches, torch.Generator().manual_seed(5))
    monkeypatch.setattr(n2v2, "_MAX_GATHERED", 200)  # 124 neighbours: one blind spot per chunk
    chunked = N2V2Masking(radius=2)(patches, torch.Generator().manual_seed(5))
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_n2v2_params_are_validated():
    assert N2V2Params().radius == 5
    with pytest.raises(ValidationError):
        N2V2Params(radius=0)


# --------------------------------------------------------------------------- struct_n2v


@pytest.mark.parametrize("axis", ["x", "y"])
def test_struct_n2v_hides_a_line_along_the_axis(axis):
    span = 3
    patches = torch.randn(4, 2, 32, 40, generator=torch.Generator().manual_seed(1))
    masked, loss_mask = StructN2VMasking(axis=axis, span=span, percentage=1.0)(
        patches, torch.Generator().manual_seed(2)
    )
    changed = (masked != patches) & ~loss_mask
    assert changed.any()
    # Every changed pixel lies on the line of some blind spot, along `axis`, within `span`.
    along = 3 if axis == "x" else 2
    kernel = [1, 1]
    kernel[along - 2] = 2 * span + 1
    line_reach = torch.nn.functional.max_pool2d(
        loss_mask.float().flatten(0, 1)[:, None], kernel, stride=1, padding=[k // 2 for k in kernel]
    ).view_as(loss_mask)
    assert torch.all(line_reach[changed] > 0)
    # About 2 * span line pixels per blind spot (fewer at edges and where lines cross).
    assert 0.6 * 2 * span * loss_mask.sum() <= changed.sum() <= 2 * span * loss_mask.sum()
    # Line values are uniform noise within each plane's range.
    low = patches.amin(dim=(2, 3), keepdim=True).expand_as(patches)
    high = patches.amax(dim=(2, 3), keepdim=True).expand_as(patches)
    assert torch.all((masked[changed] >= low[changed]) & (masked[changed] <= high[changed]))


def test_struct_n2v_centre_replacement_avoids_the_hidden_line():
    span, radius = 2, 3
    patches = torch.arange(2 * 20 * 24, dtype=torch.float32).view(2, 1, 20, 24)  # value -> position
    masked, loss_mask = StructN2VMasking(axis="x", span=span, percentage=8, radius=radius)(
        patches, torch.Generator().manual_seed(0)
    )
    points = loss_mask.nonzero().tolist()
    assert any(x < radius or x >= 24 - radius for _, _, _, x in points)  # edges are exercised
    for n, _, y, x in points:
        sy, sx = divmod(int(masked[n, 0, y, x].item()) - n * 20 * 24, 24)
        assert max(abs(sy - y), abs(sx - x)) <= radius
        assert not (sy == y and abs(sx - x) <= span), "replacement from the centre or its hidden line"


def test_struct_n2v_params_are_validated():
    assert StructN2VParams().axis == "x"
    for bad in ({"axis": "z"}, {"span": 0}, {"percentage": 0}):
        with pytest.raises(ValidationError):
            StructN2VParams(**bad)


# --------------------------------------------------------------------------- backbones


def test_max_blur_pool_halves_sizes_keeps_constants_and_has_no_state():
    pool = MaxBlurPool(2, channels=3)
    assert pool(torch.full((1, 3, 16, 12), 2.5)).shape == (1, 3, 8, 6)
    assert torch.allclose(pool(torch.full((1, 3, 16, 12), 2.5)), torch.tensor(2.5))  # edges not darkened
    assert pool.state_dict() == {}
    assert MaxBlurPool(3, channels=2)(torch.randn(1, 2, 8, 8, 4)).shape == (1, 2, 4, 4, 2)
    # Anti-aliasing: a one-pixel shift of a fine stripe pattern changes the blur-pooled output
    # much less than the plain max-pooled one.
    stripes = (torch.arange(32) % 3 == 0).float().expand(1, 1, 32, 32).contiguous()
    shifted = torch.roll(stripes, 1, dims=3)
    blur_pool, max_pool = MaxBlurPool(2, channels=1), torch.nn.functional.max_pool2d
    blur_change = (blur_pool(stripes) - blur_pool(shifted)).abs().mean()
    plain_change = (max_pool(stripes, 2) - max_pool(shifted, 2)).abs().mean()
    assert blur_change < 0.7 * plain_change


def test_n2v2_unet_has_no_top_level_skip_connection():
    n2v2 = UNet(2, 1, 4, depth=2, first_filters=8, pooling="max_blur", top_skip=False)
    unet = UNet(2, 1, 4, depth=2, first_filters=8)
    assert n2v2.decoders[-1][0].in_channels == 16  # up-sampled features only
    assert unet.decoders[-1][0].in_channels == 16 + 8  # plus the skip
    assert n2v2.decoders[0][0].in_channels == unet.decoders[0][0].in_channels  # deeper skips stay


def test_res_unet_blocks_are_residual():
    net = UNet(2, 1, 3, depth=1, first_filters=4, block="residual")
    block = net.decoders[0]
    assert isinstance(block.shortcut, torch.nn.Conv2d)  # 8 + 4 -> 4 channels
    same = net.bottleneck.__class__(2, 4, 4, 3, True)
    assert isinstance(same.shortcut, torch.nn.Identity)
    for module in same.body.modules():  # a zero body leaves relu(x)
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.zeros_(module.weight)
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(same.eval()(x), torch.relu(x))


# --------------------------------------------------------------------------- two_class


def _touching_discs(shape=(40, 60)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int32)
    labels[disk((20, 18), 9, shape=shape)] = 1
    labels[disk((20, 33), 9, shape=shape)] = 2  # overlaps disc 1: a narrow neck
    return labels


def _perfect(head: TwoClassHead, labels: np.ndarray) -> np.ndarray:
    targets = head.targets(labels)
    return np.stack([1.0 - targets, targets]).astype(np.float32)


def test_two_class_targets_are_foreground():
    labels = _touching_discs()
    targets = TwoClassHead().targets(labels)
    assert targets.dtype == np.int64 and set(np.unique(targets)) == {0, 1}
    assert np.array_equal(targets == 1, labels > 0)


def test_two_class_splits_touching_discs():
    head = TwoClassHead()
    labels = _touching_discs()
    instances = head.instances(_perfect(head, labels), ForegroundThreshold())
    assert instances.max() == 2
    for label in (1, 2):
        ids, counts = np.unique(instances[labels == label], return_counts=True)
        assert counts.max() / counts.sum() > 0.9
    merged = TwoClassHead(TwoClassParams(split_touching=False)).instances(_perfect(head, labels), ForegroundThreshold())
    assert merged.max() == 1


def test_two_class_keeps_elongated_and_tiny_objects_whole():
    labels = np.zeros((30, 60), dtype=np.int32)
    labels[5:11, 3:57] = 1  # a long bar: a flat distance ridge, one seed
    labels[20, 20] = 2  # too thin for any seed
    labels[18:28, 40:50] = 3
    head = TwoClassHead()
    instances = head.instances(_perfect(head, labels), ForegroundThreshold())
    assert instances.max() == 3
    for label in (1, 2, 3):
        assert len(np.unique(instances[labels == label])) == 1
    small_removed = TwoClassHead(TwoClassParams(min_size=2)).instances(_perfect(head, labels), ForegroundThreshold())
    assert small_removed.max() == 2 and small_removed[20, 20] == 0


def test_two_class_splits_touching_spheres_in_3d():
    z, y, x = np.mgrid[:20, :24, :40]
    labels = np.zeros((20, 24, 40), dtype=np.int32)
    labels[(z - 10) ** 2 + (y - 12) ** 2 + (x - 12) ** 2 <= 49] = 1
    labels[(z - 10) ** 2 + (y - 12) ** 2 + (x - 25) ** 2 <= 49] = 2
    head = TwoClassHead()
    assert head.instances(_perfect(head, labels), ForegroundThreshold()).max() == 2


def test_two_class_rejects_wrong_probability_shape():
    with pytest.raises(ValueError, match=r"\(2, \*spatial\)"):
        TwoClassHead().instances(np.zeros((3, 8, 8)), ForegroundThreshold())
