"""The plugin conformance kit: the checks every backbone, masking strategy and head must pass.

A plugin author calls these from their own pytest suite::

    from denoiseg_core.testing import check_backbone, parametrize_components

    def test_my_backbone():
        check_backbone("my_net")            # by registered name, or pass the BackboneSpec

    @parametrize_components("backbone")     # every installed backbone, ids = names
    def test_every_backbone(component):
        check_backbone(component)

Each ``check_*`` raises :class:`ConformanceError` (an ``AssertionError``, so pytest shows
it as a failed assertion) naming the component and the broken rule. The checks need no
GPU; they use tiny inputs and are meant to take seconds per component. ``pytest`` is only
imported by :func:`parametrize_components`.

What is checked (see each function for details):

* parameters: a :class:`~denoiseg_core.components.ComponentParams` model whose defaults
  validate, that survives ``model_dump`` -> ``model_validate`` (also through JSON),
  rejects unknown keys and documents every field (``denoiseg plugins list`` shows it);
* backbones: the shape contract at 2D and 3D sizes (multiples of ``size_divisor``),
  gradients reaching every parameter, batch independence in eval mode, the ``halo``
  (tiled inference equals whole-image inference beyond it), and exportability as
  ``denoiseg zoo export`` defines it (:mod:`denoiseg_core.exportability`): TorchScript
  that old runtimes load and ONNX, both agreeing with eager PyTorch at two sizes, and the
  self-contained architecture file for bioimage.io;
* masking strategies: shapes, dtypes and device, the input left unmodified, a sensible
  blind-spot fraction in every patch spread over the whole patch, blind spots actually
  hidden, pixels away from blind spots untouched, determinism under a seeded generator;
* heads: the declared outputs and targets of a hand-made label image, the loss (zero but
  differentiable for an unlabelled batch, only labelled patches counting), a scriptable
  activation that the described activation code reproduces, strict instance settings, and
  instances recovered as integer labels, with default and tuned settings, from logits
  fitted to the targets.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from denoiseg_core import exportability
from denoiseg_core.components import (
    CHANNEL_ROLES,
    BackboneSpec,
    ComponentParams,
    ComponentSpec,
    HeadOutputs,
    HeadSpec,
    InstanceSettings,
    MaskingSpec,
    RegisteredComponent,
    SemiSupervisedSpec,
    TargetSpec,
)
from denoiseg_core.errors import DenoiSegError
from denoiseg_core.plugin_manager import KINDS, Registry, get_registry

__all__ = [
    "ConformanceError",
    "check_architecture_source",
    "check_backbone",
    "check_backbone_export",
    "check_backbone_halo",
    "check_component",
    "check_head",
    "check_masking",
    "check_params",
    "check_semi_supervised",
    "parametrize_components",
    "resolve_spec",
]

_SPEC_CLASSES: dict[str, type] = {kind: spec_cls for kind, (_, spec_cls) in KINDS.items()}


class ConformanceError(AssertionError):
    """A component breaks the plugin contract."""


def _require(condition: bool, spec: ComponentSpec, message: str) -> None:
    if not condition:
        raise ConformanceError(f"{spec.kind} {spec.name!r}: {message}")


def _require_strict_model(model, valid, spec: ComponentSpec, field_kind: str, loose_message: str, hint: str = "") -> None:
    """Every field of the pydantic ``model`` is described, and unknown keys are refused (``valid``: an instance)."""
    for name, field in model.model_fields.items():
        _require(bool(field.description), spec, f"{field_kind} {name!r} has no description{' ' + hint if hint else ''}")
    try:
        model.model_validate({**valid.model_dump(), "__surely_not_a_field__": 1})
    except ValidationError:
        pass
    else:
        raise ConformanceError(f"{spec.kind} {spec.name!r}: {loose_message}")


def resolve_spec(kind: str, component: str | ComponentSpec | RegisteredComponent, registry: Registry | None = None):
    """The spec of ``component``: a registered name, a spec or a :class:`RegisteredComponent`."""
    if isinstance(component, RegisteredComponent):
        component = component.spec
    if isinstance(component, str):
        component = (registry or get_registry()).spec(kind, component)
    expected = _SPEC_CLASSES[kind]
    if not isinstance(component, expected):
        raise ConformanceError(f"expected a {expected.__name__} (or its name), got {type(component).__name__}")
    return component


# --------------------------------------------------------------------------- parameters


def check_params(spec: ComponentSpec, params: ComponentParams | dict | None = None) -> ComponentParams:
    """Check the parameter model; return ``params`` (default: the defaults) validated."""
    model = spec.params
    _require(
        isinstance(model, type) and issubclass(model, ComponentParams),
        spec,
        "params must be a subclass of denoiseg_core.components.ComponentParams",
    )
    try:
        defaults = model.model_validate({})
    except ValidationError as exc:
        raise ConformanceError(f"{spec.kind} {spec.name!r}: default parameters do not validate: {exc}") from None
    _require_strict_model(model, defaults, spec, "parameter", "params accept unknown keys (must use extra='forbid')",
                          "(Field(description=...))")

    if params is None:
        chosen = defaults
    elif isinstance(params, dict):
        chosen = model.model_validate(params)
    else:
        chosen = params
    _require(isinstance(chosen, model), spec, f"params is {type(chosen).__name__}, not {model.__name__}")
    for candidate in {id(defaults): defaults, id(chosen): chosen}.values():
        _require(
            model.model_validate(candidate.model_dump()) == candidate,
            spec,
            f"params do not survive model_dump -> model_validate: {candidate!r}",
        )
        _require(
            model.model_validate_json(candidate.model_dump_json()) == candidate,
            spec,
            f"params do not survive a JSON round trip (as in saved configs): {candidate!r}",
        )
    return chosen


# --------------------------------------------------------------------------- backbones


def _test_sizes(divisor: int, ndim: int, minimum: int = 8) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two different, non-cubic sizes that are multiples of ``divisor`` and at least ``minimum``."""
    base = divisor * math.ceil(minimum / divisor)
    first = (base,) * (ndim - 1) + (base + divisor,)
    second = (base + divisor,) + (base,) * (ndim - 1)
    return first, second


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Agreement up to ``rtol`` of the output's magnitude (float32 arithmetic differs by order)."""
    scale = float(expected.abs().max()) + 1e-6
    return bool((actual - expected).abs().max() <= rtol * scale + 1e-6)


