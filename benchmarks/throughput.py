"""Training and prediction throughput of DenoiSeg U-Nets on this machine, as a table.

For the paper U-Net (depth 4, 32 first filters, batch norm) and a small U-Net (depth 2,
16 filters), in float32 and in the fast default (``precision: auto``: bf16 autocast on
CUDA and on CPUs with AMX or AVX512-BF16, float32 elsewhere), it measures:

* training patches/s: the real :class:`denoiseg_core.training.Trainer` step (patch
  sampling, N2V masking, forward, DenoiSeg loss, backward, Adam) on 64x64 patches, batch
  128 (``--batch``), in-memory synthetic data;
* achieved GFLOP/s of that step (FLOPs counted with ``torch.utils.flop_counter``) and its
  fraction of the matrix-multiply peak measured here for the same precision;
* prediction megapixels/s of :func:`denoiseg_core.prediction.predict_image` on one
  image, whole (one forward pass) and tiled (tiles sized to the device, exact halo);
* peak memory of each measurement (peak RSS of a fresh process on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA);
* the peak memory of predicting an 8192 x 8192 image (tiled, streaming; ``--big``).

Each measurement runs in its own process (so peak memory is its own). ``--lock FILE``
holds an exclusive ``flock`` on FILE during each measurement (machines shared with other
heavy jobs); ``--quick`` is a smoke run with few steps and small images.

Run on this CPU::

    python benchmarks/throughput.py --lock /tmp/denoiseg-cpu.lock

Run on a GPU (CUDA build of PyTorch)::

    python benchmarks/throughput.py --device cuda --batch 128 --big 8192

(``--device auto`` picks CUDA when available.) On a GPU the timings synchronise the
device; bf16 peak is measured with a bf16 matmul of 8192 x 8192 matrices. Use
``--threads`` to pin CPU threads (default: all cores torch sees).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "paper": {"depth": 4, "first_filters": 32},
    "small": {"depth": 2, "first_filters": 16},
}


# --------------------------------------------------------------------------- helpers (child side)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # Linux reports ru_maxrss in KiB, macOS in bytes
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def matmul_peak(device_name: str, dtype_name: str, quick: bool) -> float:
    """Best GFLOP/s of square matrix products in ``dtype`` on the device."""
    import torch

    device = torch.device(device_name)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = 0.0
    for _ in range(2 if quick else 5):
        a @ b
        _sync(device)
        reps = 3 if device.type == "cpu" else 20
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - started) / 1e9)
    return best


def _records(shape: tuple[int, int], n_images: int, seed: int = 0):
    import numpy as np

    from denoiseg_core.data import ImageRecord
    from denoiseg_core.synthetic import make_nuclei_image

    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        _, noisy, labels = make_nuclei_image(shape, rng)
        records.append(ImageRecord(image=noisy[np.newaxis], labels=labels if i % 2 == 0 else None))
    return records


def _config(model: str, precision: str, device: str, batch: int, run_dir: Path):
    from denoiseg_core.config import DenoiSegConfig

    return DenoiSegConfig.model_validate(
        {
            "seed": 0,
            "run_dir": str(run_dir),
            "data": {"patch_size": [64, 64]},
            "model": {"backbone": {"name": "unet", "params": MODELS[model]}},
            "training": {"batch_size": batch, "precision": precision, "device": device, "validation_batches": 1},
        }
    )


def measure_training(model: str, precision: str, device_name: str, batch: int, steps: int, layout: str) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from denoiseg_core.training import Trainer

    records = _records((256, 256), 8)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            _config(model, precision, device_name, batch, Path(tmp) / "run"),
            progress=False,
            log=lambda _: None,
            records=(records[:6], records[6:]),
        )
        if layout == "nchw":  # the plain PyTorch layout, for reference
            trainer.memory_format = torch.contiguous_format
            trainer.net.to(memory_format=torch.contiguous_format)
        device = trainer.device
        batches = trainer.batches()
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(next(batches))
        flops_per_step = counter.get_total_flops()
        trainer.train_step(next(batches))  # warm-up (oneDNN/cuDNN kernel selection)
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            losses = trainer.train_step(next(batches))
        float(losses[0])  # waits for the device
        seconds = (time.perf_counter() - started) / steps
        resolved = trainer.precision
    return {
        "patches_per_s": batch / seconds,
        "gflops": flops_per_step / seconds / 1e9,
        "flops_per_patch": flops_per_step / batch,
        "precision": resolved,
        "peak_bytes": _peak_memory_bytes(device),
    }


def _loaded_model(model: str, tmp: Path):
    import torch

    from denoiseg_core.checkpoint import load_checkpoint, save_checkpoint
    from denoiseg_core.config import DenoiSegConfig
    from denoiseg_core.data import Normalization
    from denoiseg_core.model import build_model

    config = DenoiSegConfig.model_validate({"model": {"backbone": {"name": "unet", "params": MODELS[model]}}})
    torch.manual_seed(0)
    built = build_model(config, ndim=2, in_channels=1)
    path = tmp / "model.pt"
    save_checkpoint(path, config=config, built=built, normalization=Normalization([100.0], [50.0]))
    return load_checkpoint(path)


def measure_prediction(model: str, precision: str, device_name: str, size: int, mode: str, repeats: int) -> dict:
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from denoiseg_core.prediction import choose_tile, predict_image, tile_plan
    from denoiseg_core.runtime import resolve_device, resolve_precision

    device = resolve_device(device_name)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = _loaded_model(model, Path(tmp))
        rng = np.random.default_rng(0)
        image = rng.normal(100, 50, size=(1, size, size)).astype(np.float32)
        # "whole": one tile covering the image (a plain ``None`` would tile images above
        # WHOLE_IMAGE_PIXEL_LIMIT, as `denoiseg predict` does)
        tile = (size, size) if mode == "whole" else "auto"
        # warm-up on a small image (kernel selection), then the timed runs
        predict_image(loaded, image[:, :256, :256], device=device, precision=precision)
        best = math.inf
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter()
            predict_image(loaded, image, tile=tile, batch_size=1, device=device, precision=precision)
            _sync(device)
            best = min(best, time.perf_counter() - started)
        net = loaded.inference_net()
        divisor, halo = loaded.built.size_divisor, loaded.built.halo
        chosen = choose_tile(tile, (size, size), divisor, halo, device=device)
        plan = tile_plan((size, size), chosen, halo, divisor)
        tile_pixels = math.prod(s.stop - s.start for s in plan[0].input)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, 1, 256, 256, device=device))
        flops_per_pixel = counter.get_total_flops() / 256**2
    computed = tile_pixels * len(plan)
    return {
        "megapixels_per_s": size * size / best / 1e6,
        "gflops": flops_per_pixel * computed / best / 1e9,
        "tiles": len(plan),
        "tile": [s.stop - s.start for s in plan[0].input],
        "computed_fraction": computed / (size * size),
        "precision": resolve_precision(precision, device),
        "peak_bytes": _peak_memory_bytes(device),
    }


def measure_big(model: str, precision: str, device_name: str, size: int) -> dict:
    """Predict a ``size`` x ``size`` uint16 image (tiled, streaming) and report peak memory,
    then also instance labels from it (connected components and border growing on the full image)."""
    import numpy as np
    import torch

    from denoiseg_core.evaluation import segment
    from denoiseg_core.prediction import predict_image
    from denoiseg_core.runtime import resolve_device

    device = resolve_device(device_name)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = _loaded_model(model, Path(tmp))
        image = np.random.default_rng(0).integers(0, 400, size=(1, size, size), dtype=np.uint16)
        started = time.perf_counter()
        prediction = predict_image(loaded, image, tile="auto", batch_size=1, device=device, precision=precision)
        seconds = time.perf_counter() - started
        prediction_peak = _peak_memory_bytes(device)
        prediction_rss = _peak_memory_bytes(torch.device("cpu"))
        labels = segment(loaded, prediction)
        total_seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "megapixels_per_s": size * size / seconds / 1e6,
        "peak_bytes": prediction_peak,
        "peak_rss_bytes": prediction_rss,
        "with_labels_seconds": total_seconds,
        "with_labels_peak_rss_bytes": _peak_memory_bytes(torch.device("cpu")),
        "instances": int(labels.max()),
    }


def _child(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    kind = spec["kind"]
    if kind == "peak":
        return {"gflops": matmul_peak(spec["device"], spec["dtype"], spec["quick"])}
    if kind == "train":
        return measure_training(spec["model"], spec["precision"], spec["device"], spec["batch"], spec["steps"], spec["layout"])
    if kind == "predict":
        return measure_prediction(spec["model"], spec["precision"], spec["device"], spec["size"], spec["mode"], spec["repeats"])
    if kind == "big":
        return measure_big(spec["model"], spec["precision"], spec["device"], spec["size"])
    raise ValueError(kind)


# --------------------------------------------------------------------------- driver (parent side)


@contextlib.contextmanager
def _locked(path: str | None):
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_child(spec: dict, lock: str | None) -> dict:
    """Run one measurement in a fresh Python process; its JSON result comes back on stdout."""
    with _locked(lock):
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe_machine(device_name: str) -> str:
    import torch

    from denoiseg_core.runtime import cpu_bf16_capability, cpu_model_name, resolve_device

    device = resolve_device(device_name)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (
        f"{cpu_model_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"ISA {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_bf16_capability() or 'none'}"
    )


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--models", default="paper,small", help="comma-separated: paper, small")
    parser.add_argument("--batch", type=int, default=128, help="training batch (64x64 patches)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 3, quick 1)")
    parser.add_argument("--predict-size", type=int, default=None, help="prediction image side (default 2048, quick 512)")
    parser.add_argument("--big", type=int, default=None, help="side of the big-image memory check (default 8192, quick: skipped; 0 skips)")
    parser.add_argument("--nchw", action="store_true", help="also time a plain NCHW float32 training step (slow on CPU)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 step, batch 16, small images, no big image")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--lock", default=None, help="flock this file around each measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0

    quick = args.quick
    batch = 16 if quick and args.batch == 128 else args.batch
    steps = args.steps or (1 if quick else 3)
    size = args.predict_size or (512 if quick else 2048)
    big = args.big if args.big is not None else (0 if quick else 8192)
    repeats = 1 if quick else 2
    from denoiseg_core.runtime import resolve_device

    device = str(resolve_device(args.device))
    common = {"device": device, "threads": args.threads, "quick": quick}
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    print(f"machine: {describe_machine(args.device)}", flush=True)
    peaks = {d: run_child({**common, "kind": "peak", "dtype": d}, args.lock).get("gflops") for d in ("fp32", "bf16")}
    if None in peaks.values():
        print("could not measure the matmul peak", file=sys.stderr)
        return 1
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True)

    rows = []
    for model in models:
        variants = [("fp32", "nchw")] if args.nchw else []
        variants += [("fp32", "channels_last"), ("auto", "channels_last")]
        for precision, layout in variants:
            spec = {**common, "model": model, "precision": precision}
            row = {"model": model, "layout": layout, "requested": precision}
            row["train"] = run_child({**spec, "kind": "train", "batch": batch, "steps": steps if layout != "nchw" else 1, "layout": layout}, args.lock)
            if layout != "nchw":
                for mode in ("whole", "tiled"):
                    row[mode] = run_child({**spec, "kind": "predict", "size": size, "mode": mode, "repeats": repeats}, args.lock)
            rows.append(row)
            print(f"  measured {model} {precision} {layout}", file=sys.stderr, flush=True)

    header = (
        f"{'model':<14}{'precision':<11}{'layout':<8}{'train p/s':>10}{'GFLOP/s':>9}{'%peak':>7}{'mem GiB':>8}"
        f"{'whole MP/s':>11}{'tiled MP/s':>11}{'tiled/whole':>12}{'%peak':>7}{'mem GiB':>8}"
    )
    print()
    print(f"training: 64x64 patches, batch {batch}; prediction: {size}x{size} image (tiled: tiles sized to the device, exact halo)")
    print(header)
    print("-" * len(header))
    for row in rows:
        train = row["train"]
        name = f"{row['model']} d{MODELS[row['model']]['depth']}/{MODELS[row['model']]['first_filters']}"
        precision = train.get("precision", "?")
        label = precision if row["requested"] == "fp32" else f"auto={precision}"
        peak = peaks.get(precision)
        if "error" in train:
            print(f"{name:<14}{label:<11}training failed: {train['error']}")
            continue
        line = (
            f"{name:<14}{label:<11}{'NCHW' if row['layout'] == 'nchw' else 'NHWC':<8}{train['patches_per_s']:>10.1f}"
            f"{train['gflops']:>9.0f}{100 * train['gflops'] / peak:>6.0f}%{_gib(train['peak_bytes']):>8}"
        )
        whole, tiled = row.get("whole"), row.get("tiled")
        if whole and tiled and "error" not in whole and "error" not in tiled:
            line += (
                f"{whole['megapixels_per_s']:>11.3f}{tiled['megapixels_per_s']:>11.3f}"
                f"{tiled['megapixels_per_s'] / whole['megapixels_per_s']:>12.2f}"
                f"{100 * whole['gflops'] / peak:>6.0f}%{_gib(max(whole['peak_bytes'], tiled['peak_bytes'])):>8}"
            )
        elif whole or tiled:
            line += f"  prediction failed: {(whole or {}).get('error') or (tiled or {}).get('error')}"
        print(line)
    tiled_info = next((r["tiled"] for r in rows if r.get("tiled") and "error" not in r["tiled"]), None)
    if tiled_info:
        print(
            f"tiled: {tiled_info['tiles']} tiles of {tiled_info['tile']}, computing "
            f"{tiled_info['computed_fraction']:.2f}x the image's pixels (overlap for the exact halo)"
        )

    result = {"machine": describe_machine(args.device), "matmul_peak_gflops": peaks, "rows": rows, "batch": batch, "predict_size": size}
    if big:
        big_result = run_child({**common, "kind": "big", "model": models[0], "precision": "auto", "size": big}, args.lock)
        result["big"] = big_result
        if "error" in big_result:
            print(f"{big}x{big} prediction failed: {big_result['error']}")
        else:
            print(
                f"{big}x{big} uint16 image, {models[0]} U-Net, fast default, tiled prediction (denoised + 3 probabilities, "
                f"float32): {big_result['seconds']:.0f} s ({big_result['megapixels_per_s']:.2f} MP/s), "
                f"peak memory {_gib(big_result['peak_bytes'])} GiB (peak RSS {_gib(big_result['peak_rss_bytes'])} GiB); "
                f"with instance labels: {big_result['with_labels_seconds']:.0f} s, "
                f"peak RSS {_gib(big_result['with_labels_peak_rss_bytes'])} GiB"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
