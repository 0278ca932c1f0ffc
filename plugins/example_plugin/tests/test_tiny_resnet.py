"""The example plugin's own tests: denoiseg's conformance kit does the work."""

from denoiseg_core.plugin_manager import get_registry
from denoiseg_core.testing import check_backbone, check_head


def test_tiny_resnet_is_registered_by_this_distribution():
    component = get_registry().get("backbone", "tiny_resnet")
    assert component.distribution == "denoiseg-example-plugin"


def test_tiny_resnet_conforms():
    check_backbone("tiny_resnet")  # shapes 2D/3D, halo, TorchScript, ONNX, architecture file


def test_tiny_resnet_conforms_with_other_params():
    check_backbone("tiny_resnet", params={"width": 4, "blocks": 1, "kernel_size": 5}, onnx=False)


def test_distance_map_head_conforms():
    check_head("distance_map")  # targets, loss, activation (and its exported code), settings, tuning, instances
