"""The conformance kit over every registered component (timm-style), and proof that it bites.

The first tests are parametrised over whatever the ``denoiseg.plugins`` entry points
register, so a new plugin gets the same checks without a line of test code (ids are the
component names: ``pytest -k res_unet``). The rest feed the kit deliberately broken
components and assert that it rejects each with a message naming the rule.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from denoiseg_core import exportability
from denoiseg_core.components import (
    ArchitectureSource,
    BackboneSpec,
    ComponentParams,
    HeadSpec,
    MaskingSpec,
    NoParams,
)
from denoiseg_core.errors import DenoiSegError
from denoiseg_core.testing import (
    ConformanceError,
    check_architecture_source,
    check_backbone,
    check_backbone_export,
    check_backbone_halo,
    check_head,
    check_masking,
    check_params,
    check_semi_supervised,
    parametrize_components,
)
from denoiseg_plugins.n2v_masking import N2VMasking
from denoiseg_plugins.class_heads import ForegroundThreshold
from denoiseg_plugins.three_class_head import ThreeClassHead


@parametrize_components("backbone")
def test_backbone_conformance(component):
    check_backbone(component)


@parametrize_components("masking")
def test_masking_conformance(component):
    check_masking(component)


@parametrize_components("head")
def test_head_conformance(component):
    check_head(component)


@parametrize_components("semi_supervised")
def test_semi_supervised_conformance(component):
    check_semi_supervised(component)


def test_mean_teacher_pseudo_label_mode_conforms():
    check_semi_supervised("mean_teacher", params={"loss": "cross_entropy", "confidence": 0.9})


def test_semi_supervised_check_bites():
    """An objective that ignores the teacher (pulls towards a constant) is caught."""
    from denoiseg_core.components import NoParams, SemiSupervisedSpec

    def build(_params):
        def objective(*, student_logits, **_):
            return (student_logits.float() - 1.0).pow(2).mean()

        return objective

    with pytest.raises(ConformanceError, match="agrees with a pixel-wise teacher"):
        check_semi_supervised(SemiSupervisedSpec(name="bad", params=NoParams, build=build))


def test_parametrize_covers_every_kind_with_name_ids(registry):
    mark = parametrize_components()
    argname, components = mark.args[:2]
    assert argname == "component"
    assert {(c.kind, c.name) for c in components} == {(c.kind, c.name) for c in registry.components()}
    assert "backbone-unet" in mark.kwargs["ids"] and "head-three_class" in mark.kwargs["ids"]


#: hooks that are not component registrations, each exercised by its own test: the commands
#: hook below; the package hooks in test_core_boundaries.py (and `train --init-from MODEL.zip`
#: in test_reliability_zoo.py)
HOOKS_WITH_THEIR_OWN_TESTS = {"denoiseg_register_commands", "denoiseg_read_package_weights", "denoiseg_export_package"}


def test_every_hook_is_documented_implemented_and_exercised(registry):
    """Meta-test: a new hook must come with docs, an implementation and conformance coverage."""
    import inspect
    from pathlib import Path

    from denoiseg_core import hookspecs
    from denoiseg_core.cli import build_app
    from denoiseg_core.plugin_manager import KINDS, get_plugin_manager

    hooks = {name: f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("denoiseg_")}
    guide = (Path(__file__).resolve().parents[1] / "plugins" / "example_plugin" / "README.md").read_text()
    pm = get_plugin_manager()
    register_hooks = {hook_name: kind for kind, (hook_name, _) in KINDS.items()}
    for name, function in hooks.items():
        assert inspect.getdoc(function), f"hook {name} has no docstring"
        assert name in guide, f"hook {name} is not explained in the 'Writing a plugin' guide"
        assert getattr(pm.hook, name).get_hookimpls(), f"no installed plugin implements {name}"
        if name in register_hooks:  # component hooks: the parametrised conformance tests above cover them
            assert registry.components(register_hooks[name]), f"{name} registers nothing"
        else:
            assert name in HOOKS_WITH_THEIR_OWN_TESTS, f"hook {name} has no test; add one"
    assert set(register_hooks) | HOOKS_WITH_THEIR_OWN_TESTS == set(hooks)
    # The commands hook: the zoo command group arrives through it.
    assert "zoo" in {group.name for group in build_app().registered_groups}


@pytest.mark.parametrize(("name", "percentage"), [("n2v", 1.5), ("n2v2", 1.5), ("struct_n2v", 1.5), ("n2v2", 5.0)])
def test_built_in_masking_fraction_matches_percentage(name, percentage):
    shapes = [(8, 1, 64, 64), (2, 1, 16, 32, 32)]
    check_masking(name, params={"percentage": percentage}, shapes=shapes, expected_fraction=percentage / 100)


# --------------------------------------------------------------------------- the kit bites


class _WidthParams(ComponentParams):
    width: int = Field(4, ge=1, description="feature channels")


class _Stack(nn.Module):
    """``blocks`` 3x3 convolutions at full resolution: the receptive-field radius is ``blocks``."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, width: int = 4, blocks: int = 3):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        layers = [conv(in_channels, width, 3, padding=1)]
        layers += [conv(width, width, 3, padding=1) for _ in range(blocks - 2)]
        layers += [conv(width, out_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _backbone(**overrides) -> BackboneSpec:
    fields = {
        "name": "stack",
        "params": _WidthParams,
        "build": lambda p, *, ndim, in_channels, out_channels: _Stack(ndim, in_channels, out_channels, p.width),
        "size_divisor": lambda p: 1,
        "halo": lambda p: 3,
    }
    fields.update(overrides)
    return BackboneSpec(**fields)


def test_a_well_behaved_backbone_passes():
    check_backbone(_backbone(), torchscript=False, onnx=False)


def test_wrong_output_channels_are_caught():
    spec = _backbone(build=lambda p, *, ndim, in_channels, out_channels: _Stack(ndim, in_channels, 1, p.width))
    with pytest.raises(ConformanceError, match="backbone 'stack'.*expected"):
        check_backbone(spec, torchscript=False, onnx=False, halo=False)


def test_too_small_halo_is_caught():
    with pytest.raises(ConformanceError, match="halo 1 is too small"):
        check_backbone_halo(_backbone(halo=lambda p: 1))


def test_unused_parameters_are_caught():
    class WithSpare(_Stack):
        def __init__(self, *args):
            super().__init__(*args)
            self.spare = nn.Conv2d(1, 1, 1)

    spec = _backbone(build=lambda p, *, ndim, in_channels, out_channels: WithSpare(ndim, in_channels, out_channels))
    with pytest.raises(ConformanceError, match="no gradient reaches.*spare"):
        check_backbone(spec, ndims=[2], torchscript=False, onnx=False, halo=False)


def test_backbone_neither_scriptable_nor_traceable_is_caught():
    class SizeBound(_Stack):
        def __init__(self, *args):
            super().__init__(*args)
            self.scale = lambda t: t * int(t.shape[-1])  # no scripting of a lambda; a trace bakes in the size

        def forward(self, x):
            return self.scale(self.layers(x))

    spec = _backbone(build=lambda p, *, ndim, in_channels, out_channels: SizeBound(ndim, in_channels, out_channels))
    with pytest.raises(ConformanceError, match=r"cannot be exported to TorchScript: scripting failed .* and tracing failed .*computes something else"):
        check_backbone(spec, ndims=[2], onnx=False, halo=False)


class _Antialiased(_Stack):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)
        return self.layers(nn.functional.interpolate(half, scale_factor=2.0, mode="nearest"))


def test_the_kit_refuses_what_the_exporter_refuses_with_its_words():
    """One definition of exportability: the kit's verdict is the exporter's."""
    spec = _backbone(build=lambda p, *, ndim, in_channels, out_channels: _Antialiased(ndim, in_channels, out_channels), size_divisor=lambda p: 2)
    net = spec.build(_WidthParams(), ndim=2, in_channels=2, out_channels=5).eval()
    with pytest.raises(DenoiSegError) as by_exporter:
        exportability.export_torchscript(net, torch.randn(1, 2, 8, 10), "stack", step=2)
    with pytest.raises(ConformanceError) as by_kit:
        check_backbone_export(spec, net=net, onnx=False)
    assert "aten::_upsample_bilinear2d_aa" in str(by_exporter.value)
    assert str(by_exporter.value) in str(by_kit.value)


def test_params_must_forbid_unknown_keys_and_survive_dumping():
    class Loose(BaseModel):
        width: int = Field(4, description="width")

    with pytest.raises(ConformanceError, match="ComponentParams"):
        check_params(_backbone(params=Loose))

    class Undocumented(ComponentParams):
        width: int = 4

    with pytest.raises(ConformanceError, match="'width' has no description"):
        check_params(_backbone(params=Undocumented))

    class Required(ComponentParams):
        width: int = Field(description="no default")

    with pytest.raises(ConformanceError, match="default parameters do not validate"):
        check_params(_backbone(params=Required))


def test_architecture_file_must_be_self_contained(tmp_path):
    source = tmp_path / "arch.py"
    source.write_text("import numpy\nimport torch\nfrom denoiseg_core import components\n")
    spec = _backbone(architecture=ArchitectureSource(file=source, callable_name="Net", kwargs=lambda *a: {}))
    with pytest.raises(ConformanceError, match=r"arch.py is not self-contained \(it imports denoiseg_core, numpy;"):
        check_architecture_source(spec)


def test_architecture_file_must_rebuild_the_same_network(tmp_path):
    source = tmp_path / "arch.py"
    source.write_text(
        "import torch\n\nclass Net(torch.nn.Module):\n"
        "    def __init__(self, channels):\n        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(channels, channels, 1)\n"
        "    def forward(self, x):\n        return self.conv(x)\n"
    )
    spec = _backbone(
        architecture=ArchitectureSource(file=source, callable_name="Net", kwargs=lambda p, nd, i, o: {"channels": i})
    )
    with pytest.raises(ConformanceError, match="the weights do not fit Net of its architecture source"):
        check_architecture_source(spec)


def _masking(call) -> MaskingSpec:
    return MaskingSpec(name="broken", params=NoParams, build=lambda p: call)


def test_masking_that_edits_its_input_is_caught():
    n2v = N2VMasking()

    def in_place(patches, generator=None):
        masked, mask = n2v(patches, generator)
        patches.copy_(masked)
        return masked, mask

    with pytest.raises(ConformanceError, match="modified its input in place"):
        check_masking(_masking(in_place))


def test_masking_that_touches_far_pixels_is_caught():
    n2v = N2VMasking()

    def noisy(patches, generator=None):
        masked, mask = n2v(patches, generator)
        return masked + 0.01, mask

    with pytest.raises(ConformanceError, match="farther than 4 from every blind spot were changed"):
        check_masking(_masking(noisy))


def test_masking_that_ignores_the_generator_is_caught():
    n2v = N2VMasking()
    with pytest.raises(ConformanceError, match="same generator seed gives a different result"):
        check_masking(_masking(lambda patches, generator=None: n2v(patches, None)))


def test_masking_that_does_not_hide_the_blind_spots_is_caught():
    n2v = N2VMasking()

    def unhidden(patches, generator=None):
        _, mask = n2v(patches, generator)
        return patches.clone(), mask

    with pytest.raises(ConformanceError, match="of blind spots have a changed input value"):
        check_masking(_masking(unhidden))


def test_masking_fraction_is_checked_against_expectation():
    with pytest.raises(ConformanceError, match="blind-spot fraction"):
        check_masking("n2v", expected_fraction=0.05)


class _LeakyHead(ThreeClassHead):
    """Counts unlabelled patches in the loss: the contract says they must not count."""

    def loss(self, logits, targets, labelled):
        return nn.functional.cross_entropy(logits, targets)


class _FloatInstancesHead(ThreeClassHead):
    def instances(self, probabilities, settings):
        return super().instances(probabilities, settings).astype(np.float32)


class _MergingHead(ThreeClassHead):
    """Returns one instance for all foreground."""

    def instances(self, probabilities, settings):
        return (probabilities[1] > settings.threshold).astype(np.int32)


class _WrongActivationCodeHead(ThreeClassHead):
    """Describes an activation for the exporter that is not the one it trains with."""

    def outputs(self):
        return dataclasses.replace(super().outputs(), activation_code="torch.sigmoid(segmentation)")


class _UndeclaredTargetHead(ThreeClassHead):
    """Returns float targets while declaring int64 ones (the patch sampler allocates the declared)."""

    def targets(self, labels):
        return super().targets(labels).astype(np.float32)


class _LooseSettings(ForegroundThreshold):
    model_config = ConfigDict(extra="allow")


class _LooseSettingsHead(ThreeClassHead):
    settings = _LooseSettings


class _BlindTuningHead(ThreeClassHead):
    """Claims a better score than any candidate it tried reached."""

    def tune(self, outputs, labels, *, quick=False):
        return dataclasses.replace(super().tune(outputs, labels, quick=quick), score=2.0)


@pytest.mark.parametrize(
    ("head_cls", "message"),
    [
        (_LeakyHead, "loss of an unlabelled batch is"),
        (_FloatInstancesHead, "is not an integer type"),
        (_MergingHead, "gave 1 instances, expected 3"),
        (_WrongActivationCodeHead, "computes something else than activation"),
        (_UndeclaredTargetHead, "targets dtype float32, the head declares int64"),
        (_LooseSettingsHead, "instance settings accept unknown keys"),
        (_BlindTuningHead, "must report the candidates it tried and pick the best-scoring one"),
    ],
)
def test_broken_heads_are_caught(head_cls, message):
    spec = HeadSpec(name="broken", params=NoParams, build=lambda p: head_cls())
    with pytest.raises(ConformanceError, match=message):
        check_head(spec, ndims=[2])


def test_component_given_by_name_or_spec(registry):
    spec = registry.spec("head", "two_class")
    check_head("two_class", ndims=[2])
    check_head(spec, ndims=[2])
    check_head(registry.get("head", "two_class"), params={"split_depth": 3.0}, ndims=[2])
    with pytest.raises(ConformanceError, match="expected a HeadSpec"):
        check_head(registry.spec("masking", "n2v"))