def _build(spec: BackboneSpec, params: ComponentParams, ndim: int, in_channels: int, out_channels: int) -> nn.Module:
    torch.manual_seed(0)
    net = spec.build(params, ndim=ndim, in_channels=in_channels, out_channels=out_channels)
    _require(isinstance(net, nn.Module), spec, f"build() returned {type(net).__name__}, not an nn.Module")
    return net


def check_backbone(
    component: str | BackboneSpec | RegisteredComponent,
    *,
    params: ComponentParams | dict | None = None,
    in_channels: int = 2,
    out_channels: int = 5,
    ndims: Sequence[int] | None = None,
    torchscript: bool = True,
    onnx: bool = True,
    halo: bool = True,
    architecture: bool = True,
    registry: Registry | None = None,
) -> None:
    """Run every backbone check for each supported dimensionality (or those in ``ndims``).

    ``params`` default to the parameter defaults. Each check can be switched off for a
    quick run, but a component is only conformant when all pass.
    """
    spec: BackboneSpec = resolve_spec("backbone", component, registry)
    params = check_params(spec, params)
    divisor = spec.size_divisor(params)
    halo_px = spec.halo(params)
    _require(isinstance(divisor, int) and divisor >= 1, spec, f"size_divisor must be an int >= 1, got {divisor!r}")
    _require(isinstance(halo_px, int) and halo_px >= 0, spec, f"halo must be an int >= 0, got {halo_px!r}")
    _require(
        bool(spec.supported_ndims) and set(spec.supported_ndims) <= {2, 3},
        spec,
        f"supported_ndims must be a non-empty subset of (2, 3), got {spec.supported_ndims!r}",
    )
    for ndim in ndims or spec.supported_ndims:
        if ndim not in spec.supported_ndims:
            continue
        net = _build(spec, params, ndim, in_channels, out_channels)
        _check_shapes_and_gradients(spec, net, divisor, ndim, in_channels, out_channels)
        if torchscript or onnx:
            check_backbone_export(
                spec, params=params, ndim=ndim, in_channels=in_channels, out_channels=out_channels,
                torchscript=torchscript, onnx=onnx, net=net,
            )  # fmt: skip
        if architecture and spec.architecture is not None:
            check_architecture_source(
                spec, params=params, ndim=ndim, in_channels=in_channels, out_channels=out_channels
            )
    if halo and 2 in spec.supported_ndims and (not ndims or 2 in ndims):
        check_backbone_halo(spec, params=params)


