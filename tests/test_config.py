"""The strict config: unknown keys rejected, overrides, component parameter validation."""

from __future__ import annotations

import pytest

from denoiseg_core.config import DenoiSegConfig, load_config, save_config, validate_components
from denoiseg_core.errors import ConfigError


def test_defaults_are_the_papers():
    config = load_config(None)
    assert config.training.alpha == 0.5
    assert config.training.batch_size == 128
    assert config.training.learning_rate == 4e-4
    assert config.data.patch_size == [64, 64]
    params = validate_components(config)
    assert (params["backbone"].depth, params["backbone"].first_filters, params["backbone"].kernel_size) == (4, 32, 3)
    assert params["backbone"].batch_norm is True
    assert (params["masking"].percentage, params["masking"].radius) == (1.5, 5)
    assert tuple(params["head"].class_weights) == (1, 1, 5)


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        ("trainig:\n  epochs: 3\n", "trainig: unknown key"),
        ("training:\n  epochz: 3\n", "training.epochz: unknown key"),
        ("training:\n  alpha: 1.5\n", "training.alpha"),
        ("data:\n  patch_size: [64]\n", "patch_size"),
    ],
)
def test_bad_keys_and_values_are_rejected_with_their_location(tmp_path, yaml_text, fragment):
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert fragment in message and str(path) in message
    assert "\n" not in message


def test_unknown_component_parameter_is_rejected():
    config = load_config(None, ["model.backbone.params.deepth=3"])
    with pytest.raises(ConfigError, match="deepth: unknown key"):
        validate_components(config)


def test_unknown_component_lists_what_is_installed():
    config = load_config(None, ["model.head.name=four_class"])
    with pytest.raises(ConfigError, match="unknown head 'four_class'; installed head components: .*three_class"):
        validate_components(config)


def test_overrides_parse_yaml_values_and_create_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: 3\n")
    config = load_config(path, ["training.epochs=7", "data.patch_size=[32, 32]", "model.backbone.params.depth=2"])
    assert config.training.epochs == 7
    assert config.data.patch_size == [32, 32]
    assert config.model.backbone.params == {"depth": 2}


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["training.epochs"])


def test_relative_data_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.yaml"
    path.write_text("data:\n  train: mydata\n")
    assert load_config(path).data.train == (tmp_path / "sub" / "mydata").resolve()


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, ["training.epochs=5", "seed=3"])
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == DenoiSegConfig.model_validate(config.model_dump(mode="json"))


def test_config_init_writes_a_commented_config_that_loads_as_the_defaults(tmp_path, capsys):
    from denoiseg_core.cli import main

    path = tmp_path / "c.yaml"
    with pytest.raises(SystemExit) as info:
        main(["config", "init", str(path)])
    assert info.value.code in (0, None)
    text = path.read_text()
    assert "# loss = alpha * denoising" in text
    assert load_config(path) == load_config(None)
    with pytest.raises(SystemExit) as info:  # never clobbers an existing file
        main(["config", "init", str(path)])
    assert info.value.code == 2 and "exists" in capsys.readouterr().err
