"""Fixtures for the pruning tests: narrow copies of real cfgs, 1x1-only graphs, sparse BN patterns built in code."""
import copy
import math

import torch

from tests.helpers import ANCHORS6, conv, yolo
from utils.parse_config import infer_shapes, layer_inputs, parse_cfg, yolo_masks


def narrow_defs(path, nc=3, div=8, height=96, width=128):
    """`path`'s cfg for `nc` classes with every non-head conv's filters divided by `div` (rounded up, so equal
    widths stay equal and shortcuts still add), at height x width: the same graph, a fraction of the compute."""
    defs = copy.deepcopy(parse_cfg(path))
    defs[0]['height'], defs[0]['width'] = height, width
    heads = set()
    for i, d in enumerate(defs[1:]):
        if d['type'] == 'yolo':
            src = layer_inputs(defs, i)[0]
            heads.add(src)
            defs[src + 1]['filters'] = len(yolo_masks(d)) * (nc + 5)
            d['classes'] = nc
    for i, d in enumerate(defs[1:]):
        if d['type'] == 'convolutional' and i not in heads:
            d['filters'] = max(2, math.ceil(d['filters'] / div))
    infer_shapes(defs)
    return defs


def one_by_one_cfg(nc=2, width=64, height=64):
    """Every consumer of a prunable conv is 1x1 (or a shortcut / route / maxpool / upsample leading to 1x1), so
    folding the constant act(beta) of removed channels is exact everywhere, borders included.

    layer: 0 conv3x3/2 (reads the image) | 1 conv | 2 conv | 3 shortcut 0+2 | 4 maxpool 2/2 | 5 conv | 6 conv |
    7 upsample | 8 route 7,3 | 9 conv | 10 head | 11 yolo | 12 route 5 | 13 maxpool 2/1 | 14 conv | 15 head |
    16 yolo
    """
    s = f"[net]\nwidth={width}\nheight={height}\nchannels=3\n\n"
    s += conv(16, 3, 2)                                            # 0
    s += conv(8, 1) + conv(16, 1)                                  # 1 2
    s += "[shortcut]\nfrom=-3\nactivation=linear\n"                # 3 = 0 + 2
    s += "[maxpool]\nsize=2\nstride=2\n"                           # 4
    s += conv(24, 1) + conv(12, 1)                                 # 5 6
    s += "[upsample]\nstride=2\n"                                  # 7
    s += "[route]\nlayers=-1,3\n"                                  # 8: 12 + 16 channels
    s += conv(16, 1)                                               # 9
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')                 # 10
    s += yolo([0, 1, 2], ANCHORS6, nc)                             # 11
    s += "[route]\nlayers=5\n"                                     # 12
    s += "[maxpool]\nsize=2\nstride=1\n"                           # 13
    s += conv(20, 1)                                               # 14
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')                 # 15
    s += yolo([3, 4, 5], ANCHORS6, nc)                             # 16
    return s


def sparsify_(model, layer_set, share=0.4, seed=0, beta=0.0):
    """Zero gamma of a random `share` of each prunable layer's channels (never all of them) and set their beta
    to `beta` (a float, or 'random' for N(0, 1)). Shortcut groups get the same channels in every member, so
    the union mask removes them. Returns {layer: zeroed channel indices}."""
    g = torch.Generator().manual_seed(seed)
    grouped = {i for grp in layer_set.groups for i in grp}
    units = [list(grp) for grp in layer_set.groups] + [[i] for i in layer_set.prunable if i not in grouped]
    zeroed = {}
    with torch.no_grad():
        for unit in units:
            n = model.module_list[unit[0]][1].num_features
            k = min(n - 1, max(1, round(share * n)))
            idx = torch.randperm(n, generator=g)[:k].sort().values
            for i in unit:
                bn = model.module_list[i][1]
                bn.weight[idx] = 0
                if beta == 'random':
                    bn.bias[idx] = torch.randn(k, generator=g)
                else:
                    bn.bias[idx] = beta
                zeroed[i] = idx
    return zeroed


def raw_outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)[1]


def max_diff(a, b):
    """Largest |difference| over two lists of raw yolo outputs of equal shapes."""
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((u - v).abs().max().item() for u, v in zip(a, b))
