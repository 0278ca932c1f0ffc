"""Folding batch norms into the convolutions before them, for inference."""

from __future__ import annotations

import copy
import itertools

from torch import nn

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _foldable_pairs(net: nn.Module) -> list[tuple[nn.Sequential, str, str]]:
    """``(sequential, conv_name, bn_name)`` for each batch norm (with running statistics)
    that directly follows a convolution inside an ``nn.Sequential``."""
    pairs = []
    for module in net.modules():
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
                if isinstance(conv, _CONVOLUTIONS) and isinstance(bn, _BATCH_NORMS) and bn.track_running_stats:
                    pairs.append((module, conv_name, bn_name))
    return pairs


def fold_batch_norm(net: nn.Module) -> nn.Module:
    """For inference: a copy of an eval-mode ``net`` with every batch norm that directly
    follows a convolution (in an ``nn.Sequential``) folded into the convolution's weights.

    Same function up to float rounding, one memory pass less per convolution (measured
    about 10% faster in float32 and 20% in bf16 on CPU for the DenoiSeg U-Net). Returns
    ``net`` itself when it is training or has nothing to fold.
    """
    if net.training or not _foldable_pairs(net):
        return net
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(net)
    for sequential, conv_name, bn_name in _foldable_pairs(folded):
        conv, bn = sequential._modules[conv_name], sequential._modules[bn_name]
        sequential._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
        sequential._modules[bn_name] = nn.Identity()
    return folded
