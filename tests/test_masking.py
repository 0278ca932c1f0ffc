"""The built-in ``n2v`` masking strategy: blind-spot statistics, replacement values, determinism."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from denoiseg_core.components import MaskingStrategy
from denoiseg_plugins.n2v_masking import N2VMasking, N2VParams


def _unique_patches(shape: tuple[int, ...]) -> torch.Tensor:
    """Patches whose values are their own flat index, so every value names its position."""
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n, dtype=torch.float64).reshape(shape)


@pytest.mark.parametrize(
    ("shape", "percentage"),
    [((16, 2, 64, 64), 1.5), ((8, 1, 48, 40), 5.0), ((4, 2, 16, 32, 32), 1.5), ((4, 1, 16, 16, 16), 10.0)],
)
def test_fraction_masked_matches_percentage(shape, percentage, generator):
    masked, mask = N2VMasking(percentage=percentage, radius=2)(torch.randn(shape), generator)
    assert mask.dtype == torch.bool and mask.shape == shape and masked.shape == shape
    fraction = mask.double().mean().item() * 100
    assert fraction == pytest.approx(percentage, rel=0.12)
    # Stratified: every patch and channel gets blind spots, spread over the whole patch.
    per_plane = mask.flatten(2).sum(-1).double()
    assert per_plane.min() > 0
    expected = mask[0, 0].numel() * percentage / 100
    assert per_plane.max() < 1.6 * expected + 2
    ndim = len(shape) - 2
    for axis in range(ndim):
        reduce_dims = [d for d in range(mask.ndim) if d != 2 + axis]
        hits_per_index = mask.sum(dim=reduce_dims)
        assert (hits_per_index > 0).double().mean() > 0.9  # blind spots reach (nearly) every row/column


@pytest.mark.parametrize(("shape", "radius"), [((6, 3, 40, 36), 2), ((3, 2, 12, 20, 16), 1), ((4, 1, 32, 32), 5)])
def test_replacements_come_from_the_neighbourhood(shape, radius, generator):
    patches = _unique_patches(shape)
    masked, mask = N2VMasking(percentage=8.0, radius=radius)(patches, generator)
    # Unmasked pixels are untouched.
    torch.testing.assert_close(masked[~mask], patches[~mask])
    ndim = len(shape) - 2
    target = torch.nonzero(mask)  # (K, 2 + ndim) positions of blind spots
    source_flat = masked[mask].long()
    source = torch.stack(torch.unravel_index(source_flat, shape), dim=1)
    # Same patch and channel, within `radius` on every spatial axis, inside the patch.
    assert torch.equal(source[:, :2], target[:, :2])
    assert (source[:, 2:] - target[:, 2:]).abs().max() <= radius
    # The centre pixel is allowed, and offsets use the whole neighbourhood.
    offsets = source[:, 2:] - target[:, 2:]
    assert (offsets == 0).all(dim=1).any()
    assert offsets.min() == -radius and offsets.max() == radius
    assert target.shape[0] > 0 and ndim == target.shape[1] - 2


def test_deterministic_given_seed():
    patches = torch.randn(4, 2, 32, 32)
    strategy = N2VMasking()
    a = strategy(patches, torch.Generator().manual_seed(7))
    b = strategy(patches, torch.Generator().manual_seed(7))
    c = strategy(patches, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_channels_masked_independently(generator):
    _, mask = N2VMasking(percentage=5.0)(torch.randn(2, 2, 64, 64), generator)
    assert not torch.equal(mask[:, 0], mask[:, 1])
    assert not torch.equal(mask[0], mask[1])


def test_input_not_modified_and_no_generator_works():
    patches = torch.randn(2, 1, 32, 32)
    before = patches.clone()
    masked, mask = N2VMasking()(patches)
    assert torch.equal(patches, before)
    assert mask.any()
    assert torch.equal(masked[~mask], patches[~mask])


def test_rejects_patches_without_spatial_axes():
    with pytest.raises(ValueError, match="spatial"):
        N2VMasking()(torch.randn(4, 16))


def test_spec_builds_a_masking_strategy(registry):
    spec = registry.spec("masking", "n2v")
    strategy = spec.build(N2VParams(percentage=3.0, radius=2))
    assert isinstance(strategy, MaskingStrategy)
    assert strategy.percentage == 3.0 and strategy.radius == 2


@pytest.mark.parametrize("bad", [{"percentage": 0}, {"percentage": 60}, {"radius": 0}, {"size": 3}])
def test_params_reject_invalid(bad):
    with pytest.raises(ValidationError):
        N2VParams(**bad)
