"""The package's documentation README (usage in Fiji, ilastik and Python; validation)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _scalar_rows(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(key, _format_value(v)) for key, v in values.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]


def validation_section(evaluations: Mapping[str, Mapping[str, Any]], settings: str) -> str:
    """``# Validation``: the model's own evaluation numbers, one table per source."""
    lines = ["# Validation", ""]
    lines.append(
        "Segmentation quality is measured as in DenoiSeg: AP@0.5 = TP / (TP + FP + FN) with objects "
        "matched one-to-one at IoU > 0.5, mAP averages AP over IoU thresholds 0.5 to 0.95, SEG is the "
        "Cell Tracking Challenge measure. To validate the model on your own annotated images run "
        "`denoiseg zoo predict MODEL.zip images/*.tif --out predictions/` and compare "
        "`predictions/*_labels.tif` with your masks (`denoiseg evaluate` computes the same numbers)."
    )
    lines.append("")
    lines.append(f"Instance settings used: **{settings}**.")
    lines.append("")
    if not evaluations:
        lines.append("No evaluation numbers were recorded for this model (no validation masks were available at export).")
        lines.append("")
    for source, values in evaluations.items():
        rows = _scalar_rows(values)
        if not rows:
            continue
        lines += [f"## {source}", "", "| measure | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in rows]
        lines.append("")
    return "\n".join(lines)


def readme(
    *,
    name: str,
    description: str,
    ndim: int,
    in_channels: int,
    channel_names: Sequence[str],
    min_size: int,
    step: int,
    halo: int,
    mean: Sequence[float],
    std: Sequence[float],
    network: str,
    head: str,
    head_outputs: str,
    instances: str,
    settings: str,
    macro_name: str | None,
    evaluations: Mapping[str, Mapping[str, Any]],
    training_summary: Mapping[str, Any],
) -> str:
    """The README.md shipped as the package documentation; ``network``, ``head``,
    ``head_outputs`` and ``instances`` are the backbone's and head's own words."""
    spatial = "z, y, x" if ndim == 3 else "y, x"
    dims = "3D (z-stacks)" if ndim == 3 else "2D"
    channels = ", ".join(f"`{c}`" for c in channel_names)
    stats = ", ".join(f"mean {m:.4g} / std {s:.4g}" for m, s in zip(mean, std))
    training = "\n".join(f"- {key}: {_format_value(value)}" for key, value in training_summary.items())
    if macro_name:
        fiji_labels = (
            f"6. Instance labels: the package's postprocessing macro `{macro_name}` runs after the model and\n"
            "   opens `<title>_labels` (one integer per object, same labels as `denoiseg predict`). To run it\n"
            f"   by hand, select the model output and use *Plugins > Macros > Run...* on `{macro_name}` from\n"
            "   the model folder."
        )
    else:
        fiji_labels = "6. Instance labels: use `denoiseg zoo predict` (this head has no ImageJ macro)."
    fiji_3d_note = (
        "\n> In 3D the macro labels the output hyperstack (channels x z slices) the same way. It runs voxel\n"
        "> by voxel in the macro language (seconds per million voxels); for very large volumes\n"
        "> `denoiseg zoo predict` is much faster.\n"
        if ndim == 3 and macro_name
        else ""
    )
    return f"""# {name}

{description}

A DenoiSeg model (Buchholz et al. 2020): {network} that jointly **denoises** {dims} microscopy
images (Noise2Void, self-supervised) and **segments** them with {head}, trained with `denoiseg`
in PyTorch.

## Inputs and outputs

- **Input** `input`: axes batch, channel ({in_channels}), {spatial}; raw intensities (any pixel type).
  Normalisation is part of the package (`fixed_zero_mean_unit_variance` with the training data's
  statistics: {stats}), so do **not** normalise images yourself.
- **Output** `output`: axes batch, channel, {spatial}; channels {channels}.
  The denoised channel(s) are in the input's intensity units; the other channels are the head's
  {head_outputs}.
- Tile sizes: {min_size} + n x {step} pixels per spatial axis; the output declares a halo of
  {halo} pixels, which tiling consumers (deepImageJ, ilastik, bioimageio.core) discard at tile borders.
- **Instances**: {instances}

## Use in Fiji (deepImageJ)

1. Install deepImageJ: *Help > Update... > Manage update sites*, tick **DeepImageJ**, apply, restart Fiji.
2. *Plugins > DeepImageJ > DeepImageJ Install Model*: choose *Private model*, *From ZIP file*, select
   this `.zip`, accept the terms and install (or unzip it into `Fiji.app/models/`).
3. Open your image (a single-channel {dims} image), then *Plugins > DeepImageJ > DeepImageJ Run*.
4. Select this model. Weights: *Torchscript* (written for PyTorch 1.13 and newer: export admits
   only long-standing operators, and denoiseg's tests run such files in PyTorch 1.13.1) or *ONNX*
   (opset 17, IR version 8: what ONNX Runtime 1.13 reads); keep the default tiling (tiling is
   allowed; the halo is handled for you) and press **Run**.
5. The result is a {len(channel_names)}-channel image: {channels}.
{fiji_labels}
{fiji_3d_note}
## Use in ilastik

1. Install ilastik 1.4.1 or newer and start the **Neural Network Classification (Local)** workflow
   (*Trainable Domain Adaptation* works as well).
2. *Input Data*: add your raw image(s) (same dimensionality as the training data: {dims}).
3. *NN Prediction* applet: click the model field, choose **Load model from file** and select this
   `.zip`; ilastik validates it and loads the TorchScript (or ONNX) weights.
4. Press **Live Predict** to see the channels {channels}; tiles and halos follow the package.
5. *Export Data* writes the output channels (e.g. as HDF5 or TIFF); the instances follow from
   them as described above (*Instances*), and `denoiseg zoo predict` writes the instance labels.

## Use in Python

```python
import numpy as np, tifffile
from bioimageio.core import load_model_description, predict

model = load_model_description("this_model.zip")
image = tifffile.imread("image.tif").astype("float32")  # {spatial}
# every spatial size must be {min_size} + n x {step}: pad at the end, crop the result back
padded = np.pad(image, [(0, max({min_size}, -(-s // {step}) * {step}) - s) for s in image.shape], mode="symmetric")
n = min(16, min((s - {min_size}) // {step} for s in padded.shape))  # tiles of {min_size} + n x {step} pixels
sample = predict(model=model, inputs=padded[None, None], blocksize_parameter=n)
output = sample.members["output"].data.to_numpy()[0][(slice(None), *(slice(0, s) for s in image.shape))]
denoised, segmentation = output[:{in_channels}], output[{in_channels}:]  # each (channels, {spatial})
```

With denoiseg installed: `denoiseg zoo predict this_model.zip image.tif --out results/` writes the
denoised image, the probabilities and the instance labels; `denoiseg zoo import this_model.zip
--out model.pt` turns the package back into a checkpoint to fine-tune with `denoiseg train`.

## Training

{training}

{validation_section(evaluations, settings)}
## References

- T.-O. Buchholz, M. Prakash, D. Schmidt, A. Krull, F. Jug. *DenoiSeg: Joint Denoising and
  Segmentation.* ECCV 2020 Workshops (BioImage Computing). doi:10.1007/978-3-030-66415-2_21
- A. Krull, T.-O. Buchholz, F. Jug. *Noise2Void - Learning Denoising from Single Noisy Images.*
  CVPR 2019. doi:10.1109/CVPR.2019.00223
"""