def _check_shapes_and_gradients(
    spec: BackboneSpec, net: nn.Module, divisor: int, ndim: int, in_channels: int, out_channels: int
) -> None:
    for size in _test_sizes(divisor, ndim):
        net.train()
        x = torch.randn(2, in_channels, *size)
        out = net(x)
        expected = (2, out_channels, *size)
        _require(
            isinstance(out, torch.Tensor) and tuple(out.shape) == expected,
            spec,
            f"{ndim}D input {tuple(x.shape)} gave output {tuple(getattr(out, 'shape', ()))}, expected {expected}",
        )
        _require(out.dtype == torch.float32, spec, f"output dtype {out.dtype}, expected float32")
        _require(bool(torch.isfinite(out).all()), spec, f"{ndim}D output has NaN or inf")
    net.zero_grad()
    out.square().mean().backward()
    missing = [
        name for name, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    _require(not missing, spec, f"{ndim}D: no gradient reaches parameters {missing[:5]} (unused layers?)")

    # In eval mode each sample must be processed on its own (no batch statistics).
    net.eval()
    with torch.no_grad():
        x = torch.randn(3, in_channels, *_test_sizes(divisor, ndim)[0])
        batched = net(x)
        single = net(x[1:2])
    _require(_close(single, batched[1:2]), spec, f"{ndim}D eval output of a sample depends on the rest of the batch")


def check_backbone_export(
    component: str | BackboneSpec | RegisteredComponent,
    *,
    params: ComponentParams | dict | None = None,
    ndim: int = 2,
    in_channels: int = 2,
    out_channels: int = 5,
    torchscript: bool = True,
    onnx: bool = True,
    net: nn.Module | None = None,
    registry: Registry | None = None,
) -> None:
    """The network exports the way ``denoiseg zoo export`` exports it (the same functions, from
    :mod:`denoiseg_core.exportability`): TorchScript that old runtimes load (scripted, else
    traced) and a self-contained ONNX file (opset 17, dynamic batch and spatial sizes); both,
    run by TorchScript and onnxruntime, agree with eager PyTorch, also at a second size."""
    spec: BackboneSpec = resolve_spec("backbone", component, registry)
    params = check_params(spec, params) if not isinstance(params, ComponentParams) else params
    net = net if net is not None else _build(spec, params, ndim, in_channels, out_channels)
    net.eval()
    divisor = spec.size_divisor(params)
    first, second = _test_sizes(divisor, ndim)
    x1 = torch.randn(1, in_channels, *first)
    x2 = torch.randn(2, in_channels, *second)
    with torch.no_grad():
        expected1, expected2 = net(x1), net(x2)

    runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}  # format -> run it on an array
    try:
        if torchscript:
            data, how = exportability.export_torchscript(net, x1, spec.name, step=divisor)
            runners[f"TorchScript ({how})"] = functools.partial(exportability.run_torchscript, data)
        if onnx:
            runners["ONNX (onnxruntime)"] = functools.partial(exportability.run_onnx, exportability.export_onnx(net, x1, spec.name))
    except DenoiSegError as exc:
        raise ConformanceError(f"{exc} (in {ndim}D)") from None
    for label, run in runners.items():
        for x, expected in ((x1, expected1), (x2, expected2)):
            _require(
                _close(torch.from_numpy(run(x.numpy())), expected),
                spec,
                f"{ndim}D {label} output differs from eager PyTorch at input {tuple(x.shape)}",
            )


def check_backbone_halo(
    component: str | BackboneSpec | RegisteredComponent,
    *,
    params: ComponentParams | dict | None = None,
    in_channels: int = 1,
    out_channels: int = 3,
    registry: Registry | None = None,
) -> None:
    """Tiled inference must equal whole-image inference beyond ``halo`` pixels from a tile edge.

    A 2D image is cut along x into a tile starting at a multiple of ``size_divisor``; the
    tile's output without ``halo`` pixels on each side must match the whole image's output
    there (eval mode). A too-small halo would leave seams in tiled predictions.
    """
    spec: BackboneSpec = resolve_spec("backbone", component, registry)
    params = check_params(spec, params) if not isinstance(params, ComponentParams) else params
    divisor, halo_px = spec.size_divisor(params), spec.halo(params)
    net = _build(spec, params, 2, in_channels, out_channels).eval()
    start = divisor * math.ceil((halo_px + 1) / divisor)
    width = divisor * math.ceil((2 * halo_px + max(divisor, 4)) / divisor)
    total = start + width + divisor * math.ceil((halo_px + 1) / divisor)
    height = divisor * math.ceil(8 / divisor)
    image = torch.randn(1, in_channels, height, total)
    with torch.no_grad():
        whole = net(image)[..., start + halo_px : start + width - halo_px]
        tile = net(image[..., start : start + width])[..., halo_px : width - halo_px]
    _require(
        _close(tile, whole),
        spec,
        f"halo {halo_px} is too small: a tile's output differs from whole-image inference more than "
        f"{halo_px} pixels from the tile edge",
    )


