"""Plugin discovery and the registry: built-ins via entry points, broken plugins, config errors."""

from __future__ import annotations

import json
import types

import pytest
from typer.testing import CliRunner

from denoiseg_core.components import BackboneSpec, NoParams
from denoiseg_core.config import DenoiSegConfig, validate_components
from denoiseg_core.errors import ConfigError, PluginError
from denoiseg_core.hookspecs import hookimpl
from denoiseg_core.plugin_manager import Registry, get_plugin_manager

BUILT_INS = {("backbone", "unet"), ("masking", "n2v"), ("head", "three_class")}


def test_built_ins_come_from_the_denoiseg_distribution(registry):
    found = {(c.kind, c.name): c for c in registry.components()}
    assert BUILT_INS <= set(found)
    for key in BUILT_INS:
        comp = found[key]
        assert comp.distribution == "denoiseg"
        assert comp.version
        assert comp.plugin.startswith("denoiseg_plugins.")


def _plugin_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


@pytest.mark.parametrize("marked", [True, False])
def test_misspelt_hook_is_an_error(marked):
    def denoiseg_register_backbone():  # singular: not a hook
        return []

    func = hookimpl(denoiseg_register_backbone) if marked else denoiseg_register_backbone
    plugin = _plugin_module("typo_plugin", denoiseg_register_backbone=func)
    with pytest.raises(PluginError, match="denoiseg_register_backbone"):
        Registry.from_plugin_manager(get_plugin_manager(extra_plugins=[plugin]))


def _backbone_plugin(module_name: str, backbone_name: str) -> types.ModuleType:
    @hookimpl
    def denoiseg_register_backbones():
        return [
            BackboneSpec(
                name=backbone_name,
                params=NoParams,
                build=lambda params, **kw: None,
                size_divisor=lambda p: 1,
                halo=lambda p: 0,
            )
        ]

    return _plugin_module(module_name, denoiseg_register_backbones=denoiseg_register_backbones)


def test_duplicate_backbone_name_is_an_error():
    plugin = _backbone_plugin("copycat_plugin", "unet")
    with pytest.raises(PluginError, match="duplicate backbone name 'unet'.*copycat_plugin"):
        Registry.from_plugin_manager(get_plugin_manager(extra_plugins=[plugin]))


def test_third_party_backbone_is_registered_beside_built_ins():
    registry = Registry.from_plugin_manager(get_plugin_manager(extra_plugins=[_backbone_plugin("extra", "tiny")]))
    assert {"tiny", "unet"} <= set(registry.names("backbone"))
    assert registry.get("backbone", "tiny").plugin == "extra"
    assert registry.get("backbone", "tiny").distribution is None


def test_unknown_component_lists_installed_names(registry):
    config = DenoiSegConfig.model_validate({"model": {"backbone": {"name": "resnet"}}})
    with pytest.raises(ConfigError, match="unknown backbone 'resnet'.*unet"):
        validate_components(config, registry)


def test_unknown_param_is_a_config_error(tiny_config, registry):
    config = tiny_config.model_copy(deep=True)
    config.model.backbone.params["dept"] = 3
    with pytest.raises(ConfigError, match="dept"):
        validate_components(config, registry)


def test_tiny_config_validates(tiny_config, registry):
    params = validate_components(tiny_config, registry)
    assert params["backbone"].depth == 2 and params["backbone"].first_filters == 8
    assert params["masking"].percentage == 1.5
    assert params["head"].class_weights == (1.0, 1.0, 5.0)


def test_cli_plugins_list_json():
    from denoiseg_core.cli import build_app

    result = CliRunner().invoke(build_app(), ["plugins", "list", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    by_key = {(r["kind"], r["name"]): r for r in records}
    assert BUILT_INS <= set(by_key)
    for key in BUILT_INS:
        record = by_key[key]
        assert record["distribution"] == "denoiseg"
        assert set(record) >= {"kind", "name", "plugin", "distribution", "version", "description", "params"}
    unet_params = {p["name"]: p for p in by_key[("backbone", "unet")]["params"]}
    assert unet_params["depth"]["default"] == 4 and unet_params["depth"]["type"] == "int"
    assert unet_params["depth"]["description"]
    head_params = {p["name"]: p for p in by_key[("head", "three_class")]["params"]}
    assert head_params["class_weights"]["default"] == [1.0, 1.0, 5.0]
    assert "Literal" in head_params["border_mode"]["type"]


def test_cli_plugins_list_table():
    from denoiseg_core.cli import build_app

    result = CliRunner().invoke(build_app(), ["plugins", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("unet", "n2v", "three_class", "denoiseg_plugins.unet", "depth=4", "radius=5"):
        assert text in result.stdout
