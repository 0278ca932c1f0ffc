"""The fast paths: bf16 vs fp32 training steps, precision choice, channels_last, worker
data loading, torch.compile fallback, streaming prediction (memory, tile-by-tile TIFF output)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from denoiseg_plugins.unet_arch import UNet, unet_halo
from torch.utils.data import DataLoader

from denoiseg_core import training
from denoiseg_core.checkpoint import load_checkpoint, save_checkpoint
from denoiseg_core.components import TargetSpec
from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.data import Normalization, PatchSampler, PatchStream, load_folder
from denoiseg_core.errors import ConfigError
from denoiseg_core.model import build_model
from denoiseg_core.prediction import device_tile, predict_array, predict_image, tiff_memmap
from denoiseg_core.runtime import cpu_bf16_capability, fold_batch_norm, resolve_precision
from denoiseg_core.synthetic import write_synthetic_dataset
from denoiseg_core.training import Trainer, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("speed"), n_train=4, n_labelled=2, n_val=1, n_test=0, shape=(64, 64), seed=5
    )


def _config(tiny_config: DenoiSegConfig, data: dict[str, Path], run_dir: Path, **training_values) -> DenoiSegConfig:
    raw = tiny_config.model_dump(mode="json")
    raw["run_dir"] = str(run_dir)
    raw["data"].update({"train": str(data["train"]), "validation": str(data["val"])})
    raw["training"].update(training_values)
    return DenoiSegConfig.model_validate(raw)


def _quiet(_message: str) -> None:
    pass


# ---------------------------------------------------------------- precision


def test_bf16_and_fp32_training_steps_give_close_losses_on_the_same_batch(tiny_config, dataset, tmp_path):
    # without dropout: its random masks would differ between the two steps and hide the arithmetic compared here
    no_dropout = tiny_config.model_copy(deep=True)
    no_dropout.model.backbone.params["dropout"] = 0.0
    trainers = {
        p: Trainer(_config(no_dropout, dataset, tmp_path / p, precision=p, batch_size=8), progress=False, log=_quiet)
        for p in ("fp32", "bf16")
    }
    assert not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in trainers["fp32"].net.modules())
    fp32, bf16 = trainers["fp32"], trainers["bf16"]
    for key, value in fp32.net.state_dict().items():  # same seed: same initial weights
        assert torch.equal(value, bf16.net.state_dict()[key]), key
    batch = fp32.sampler.sample(8, np.random.default_rng(7))
    assert batch[2].any(), "the batch should hold labelled patches so both loss terms count"

    losses = {p: [float(x) for x in t.train_step(batch)] for p, t in trainers.items()}
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert np.isfinite(a) and np.isfinite(b)
        assert abs(a - b) <= 0.03 * abs(a) + 1e-3, losses
    assert losses["fp32"] != losses["bf16"], "bf16 autocast did not change the arithmetic at all"

    # the gradients of that step (still on the parameters) point the same way
    grads = {p: torch.cat([q.grad.flatten() for q in t.net.parameters()]) for p, t in trainers.items()}
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cosine > 0.9, float(cosine)  # measured about 0.95 for this tiny network


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    expected = "bf16" if cpu_bf16_capability() is not None else "fp32"
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("auto", cpu, training_ndim=2) == expected
    # 3D training on a CPU stays float32 (bf16 gave non-finite losses there); an explicit bf16 is kept
    assert resolve_precision("auto", cpu, training_ndim=3) == "fp32"
    assert resolve_precision("bf16", cpu, training_ndim=3) == "bf16"
    assert cpu_bf16_capability() in (None, "amx", "avx512_bf16")
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp16", cpu)


def test_cpu_bf16_detection_can_be_overridden(monkeypatch):
    monkeypatch.setenv("DENOISEG_CPU_BF16", "0")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setenv("DENOISEG_CPU_BF16", "1")
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"


# ---------------------------------------------------------------- training loop


def test_training_network_is_channels_last_and_steps_return_device_tensors(tiny_config, dataset, tmp_path):
    trainer = Trainer(_config(tiny_config, dataset, tmp_path / "run"), progress=False, log=_quiet)
    weights = [m.weight for m in trainer.net.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not all(w.is_contiguous() for w in weights)
    losses = trainer.train_step(trainer.sampler.sample(4, trainer.state.streams.patches))
    assert all(isinstance(x, torch.Tensor) and x.device == trainer.device and not x.requires_grad for x in losses)


def test_patch_stream_workers_are_seeded_and_repeatable(dataset):
    records = load_folder(dataset["train"])
    sampler = PatchSampler(records, (32, 32), Normalization([0.0], [1.0]), lambda labels: (labels > 0).astype(np.int64), TargetSpec("int64"), seed=0)

    def first_batches(seed: int, workers: int, n: int = 4) -> list[np.ndarray]:
        loader = DataLoader(PatchStream(sampler, 3, seed=[seed, 0]), batch_size=None, num_workers=workers)
        out = []
        for patches, targets, labelled in loader:
            assert patches.shape == (3, 1, 32, 32) and targets.shape == (3, 32, 32) and labelled.shape == (3,)
            out.append(patches.numpy())
            if len(out) == n:
                return out
        raise AssertionError("the stream ended")

    a, b = first_batches(1, workers=2), first_batches(1, workers=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], a[1]), "the two workers drew the same patches"
    assert not np.array_equal(a[0], first_batches(2, workers=2, n=1)[0])
    # in the main process the stream is seeded by the seed alone
    np.testing.assert_array_equal(first_batches(1, workers=0, n=1)[0], first_batches(1, workers=0, n=1)[0])


def test_training_with_worker_processes(tiny_config, dataset, tmp_path):
    run = train(
        _config(tiny_config, dataset, tmp_path / "run", num_workers=2, steps_per_epoch=4, threshold_tuning=False),
        progress=False,
        log=_quiet,
    )
    assert run.history and np.isfinite(run.history[0]["train_loss"])
    assert load_checkpoint(run.last_checkpoint).ndim == 2


def test_compile_option_is_accepted_and_used(tiny_config, dataset, tmp_path, monkeypatch):
    # The eager backend traces with TorchDynamo but skips code generation (seconds, not minutes).
    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    messages: list[str] = []
    config = _config(tiny_config, dataset, tmp_path / "run", compile=True, threshold_tuning=False)
    assert config.training.compile is True
    assert DenoiSegConfig().training.compile is False  # off by default
    trainer = Trainer(config, progress=False, log=messages.append)
    assert trainer._train_forward is not trainer.train_net
    trainer.fit()
    assert not [m for m in messages if "compile" in m], messages
    assert trainer._train_forward is not trainer.train_net  # still compiled after the first step


def test_compile_falls_back_cleanly_when_unavailable(tiny_config, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "COMPILE_BACKEND", "no_such_backend")
    messages: list[str] = []
    config = _config(tiny_config, dataset, tmp_path / "run", compile=True, threshold_tuning=False)
    run = train(config, progress=False, log=messages.append)
    assert any("warning" in m and "compile" in m for m in messages), messages
    assert np.isfinite(run.history[0]["train_loss"])


# ---------------------------------------------------------------- prediction


def _tiny_model(tmp_path: Path, mean: float = 1000.0, std: float = 200.0):
    config = DenoiSegConfig.model_validate({"model": {"backbone": {"name": "unet", "params": {"depth": 2, "first_filters": 4}}}})
    torch.manual_seed(0)
    built = build_model(config, ndim=2, in_channels=1)
    save_checkpoint(tmp_path / "m.pt", config=config, built=built, normalization=Normalization([mean], [std]))
    return load_checkpoint(tmp_path / "m.pt")


@pytest.mark.parametrize("tile", [(64, 64), (96, 160), (200, 72)])
def test_bf16_tiled_prediction_equals_whole_image_away_from_borders(tile):
    torch.manual_seed(0)
    net = UNet(2, 1, 4, depth=2, first_filters=4).eval()
    halo = unet_halo(2, 3)
    image = np.random.default_rng(1).normal(size=(1, 203, 187)).astype(np.float32)
    whole = predict_array(net, image, divisor=4, halo=halo, precision="bf16")
    tiled = predict_array(net, image, divisor=4, halo=halo, tile=tile, batch_size=3, precision="bf16")
    # bf16 results depend on the tile layout only through rounding of identical sums
    assert np.abs(tiled - whole).max() < 0.05 * (np.abs(whole).max() + 1)


def test_prediction_streams_without_full_size_float_copies(tmp_path):
    model = _tiny_model(tmp_path)
    image = np.random.default_rng(0).integers(500, 1500, size=(1, 1024, 1000), dtype=np.uint16)
    output_bytes = 4 * image.shape[1] * image.shape[2] * 4  # 1 denoised + 3 probabilities, float32
    tracemalloc.start()
    prediction = predict_image(model, image, tile=(256, 256), batch_size=2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the output plus small per-tile buffers; a float32 copy of the image alone would add 4 MB
    assert peak < output_bytes + 2.5e6, peak / 1e6
    reference = predict_image(model, image.astype(np.float32), tile=(256, 256), batch_size=2)
    np.testing.assert_allclose(prediction.denoised, reference.denoised, rtol=1e-6, atol=1e-3)
    assert image.dtype == np.uint16 and image.min() >= 500  # input untouched


def test_prediction_can_write_its_output_tile_by_tile_to_a_tiff(tmp_path):
    model = _tiny_model(tmp_path)
    image = np.random.default_rng(2).normal(1000, 200, size=(1, 150, 130)).astype(np.float32)
    in_memory = predict_image(model, image, tile=(64, 64))
    path = tmp_path / "out.tif"
    out = tiff_memmap(path, (4, 150, 130))
    streamed = predict_image(model, image, tile=(64, 64), out=out)
    assert np.shares_memory(streamed.denoised, out)
    out.flush()
    del out, streamed
    written = tifffile.imread(path)
    np.testing.assert_allclose(written[:1], in_memory.denoised, rtol=1e-6)
    np.testing.assert_allclose(written[1:], in_memory.probabilities, atol=1e-6)
    with pytest.raises(Exception, match="overwrite"):
        tiff_memmap(path, (4, 150, 130))


def test_device_tiles_keep_most_of_each_tile():
    tile = device_tile(2, 16, 122, "cpu")
    assert all(t % 16 == 0 for t in tile)
    assert all((t - 2 * 122) / t > 0.75 for t in tile)


def test_batch_norm_folding_keeps_the_function_and_the_original_network():
    torch.manual_seed(0)
    net = UNet(2, 1, 3, depth=2, first_filters=8)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.3, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    net.eval()
    folded = fold_batch_norm(net)
    assert folded is not net
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-4)
    assert fold_batch_norm(net.train()) is net  # batch statistics in training: nothing to fold