def check_architecture_source(
    component: str | BackboneSpec | RegisteredComponent,
    *,
    params: ComponentParams | dict | None = None,
    ndim: int = 2,
    in_channels: int = 2,
    out_channels: int = 5,
    registry: Registry | None = None,
) -> None:
    """The ``architecture`` file is self-contained (torch and the standard library only),
    rebuilds the network from ``kwargs`` alone, loads its state dict strictly and gives the
    same output (what a bioimage.io ``pytorch_state_dict`` consumer does)."""
    spec: BackboneSpec = resolve_spec("backbone", component, registry)
    params = check_params(spec, params) if not isinstance(params, ComponentParams) else params
    arch = spec.architecture
    _require(arch is not None, spec, "has no architecture source (needed for bioimage.io pytorch_state_dict weights)")
    _require(arch.file.is_file(), spec, f"architecture file {arch.file} does not exist")
    net = _build(spec, params, ndim, in_channels, out_channels).eval()
    x = torch.randn(1, in_channels, *_test_sizes(spec.size_divisor(params), ndim)[0])
    try:
        exportability.check_self_contained(arch.file, spec.name)
        exportability.check_architecture_rebuilds(
            arch.file, arch.callable_name, arch.kwargs(params, ndim, in_channels, out_channels), net.state_dict(), net, x, spec.name
        )
    except DenoiSegError as exc:
        raise ConformanceError(f"{exc} (in {ndim}D)") from None


# --------------------------------------------------------------------------- masking

_MASKING_SHAPES: tuple[tuple[int, ...], ...] = ((4, 1, 32, 32), (2, 2, 24, 40), (2, 1, 12, 16, 20))


def check_masking(
    component: str | MaskingSpec | RegisteredComponent,
    *,
    params: ComponentParams | dict | None = None,
    shapes: Sequence[tuple[int, ...]] = _MASKING_SHAPES,
    expected_fraction: float | None = None,
    fraction_tolerance: float = 0.35,
    untouched_distance: int = 4,
    device: str | torch.device | None = None,
    registry: Registry | None = None,
) -> None:
    """Blind-spot statistics and contract of a masking strategy.

    For each ``(N, C, *spatial)`` in ``shapes`` (2D, multi-channel and 3D by default):
    outputs of the input's shape, dtype (float) / bool and device; the input tensor is not
    modified; 0 < blind-spot fraction <= 0.5 (within ``fraction_tolerance`` relative of
    ``expected_fraction`` when given); every patch and channel has blind spots, and they
    reach both halves of every axis; most blind spots are hidden (changed); pixels farther
    than ``untouched_distance`` (Chebyshev) from every blind spot are untouched; the same
    seed gives the same result and another seed another mask; ``generator=None`` works.
    ``device`` defaults to CUDA when available.
    """
    spec: MaskingSpec = resolve_spec("masking", component, registry)
    params = check_params(spec, params)
    strategy = spec.build(params)
    _require(callable(strategy), spec, f"build() returned a non-callable {type(strategy).__name__}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for shape in shapes:
        _check_masking_shape(
            spec, strategy, tuple(shape), device, expected_fraction, fraction_tolerance, untouched_distance
        )


def _call_masking(spec: MaskingSpec, strategy: Any, patches: torch.Tensor, seed: int | None):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    result = strategy(patches, generator)
    _require(
        isinstance(result, tuple) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result),
        spec,
        "must return a tuple (masked_input, loss_mask) of tensors",
    )
    return result


