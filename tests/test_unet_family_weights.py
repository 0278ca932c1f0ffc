"""Weight names of the built-in U-Net backbones never change: checkpoints and exported
packages of every earlier version must still load (strict ``load_state_dict``)."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from denoiseg_core.plugin_manager import get_registry

#: sha256 (first 16 hex digits) of every state-dict key with its shape, in order, over
#: 2D/3D x batch norm on/off x depth 1, 2, 4 x (1 -> 4, 2 -> 5) channels at 4 first filters;
#: recorded from unet_arch.py, res_unet_arch.py and n2v2_unet_arch.py before they became one file
STATE_DICT_DIGESTS = {
    ("unet", False): "5670f43def718bdf",
    ("unet", True): "7e987e719ad6f5dd",
    ("res_unet", False): "7f2a7084e7ab070e",
    ("n2v2_unet", False): "9d1d6f05c1b512e8",
}


def state_dict_listing(backbone: str, halve_second_conv: bool) -> str:
    """Every case's state-dict keys and shapes, one ``key:shape`` line each, under a case header."""
    spec = get_registry().spec("backbone", backbone)
    lines = []
    for ndim, batch_norm, depth, (in_channels, out_channels) in itertools.product((2, 3), (True, False), (1, 2, 4), ((1, 4), (2, 5))):
        values = {"depth": depth, "first_filters": 4, "batch_norm": batch_norm}
        if halve_second_conv:
            values["halve_second_conv"] = True
        net = spec.build(spec.params(**values), ndim=ndim, in_channels=in_channels, out_channels=out_channels)
        lines.append(f"# {ndim}D batch_norm={batch_norm} depth={depth} {in_channels}->{out_channels}")
        lines += [f"{key}:{tuple(value.shape)}" for key, value in net.state_dict().items()]
    return "\n".join(lines)


@pytest.mark.parametrize(("backbone", "halve_second_conv"), list(STATE_DICT_DIGESTS))
def test_state_dict_names_and_shapes_are_those_of_earlier_versions(backbone, halve_second_conv):
    digest = hashlib.sha256(state_dict_listing(backbone, halve_second_conv).encode()).hexdigest()[:16]
    assert digest == STATE_DICT_DIGESTS[(backbone, halve_second_conv)], (
        f"{backbone} (halve_second_conv={halve_second_conv}) has other weight names or shapes than before: "
        "old checkpoints and packages would no longer load"
    )
