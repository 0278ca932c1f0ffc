"""Tiled inference equals whole-image inference; predict_image/segment glue."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from denoiseg_core.checkpoint import (
    LoadedModel,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
    write_checkpoint_state,
)
from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.data import Normalization
from denoiseg_core.errors import ConfigError, DataError
from denoiseg_core.evaluation import segment
from denoiseg_core.model import build_model
from denoiseg_core.prediction import (
    Prediction,
    default_tile,
    effective_tile,
    predict_array,
    predict_image,
    tile_plan,
)
from denoiseg_plugins.unet_arch import UNet, unet_halo

DEPTH = 2
DIVISOR = 2**DEPTH
HALO = unet_halo(DEPTH, 3)


def tiny_unet(ndim: int, in_channels: int, out_channels: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = UNet(ndim, in_channels, out_channels, depth=DEPTH, first_filters=4)
    # non-trivial batch-norm statistics, so eval mode differs from the identity
    for module in net.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return net.eval()


def random_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------- tile_plan


@pytest.mark.parametrize(
    "shape, tile, halo, divisor",
    [
        ((101, 87), (48, 48), 26, 4),
        ((64, 64), (64, 64), 10, 16),
        ((5, 7), (256, 256), 26, 4),  # image smaller than a tile
        ((300, 17), (33, 9), 5, 8),  # tile not a multiple of the divisor
        ((19, 70, 61), (16, 32, 40), 6, 4),
        ((1, 1), (1, 1), 0, 1),
    ],
)
def test_tile_plan_covers_image_exactly_once(shape, tile, halo, divisor):
    plan = tile_plan(shape, tile, halo, divisor)
    size = effective_tile(shape, tile, halo, divisor)
    padded = [-(-s // divisor) * divisor for s in shape]
    coverage = np.zeros(shape, dtype=np.int32)
    for placement in plan:
        inp, out, crop = placement
        coverage[out] += 1
        for dim, (i, o, c) in enumerate(zip(inp, out, crop)):
            assert i.stop - i.start == size[dim]
            assert size[dim] % divisor == 0
            assert i.start % divisor == 0  # pooling grid as for the whole image
            assert 0 <= i.start and i.stop <= padded[dim]
            assert c.stop - c.start == o.stop - o.start
            assert o.start == i.start + c.start
            # kept pixels are at least `halo` from any tile edge that is not an image edge
            if i.start > 0:
                assert c.start >= halo
            if i.stop < padded[dim]:
                assert size[dim] - c.stop >= halo
    np.testing.assert_array_equal(coverage, 1)


def test_tile_plan_whole_image_is_one_tile():
    plan = tile_plan((30, 45), None, 26, 4)
    assert len(plan) == 1
    assert plan[0].input == (slice(0, 32), slice(0, 48))
    assert plan[0].output == (slice(0, 30), slice(0, 45))


def test_tile_plan_rejects_wrong_dimensionality():
    with pytest.raises(ConfigError, match="dimensions"):
        tile_plan((30, 45), (16, 16, 16), 2, 4)


def test_default_tile_is_a_multiple_of_the_divisor_and_leaves_room_for_the_halo():
    assert default_tile(2, 16) == (256, 256)
    assert default_tile(3, 16) == (32, 128, 128)
    assert default_tile(2, 16, halo=122) == (512, 512)
    assert all(t % 32 == 0 for t in default_tile(3, 32, halo=7))


# ---------------------------------------------------------------- predict_array


@pytest.mark.parametrize(
    "shape, tile, batch_size",
    [
        ((1, 101, 87), (48, 48), 1),
        ((1, 101, 87), (48, 48), 3),
        ((1, 101, 87), (70, 30), 4),  # tiles that do not divide the image
        ((2, 64, 96), (60, 64), 2),  # two channels
        ((1, 9, 13), (64, 64), 2),  # image smaller than a tile
        ((1, 101, 87), (1, 1), 8),  # tiny tile request is enlarged to fit the halo
    ],
)
def test_tiled_equals_whole_image_2d(shape, tile, batch_size):
    net = tiny_unet(2, shape[0], 5)
    image = random_image(shape)
    whole = predict_array(net, image, divisor=DIVISOR, halo=HALO)
    tiled = predict_array(net, image, divisor=DIVISOR, halo=HALO, tile=tile, batch_size=batch_size)
    assert whole.shape == tiled.shape == (5, *shape[1:])
    assert whole.dtype == tiled.dtype == np.float32
    assert np.abs(tiled - whole).max() < 1e-4


@pytest.mark.parametrize("tile, batch_size", [((16, 40, 40), 2), ((12, 36, 64), 1)])
def test_tiled_equals_whole_image_3d(tile, batch_size):
    net = tiny_unet(3, 1, 3)
    image = random_image((1, 23, 70, 61))
    whole = predict_array(net, image, divisor=DIVISOR, halo=HALO)
    tiled = predict_array(net, image, divisor=DIVISOR, halo=HALO, tile=tile, batch_size=batch_size)
    assert len(tile_plan(image.shape[1:], tile, HALO, DIVISOR)) > 1
    assert np.abs(tiled - whole).max() < 1e-4


def test_too_small_halo_shows_seams():
    """The equality tests above can fail: with a halo below the receptive field, tiles differ."""
    net = tiny_unet(2, 1, 2)
    image = random_image((1, 101, 87))
    whole = predict_array(net, image, divisor=DIVISOR, halo=HALO)
    tiled = predict_array(net, image, divisor=DIVISOR, halo=2, tile=(48, 48))
    assert np.abs(tiled - whole).max() > 1e-4


def test_whole_image_matches_plain_forward_on_divisible_size():
    net = tiny_unet(2, 1, 3)
    image = random_image((1, 32, 48))
    with torch.no_grad():
        expected = net(torch.from_numpy(image[None]))[0].numpy()
    np.testing.assert_allclose(predict_array(net, image, divisor=DIVISOR, halo=HALO), expected, atol=1e-5)


def test_odd_size_is_padded_then_cropped():
    net = tiny_unet(2, 1, 2)
    image = random_image((1, 31, 45))
    out = predict_array(net, image, divisor=DIVISOR, halo=HALO, out_channels=2)
    assert out.shape == (2, 31, 45)
    # the interior far from the padded edge equals running on a reflect-padded copy
    padded = np.pad(image, [(0, 0), (0, 1), (0, 3)], mode="reflect")
    with torch.no_grad():
        expected = net(torch.from_numpy(padded[None]))[0].numpy()[:, :31, :45]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_bf16_precision_is_close_to_fp32():
    net = tiny_unet(2, 1, 2)
    image = random_image((1, 40, 40))
    fp32 = predict_array(net, image, divisor=DIVISOR, halo=HALO)
    bf16 = predict_array(net, image, divisor=DIVISOR, halo=HALO, precision="bf16")
    assert bf16.dtype == np.float32
    assert 0 < np.abs(bf16 - fp32).max() < 0.1 * (np.abs(fp32).max() + 1)


def test_wrong_out_channels_is_an_error():
    net = tiny_unet(2, 1, 2)
    with pytest.raises(ValueError, match="channels"):
        predict_array(net, random_image((1, 16, 16)), divisor=DIVISOR, halo=HALO, out_channels=3)


# ---------------------------------------------------------------- predict_image / segment


def tiny_loaded_model(tmp_path, ndim: int = 2, mean: float = 100.0, std: float = 20.0) -> LoadedModel:
    config = DenoiSegConfig.model_validate(
        {"model": {"backbone": {"name": "unet", "params": {"depth": DEPTH, "first_filters": 8}}}}
    )
    torch.manual_seed(1)
    built = build_model(config, ndim=ndim, in_channels=1)
    path = tmp_path / "model.pt"
    normalization = Normalization(mean=[mean], std=[std])
    save_checkpoint(path, config=config, built=built, normalization=normalization, instance_settings=built.head.settings(threshold=0.4))
    return load_checkpoint(path)


def test_predict_image_denormalises_and_outputs_probabilities(tmp_path):
    model = tiny_loaded_model(tmp_path)
    image = (100 + 20 * random_image((1, 37, 52))).astype(np.float32)
    prediction = predict_image(model, image)
    assert isinstance(prediction, Prediction)
    assert prediction.denoised.shape == (1, 37, 52) and prediction.denoised.dtype == np.float32
    k = model.head.num_classes
    assert prediction.probabilities.shape == (k, 37, 52)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=0), 1.0, atol=1e-5)
    # denoised = network output (normalised units) * std + mean
    net = model.inference_net()
    raw = predict_array(net, (image - 100) / 20, divisor=model.built.size_divisor, halo=model.built.halo)
    np.testing.assert_allclose(prediction.denoised, raw[:1] * 20 + 100, rtol=1e-5, atol=1e-3)
    tiled = predict_image(model, image, tile=(48, 48), batch_size=2)
    assert np.abs(tiled.denoised - prediction.denoised).max() < 1e-4 * 20
    assert np.abs(tiled.probabilities - prediction.probabilities).max() < 1e-4


def test_predict_image_restores_training_mode(tmp_path):
    model = tiny_loaded_model(tmp_path)
    model.built.net.train()
    predict_image(model, random_image((1, 16, 16)))
    assert model.built.net.training


def test_predict_image_rejects_mismatched_image(tmp_path):
    model = tiny_loaded_model(tmp_path)
    with pytest.raises(DataError, match="does not match"):
        predict_image(model, random_image((1, 8, 16, 16)))


def test_segment_uses_tuned_threshold_unless_overridden(tmp_path):
    model = tiny_loaded_model(tmp_path)
    shape = (40, 40)
    probabilities = np.zeros((3, *shape), dtype=np.float32)
    probabilities[0] = 1.0
    # two blobs: foreground probability 0.45 and 0.9
    probabilities[:, 5:15, 5:15] = np.array([0.55, 0.45, 0.0])[:, None, None]
    probabilities[:, 25:35, 25:35] = np.array([0.1, 0.9, 0.0])[:, None, None]
    prediction = Prediction(denoised=np.zeros((1, *shape), np.float32), probabilities=probabilities)
    tuned = segment(model, prediction)  # tuned threshold 0.4
    strict = segment(model, prediction, model.instance_settings.with_threshold(0.6))
    assert tuned.shape == strict.shape == shape
    assert len(np.unique(tuned[tuned > 0])) == 2
    assert len(np.unique(strict[strict > 0])) == 1
    assert strict[30, 30] > 0 and strict[10, 10] == 0


def test_checkpoint_with_a_scalar_threshold_loads_as_the_heads_settings(tmp_path):
    """Checkpoints written before heads had instance settings store ``threshold``: it becomes
    the head's primary threshold; a checkpoint without one has no tuned settings."""
    model = tiny_loaded_model(tmp_path)
    state = read_checkpoint_state(model.path)
    old = {k: v for k, v in state.items() if k != "instance_settings"}
    write_checkpoint_state(tmp_path / "old.pt", {**old, "threshold": 0.35})
    write_checkpoint_state(tmp_path / "untuned.pt", {**old, "threshold": None})
    assert load_checkpoint(tmp_path / "old.pt").tuned_settings == model.head.settings(threshold=0.35)
    untuned = load_checkpoint(tmp_path / "untuned.pt")
    assert untuned.tuned_settings is None and untuned.instance_settings == model.head.settings()
    write_checkpoint_state(tmp_path / "bad.pt", {**old, "instance_settings": {"threshold": 0.35, "seeds": 2}})
    with pytest.raises(DataError, match="bad.pt: the checkpoint's instance settings are invalid"):
        load_checkpoint(tmp_path / "bad.pt")