def _check_masking_shape(
    spec: MaskingSpec,
    strategy: Any,
    shape: tuple[int, ...],
    device: torch.device,
    expected_fraction: float | None,
    tolerance: float,
    untouched_distance: int,
) -> None:
    ndim = len(shape) - 2
    patches = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    original = patches.clone()
    masked, loss_mask = _call_masking(spec, strategy, patches, seed=0)
    where = f"patches {shape}"
    _require(torch.equal(patches, original), spec, f"{where}: modified its input in place")
    _require(tuple(masked.shape) == shape, spec, f"{where}: masked input has shape {tuple(masked.shape)}")
    _require(tuple(loss_mask.shape) == shape, spec, f"{where}: loss mask has shape {tuple(loss_mask.shape)}")
    _require(masked.dtype == patches.dtype, spec, f"{where}: masked input is {masked.dtype}, not {patches.dtype}")
    _require(loss_mask.dtype == torch.bool, spec, f"{where}: loss mask is {loss_mask.dtype}, not torch.bool")
    _require(
        masked.device == device and loss_mask.device == device,
        spec,
        f"{where}: outputs on {masked.device}/{loss_mask.device}, input on {device}",
    )
    _require(bool(torch.isfinite(masked).all()), spec, f"{where}: masked input has NaN or inf")

    fraction = float(loss_mask.float().mean())
    _require(0 < fraction <= 0.5, spec, f"{where}: blind-spot fraction {fraction:.4f} not in (0, 0.5]")
    if expected_fraction is not None:
        _require(
            abs(fraction - expected_fraction) <= tolerance * expected_fraction,
            spec,
            f"{where}: blind-spot fraction {fraction:.4f}, expected {expected_fraction:.4f}",
        )
    per_plane = loss_mask.flatten(2).sum(dim=2)
    _require(bool((per_plane > 0).all()), spec, f"{where}: some patch/channel has no blind spot")
    for axis in range(ndim):
        size = shape[2 + axis]
        profile = loss_mask.float().movedim(2 + axis, 0).reshape(size, -1).sum(dim=1)
        _require(
            bool(profile[: size // 2].sum() > 0 and profile[size // 2 :].sum() > 0),
            spec,
            f"{where}: blind spots do not reach both halves of spatial axis {axis}",
        )
    hidden = float((masked[loss_mask] != patches[loss_mask]).float().mean())
    _require(hidden >= 0.5, spec, f"{where}: only {hidden:.0%} of blind spots have a changed input value")

    pool = nn.functional.max_pool2d if ndim == 2 else nn.functional.max_pool3d
    size = 2 * untouched_distance + 1
    flat = loss_mask.float().flatten(0, 1).unsqueeze(1)
    near = pool(flat, size, stride=1, padding=untouched_distance).view(shape) > 0
    far = ~near
    _require(
        torch.equal(masked[far], patches[far]),
        spec,
        f"{where}: pixels farther than {untouched_distance} from every blind spot were changed",
    )
    untouched = float((masked == patches).float().mean())
    _require(untouched >= 0.5, spec, f"{where}: only {untouched:.0%} of the pixels are left untouched")

    again_masked, again_mask = _call_masking(spec, strategy, patches, seed=0)
    _require(
        torch.equal(again_masked, masked) and torch.equal(again_mask, loss_mask),
        spec,
        f"{where}: the same generator seed gives a different result (not deterministic)",
    )
    _, other_mask = _call_masking(spec, strategy, patches, seed=12345)
    _require(not torch.equal(other_mask, loss_mask), spec, f"{where}: a different seed gives the same blind spots")
    unseeded_masked, unseeded_mask = _call_masking(spec, strategy, patches, seed=None)
    _require(
        tuple(unseeded_masked.shape) == shape and unseeded_mask.dtype == torch.bool,
        spec,
        f"{where}: generator=None gives wrong outputs",
    )


# --------------------------------------------------------------------------- heads


def _hand_made_labels(ndim: int) -> np.ndarray:
    """Three separate box objects (labels 1, 2, 5: not consecutive on purpose) in background."""
    if ndim == 2:
        labels = np.zeros((40, 48), dtype=np.uint16)
        labels[4:14, 4:16] = 1
        labels[4:16, 26:40] = 2
        labels[24:34, 8:40] = 5
    else:
        labels = np.zeros((16, 28, 32), dtype=np.uint16)
        labels[3:11, 3:11, 3:11] = 1
        labels[3:12, 3:12, 18:28] = 2
        labels[4:12, 17:25, 6:26] = 5
    return labels


def check_head(
    component: str | HeadSpec | RegisteredComponent,
    *,
    params: ComponentParams | dict | None = None,
    ndims: Sequence[int] = (2, 3),
    registry: Registry | None = None,
) -> None:
    """The whole life of a segmentation head, on a hand-made label image (three separate
    objects, non-consecutive ids, 2D and 3D).

    * outputs: one described channel (name, role, meaning) per segmentation channel;
    * targets: of the dtype and shape the head declares (``target``), the label image left
      unmodified, the same on background far from objects and different inside objects,
      class indices in range when they are class indices (an integer target without channels);
    * loss: a differentiable zero for a batch without labelled patches, positive for a
      labelled one, ignoring unlabelled patches;
    * activation: scriptable, shape-preserving, ``probability`` channels in [0, 1], and the
      described ``activation_code`` (what an exporter writes) computes the same;
    * instance settings: a strict, documented pydantic model whose primary field takes a
      threshold in (0, 1);
    * instances and tuning: logits fitted to the targets by minimising the head's own loss
      (which must lower it) give integer instances matching the three objects (IoU > 0.5)
      with the default and with the tuned settings; outputs fitted to an empty label image
      give no instance;
    * the README paragraph and the optional ImageJ macro render with the default settings.
    """
    spec: HeadSpec = resolve_spec("head", component, registry)
    params = check_params(spec, params)
    head = spec.build(params)
    n_channels = head.num_classes
    _require(isinstance(n_channels, int) and n_channels >= 1, spec, f"num_classes must be an int >= 1, got {n_channels!r}")
    outputs = head.outputs()
    _require(isinstance(outputs, HeadOutputs), spec, f"outputs() returned {type(outputs).__name__}, not HeadOutputs")
    _require(len(outputs.channels) == n_channels, spec, f"outputs() describes {len(outputs.channels)} channels, num_classes is {n_channels}")
    for channel in outputs.channels:
        _require(channel.name.isidentifier(), spec, f"channel name {channel.name!r} is not an identifier")
        _require(channel.role in CHANNEL_ROLES, spec, f"channel {channel.name!r}: role {channel.role!r} is not one of {CHANNEL_ROLES}")
        _require(bool(channel.description), spec, f"channel {channel.name!r} has no description")
    _require(len({c.name for c in outputs.channels}) == n_channels, spec, "channel names are not unique")
    _require(isinstance(head.target, TargetSpec), spec, f"target must be a TargetSpec, got {head.target!r}")
    settings = _check_settings_model(spec, head)
    _check_activation(spec, head, outputs)
    for ndim in ndims:
        labels = _hand_made_labels(ndim)
        targets = _check_targets(spec, head, labels)
        _check_loss(spec, head, targets)
        fitted = _fitted_outputs(spec, head, targets)
        _check_instances(spec, head, labels, fitted, settings, "default settings")
        tuning = head.tune([fitted], [labels])
        _require(isinstance(tuning.settings, head.settings), spec, f"{ndim}D: tune() returned settings of {type(tuning.settings).__name__}")
        _require(
            bool(tuning.table) and tuning.score == max(score for _, score in tuning.table),
            spec,
            f"{ndim}D: tune() must report the candidates it tried and pick the best-scoring one",
        )
        _check_instances(spec, head, labels, fitted, tuning.settings, "tuned settings")
        empty = _fitted_outputs(spec, head, head.targets(np.zeros_like(labels)))
        nothing = head.instances(empty, settings)
        _require(not np.any(nothing), spec, f"{ndim}D instances: outputs fitted to an empty label image gave instances")
    text = head.instances_text(settings)
    _require(isinstance(text, str) and bool(text.strip()), spec, "instances_text() must describe how instances are made")
    macro = head.imagej_macro(settings, 1)
    _require(macro is None or (isinstance(macro, str) and bool(macro.strip())), spec, "imagej_macro() must return None or the macro")


def _check_settings_model(spec: HeadSpec, head: Any) -> InstanceSettings:
    model = head.settings
    _require(
        isinstance(model, type) and issubclass(model, InstanceSettings),
        spec,
        f"settings must be an InstanceSettings subclass, got {model!r}",
    )
    try:
        settings = model()
    except ValidationError as exc:
        raise ConformanceError(f"head {spec.name!r}: default instance settings do not validate: {exc}") from None
    _require_strict_model(model, settings, spec, "instance setting", "instance settings accept unknown keys")
    _require(model.model_validate_json(settings.model_dump_json()) == settings, spec, "instance settings do not survive JSON")
    _require(model.primary in model.model_fields, spec, f"primary {model.primary!r} is not an instance setting")
    _require(
        0 < settings.primary_threshold < 1 and settings.with_threshold(0.25).primary_threshold == 0.25,
        spec,
        f"the primary setting {model.primary!r} must take a threshold in (0, 1)",
    )
    return settings


def _check_targets(spec: HeadSpec, head: Any, labels: np.ndarray) -> np.ndarray:
    original = labels.copy()
    targets = head.targets(labels)
    where = f"{labels.ndim}D labels"
    declared = head.target
    _require(np.array_equal(labels, original), spec, f"{where}: targets() modified the label image")
    _require(isinstance(targets, np.ndarray), spec, f"{where}: targets() returned {type(targets).__name__}")
    _require(
        targets.shape == declared.shape(labels.shape),
        spec,
        f"{where}: targets shape {targets.shape}, the head declares {declared.shape(labels.shape)}",
    )
    _require(
        targets.dtype == np.dtype(declared.dtype), spec, f"{where}: targets dtype {targets.dtype}, the head declares {declared.dtype}"
    )
    if declared.channels is None and np.issubdtype(targets.dtype, np.integer):  # class indices
        _require(
            targets.min() >= 0 and targets.max() < head.num_classes,
            spec,
            f"{where}: target classes outside [0, {head.num_classes})",
        )
    from scipy import ndimage

    far_background = ~ndimage.binary_dilation(labels > 0, iterations=3)
    interior = ndimage.binary_erosion(labels > 0, iterations=3)
    per_pixel = targets.reshape(-1, *labels.shape)  # (channels or 1, *spatial)
    background_values = np.unique(per_pixel[:, far_background], axis=1)
    _require(
        background_values.shape[1] == 1, spec, f"{where}: background far from objects has {background_values.shape[1]} different targets"
    )
    _require(
        not np.all(per_pixel[:, interior] == background_values, axis=0).any(),
        spec,
        f"{where}: object interiors get the background's target",
    )
    other = head.targets(labels.astype(np.int32))
    _require(np.array_equal(other, targets), spec, f"{where}: targets depend on the label dtype")
    return targets


def _check_loss(spec: HeadSpec, head: Any, targets: np.ndarray) -> None:
    spatial = _target_spatial_shape(targets, head)
    where = f"{len(spatial)}D loss"
    batch_targets = torch.from_numpy(np.stack([targets, targets]))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((2, head.num_classes, *spatial), generator=generator).requires_grad_(True)

    loss = head.loss(logits, batch_targets, torch.tensor([False, False]))
    _require(isinstance(loss, torch.Tensor) and loss.ndim == 0, spec, f"{where}: loss must be a scalar tensor")
    _require(
        float(loss.detach()) == 0.0, spec, f"{where}: loss of an unlabelled batch is {float(loss.detach())}, expected 0"
    )
    _require(loss.requires_grad, spec, f"{where}: loss of an unlabelled batch is not part of the graph")
    loss.backward()
    _require(
        logits.grad is not None and not logits.grad.abs().sum(),
        spec,
        f"{where}: an unlabelled batch must give a zero gradient",
    )

    logits.grad = None
    loss = head.loss(logits, batch_targets, torch.tensor([True, False]))
    _require(
        bool(torch.isfinite(loss)) and float(loss.detach()) > 0,
        spec,
        f"{where}: loss of a labelled patch is {float(loss.detach())}",
    )
    loss.backward()
    _require(bool(logits.grad[0].abs().sum() > 0), spec, f"{where}: no gradient reaches the labelled patch")
    _require(not logits.grad[1].abs().sum(), spec, f"{where}: the unlabelled patch contributes to the gradient")


def _target_spatial_shape(targets: np.ndarray, head: Any) -> tuple[int, ...]:
    """The spatial shape of one image's targets."""
    return targets.shape if head.target.channels is None else targets.shape[1:]


#: sign-gradient steps when fitting free logits to targets (logits move up to 6, enough for near-perfect outputs)
_FIT_STEPS = 60


def _fitted_outputs(spec: HeadSpec, head: Any, targets: np.ndarray) -> np.ndarray:
    """Activated outputs ``(channels, *spatial)`` of free per-pixel logits fitted to ``targets``
    by minimising the head's loss: what a perfectly trained network would give."""
    spatial = _target_spatial_shape(targets, head)
    batch = torch.from_numpy(targets[None])
    labelled = torch.tensor([True])
    logits = torch.zeros((1, head.num_classes, *spatial), requires_grad=True)
    with torch.no_grad():
        start = float(head.loss(logits, batch, labelled))
    # Every pixel's logits are free, so each follows the sign of its own gradient (a mean over
    # pixels makes plain gradient steps tiny); the step shrinks so soft targets are met closely.
    for step in range(_FIT_STEPS):
        (gradient,) = torch.autograd.grad(head.loss(logits, batch, labelled), logits)
        with torch.no_grad():
            logits -= 0.2 * (1 - step / _FIT_STEPS) * gradient.sign()
    with torch.no_grad():
        final = float(head.loss(logits, batch, labelled))
    _require(final < 0.5 * start, spec, f"{len(spatial)}D loss: fitting logits to the targets lowers the loss only from {start:.4g} to {final:.4g}")
    with torch.no_grad():
        return head.activation()(logits.detach())[0].numpy()


def _check_activation(spec: HeadSpec, head: Any, outputs: HeadOutputs) -> None:
    activation = head.activation()
    _require(isinstance(activation, nn.Module), spec, f"activation() returned {type(activation).__name__}")
    try:
        scripted = torch.jit.script(activation)
    except Exception as exc:
        raise ConformanceError(
            f"head {spec.name!r}: activation is not scriptable: {type(exc).__name__}: {exc}"
        ) from None
    probability = [i for i, c in enumerate(outputs.channels) if c.role == "probability"]
    for spatial in ((6, 7), (3, 4, 5)):
        logits = torch.randn(2, head.num_classes, *spatial) * 5
        with torch.no_grad():
            activated = activation(logits)
            _require(tuple(activated.shape) == tuple(logits.shape), spec, "activation changes the shape")
            chosen = activated[:, probability]
            _require(
                bool((chosen >= 0).all() and (chosen <= 1).all()),
                spec,
                "activation output of a probability channel is not in [0, 1]",
            )
            _require(_close(scripted(logits), activated), spec, "scripted activation differs from eager")
            try:
                # the expression an exporter writes into the architecture file, evaluated as there
                coded = eval(outputs.activation_code, {"torch": torch}, {"segmentation": logits})  # noqa: S307
            except Exception as exc:
                raise ConformanceError(
                    f"head {spec.name!r}: activation_code {outputs.activation_code!r} fails: {type(exc).__name__}: {exc}"
                ) from None
            _require(
                isinstance(coded, torch.Tensor) and _close(coded, activated),
                spec,
                f"activation_code {outputs.activation_code!r} computes something else than activation()",
            )


def _check_instances(
    spec: HeadSpec, head: Any, labels: np.ndarray, outputs: np.ndarray, settings: InstanceSettings, which: str
) -> None:
    where = f"{labels.ndim}D instances ({which})"
    instances = head.instances(outputs, settings)
    _require(isinstance(instances, np.ndarray), spec, f"{where}: instances() returned {type(instances).__name__}")
    _require(instances.shape == labels.shape, spec, f"{where}: shape {instances.shape}, expected {labels.shape}")
    _require(
        np.issubdtype(instances.dtype, np.integer), spec, f"{where}: dtype {instances.dtype} is not an integer type"
    )
    _require(instances.min() >= 0, spec, f"{where}: negative instance labels")
    found = sorted(set(np.unique(instances).tolist()) - {0})
    truth = sorted(set(np.unique(labels).tolist()) - {0})
    _require(
        len(found) == len(truth),
        spec,
        f"{where}: outputs fitted to the targets gave {len(found)} instances, expected {len(truth)}",
    )
    for label in truth:
        obj = labels == label
        ids, counts = np.unique(instances[obj], return_counts=True)
        best = ids[np.argmax(counts)]
        iou = np.sum(obj & (instances == best)) / np.sum(obj | (instances == best))
        _require(best != 0 and iou > 0.5, spec, f"{where}: object {label} is not recovered (IoU {iou:.2f})")


# --------------------------------------------------------------------------- semi-supervised objectives


def check_semi_supervised(
    component: str | SemiSupervisedSpec | RegisteredComponent,
    *,
    params: ComponentParams | dict | None = None,
    head: str = "three_class",
    shapes: Sequence[tuple[int, ...]] = ((4, 1, 16, 16), (2, 1, 8, 16, 16)),
    registry: Registry | None = None,
) -> None:
    """Contract of a semi-supervised objective, with the built-in ``head``'s activation.

    For 2D and 3D batches: a finite scalar that is differentiable with respect to the student's
    logits; (about) zero when the student already agrees with a teacher that maps every pixel on
    its own (so rotating or flipping a view cannot matter), compared with a student that
    disagrees, which must cost more than zero and get a gradient; and unchanged input tensors.
    """
    spec = resolve_spec("semi_supervised", component, registry)
    objective = spec.build(check_params(spec, params))
    seg_head = resolve_spec("head", head, registry)
    seg_head = seg_head.build(seg_head.params())
    for shape in shapes:
        torch.manual_seed(0)
        patches = torch.randn(shape)
        before = patches.clone()
        mixing = 5.0 * torch.randn(seg_head.num_classes, shape[1])  # a confident teacher

        def teacher(x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("kc,nc...->nk...", mixing, x)

        labelled = torch.zeros(shape[0], dtype=torch.bool)
        labelled[0] = True
        where = f"batch {tuple(shape)}"

        def call(student: torch.Tensor, progress: float) -> torch.Tensor:
            return objective(student_logits=student, patches=patches, labelled=labelled, teacher=teacher,
                             head=seg_head, progress=progress, generator=torch.Generator().manual_seed(1))

        disagree = torch.zeros(shape[0], seg_head.num_classes, *shape[2:], requires_grad=True)
        value = call(disagree, 1.0)
        _require(isinstance(value, torch.Tensor) and value.ndim == 0, spec, f"{where}: must return a scalar tensor")
        _require(bool(torch.isfinite(value.detach())), spec, f"{where}: non-finite value {float(value.detach())}")
        value.backward()
        far = float(value.detach())
        _require(far > 0 and disagree.grad is not None and float(disagree.grad.abs().sum()) > 0,
                 spec, f"{where}: a disagreeing student must cost > 0 and get a gradient")
        # agreement may cost a little (e.g. noise the objective adds to the teacher's view), never much
        near = float(call(teacher(patches).detach(), 1.0))
        _require(near < 0.1 * far, spec,
                 f"{where}: a student that agrees with a pixel-wise teacher must cost ~0, got {near:.4g} (disagreeing: {far:.4g})")
        _require(torch.equal(patches, before), spec, f"{where}: the input patches were modified")


# --------------------------------------------------------------------------- helpers


def check_component(component: RegisteredComponent | ComponentSpec, **kwargs: Any) -> None:
    """Run the conformance checks matching the component's kind."""
    spec = component.spec if isinstance(component, RegisteredComponent) else component
    checks = {"backbone": check_backbone, "masking": check_masking, "head": check_head,
              "semi_supervised": check_semi_supervised}
    checks[spec.kind](spec, **kwargs)


def parametrize_components(kind: str | None = None, *, argname: str = "component", registry: Registry | None = None):
    """``pytest.mark.parametrize`` over every registered component (of ``kind``), ids = names.

    With ``kind=None`` all kinds are included and ids read ``backbone-unet``,
    ``masking-n2v``, ... so ``pytest -k unet`` selects by name.
    """
    import pytest

    registry = registry or get_registry()
    components = registry.components(kind)
    ids = [comp.name if kind else f"{comp.kind}-{comp.name}" for comp in components]
    return pytest.mark.parametrize(argname, components, ids=ids)
