"""Pruning through a `[route] groups=2 group_id=1` split (the yolov4-tiny family's CSP blocks).

Darknet's grouped route passes the group_id-th of `groups` equal slices of its input's channels. A conv read
whole by such a route may lose channels only if every slice keeps the same count, so that the split still cuts
between the same two sets of channels: the plan scores each slice, keeps k = the largest count the threshold
keeps in any slice, and fills each slice with its own strongest channels. Kept counts are therefore always a
multiple of `groups` (an odd count is avoided by construction, never refused).
"""
import numpy as np
import pytest
import torch

from models import Darknet, load_model
from prune_utils import compact_model, get_layer_set, loose_model, make_plan
from tests.helpers import (REPO, assert_matches_opencv, conv, max_diff, narrow_defs, randomize_, raw_outputs, write,
                           yolo)
from utils.darknet_weights import save_weights
from utils.parse_config import parse_cfg, write_cfg
from utils.sparsity import BNSparsity
from tests.helpers import one_thread  # noqa: F401 (autouse: one intra-op thread in this file)

H, W = 96, 128
V4T = REPO / 'cfg' / 'yolov4-tiny.cfg'
ANCHORS9 = [(10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319), (12, 16), (19, 36), (40, 28)]




def three_head_text(nc=3):
    """yolov4-tiny with a third, stride-8 head (as yolov4-tiny-3l): route back to the stride-16 neck, upsample,
    concatenate the stride-8 CSP block's 1x1 conv (itself read by a grouped route)."""
    text = V4T.read_text()
    assert text.count('[yolo]') == 2
    text = text.replace('anchors = 10,14,  23,27,  37,58,  81,82,  135,169,  344,319',
                        'anchors = ' + ', '.join(f"{w},{h}" for w, h in ANCHORS9)).replace('num=6', 'num=9')
    text = text.replace('mask = 3,4,5', 'mask = 6,7,8').replace('mask = 1,2,3', 'mask = 3,4,5')
    extra = ("[route]\nlayers=-3\n" + conv(64, 1) + "[upsample]\nstride=2\n" + "[route]\nlayers=-1,15\n"
             + conv(64, 3) + conv(3 * (80 + 5), 1, bn=0, act='linear')
             + yolo([0, 1, 2], ANCHORS9, 80))
    return text + '\n' + extra


def models_under_test(tmp_path):
    """(name, model): the official yolov4-tiny narrowed to a quarter width, and the 3-head variant, for 3 classes."""
    three = write(tmp_path, 'v4t-3l.cfg', three_head_text())
    out = []
    for name, path in (('yolov4-tiny', V4T), ('yolov4-tiny-3l', three)):
        defs = narrow_defs(path, nc=3, div=4, height=H, width=W)
        out.append((name, randomize_(Darknet(defs, img_size=(H, W)), seed=4).eval()))
    return out


def zero_uneven_(model, layer_set, seed=0, beta=0.0):
    """gamma (and beta) of channels zeroed per slice, unevenly: slice j of a sliced conv loses j + 1 more channels
    than slice 0 (others: a random 40 %). Returns {layer: zeroed channel indices}."""
    g = torch.Generator().manual_seed(seed)
    zeroed = {}
    with torch.no_grad():
        for i in layer_set.prunable:
            bn = model.module_list[i][1]
            n, s = bn.num_features, layer_set.slices.get(i, 1)
            size = n // s
            idx = []
            for j in range(s):
                k = min(size - 1, max(1, round(0.25 * size)) + (j * (1 + size // 4) if s > 1 else 0))
                idx += (j * size + torch.randperm(size, generator=g)[:k]).tolist()
            idx = torch.tensor(sorted(idx))
            bn.weight[idx] = 0
            bn.bias[idx] = beta if beta != 'random' else torch.randn(len(idx), generator=g)
            zeroed[i] = idx
    return zeroed


@pytest.mark.parametrize('mode', ['tiny', 'normal'])
def test_zero_channels_removed_unevenly_across_slices_keep_outputs(mode, tmp_path):
    for name, model in models_under_test(tmp_path):
        ls = get_layer_set(model.module_defs, mode)
        assert ls.slices, name                                   # the CSP splits' inputs are prunable now
        zero_uneven_(model, ls, seed=1)
        plan = make_plan(model, ls, mode, threshold=0.25)        # randomize_: |gamma| >= 0.5 elsewhere
        compact = compact_model(model, plan)
        x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(2))
        assert max_diff(raw_outputs(compact, x), raw_outputs(model, x)) < 1e-4, name
        assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())


def test_every_slice_keeps_the_same_count_and_no_live_channel_goes(tmp_path):
    for name, model in models_under_test(tmp_path):
        ls = get_layer_set(model.module_defs, 'tiny')
        zeroed = zero_uneven_(model, ls, seed=3)
        plan = make_plan(model, ls, 'tiny', threshold=0.25)
        for i, g in ls.slices.items():
            per = plan.keep[i].reshape(g, -1)
            counts = per.sum(1)
            assert (counts == counts[0]).all() and plan.keep[i].sum() % g == 0, (name, i)
            live = np.ones(len(plan.keep[i]), bool)
            live[zeroed[i].numpy()] = False
            assert plan.keep[i][live].all(), (name, i)         # the constraint only ever keeps more
            # k is the largest live count of any slice: the slice with the most live channels keeps exactly those
            assert counts[0] == live.reshape(g, -1).sum(1).max()


def test_written_cfg_and_weights_equal_opencv(tmp_path):
    for name, model in models_under_test(tmp_path):
        with torch.no_grad():                                   # OpenCV's importer uses eps 1e-6: keep var >= 0.5
            for m in model.module_list:
                if isinstance(m, torch.nn.Sequential) and isinstance(m[1], torch.nn.BatchNorm2d):
                    m[1].running_var.clamp_(min=0.5)
        ls = get_layer_set(model.module_defs, 'tiny')
        zero_uneven_(model, ls, seed=5, beta='random')
        compact = compact_model(model, make_plan(model, ls, 'tiny', threshold=0.25))
        cfg, weights = tmp_path / f'{name}-pruned.cfg', tmp_path / f'{name}-pruned.weights'
        write_cfg(cfg, compact.defs)
        save_weights(compact, weights)
        routes = [d for d in compact.module_defs if d['type'] == 'route' and d.get('groups', 1) > 1]
        assert routes and all(d['groups'] == 2 and d['group_id'] == 1 for d in routes)   # keys kept
        reread = load_model(cfg, weights, img_size=(H, W))      # the written pair, read back
        x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3))
        assert max_diff(raw_outputs(reread, x), raw_outputs(compact, x)) < 1e-5
        (tmp_path / name).mkdir()
        assert_matches_opencv(reread, cfg, tmp_path / name, H, W)


def test_compact_equals_loose_for_any_gamma_beta(tmp_path):
    for name, model in models_under_test(tmp_path):
        ls = get_layer_set(model.module_defs, 'tiny')
        zero_uneven_(model, ls, seed=6, beta='random')
        with torch.no_grad():                                   # gamma not zero: the removed channels were alive
            for i in ls.prunable:
                model.module_list[i][1].weight.add_(0.05)
        plan = make_plan(model, ls, 'tiny', percent=0.3, min_keep=2)
        x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(7))
        assert max_diff(raw_outputs(compact_model(model, plan), x), raw_outputs(loose_model(model, plan), x)) < 1e-4


def one_by_one_split_cfg(nc=2):
    """A CSP-like block whose every consumer of the split conv is 1x1 (through the grouped route, a
    concatenation and a maxpool), so that the beta fold is exact everywhere."""
    s = f"[net]\nwidth={W}\nheight={H}\nchannels=3\n\n"
    s += conv(8, 3, 2)                                     # 0
    s += conv(16, 1)                                       # 1  split conv (16 = 2 x 8)
    s += "[route]\nlayers=-1\ngroups=2\ngroup_id=1\n"      # 2  its second half
    s += conv(8, 1)                                        # 3  1x1 consumer of the slice
    s += "[route]\nlayers=-1,-3\n"                         # 4  concatenation with the whole split conv
    s += "[maxpool]\nsize=2\nstride=2\n"                   # 5
    s += conv(16, 1)                                       # 6  1x1 consumer of the concatenation
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')         # 7
    s += yolo([0, 1, 2], [(10, 14), (23, 27), (37, 58)], nc)   # 8
    return s


def test_beta_fold_through_the_split_is_exact_with_1x1_consumers(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 's.cfg', one_by_one_split_cfg())), seed=8).eval()
    ls = get_layer_set(model.module_defs, 'tiny')
    assert ls.slices == {1: 2}
    with torch.no_grad():                                  # split conv: gamma 0, beta != 0 in both slices
        bn = model.module_list[1][1]
        removed = torch.tensor([0, 5, 9, 10, 14])          # 2 in slice 0, 3 in slice 1
        bn.weight[removed] = 0
        bn.bias[removed] = torch.tensor([0.7, -0.4, 1.1, 0.3, -0.9])
    plan = make_plan(model, ls, 'tiny', threshold=0.25)
    # slice 0 keeps 6 live channels, slice 1 only 5: both keep 6 (slice 1 one of its removed-by-gamma channels)
    assert plan.keep[1].reshape(2, -1).sum(1).tolist() == [6, 6]
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(9))
    ref = raw_outputs(model, x)
    assert max_diff(raw_outputs(compact_model(model, plan), x), ref) < 1e-5
    unfolded = compact_model(model, plan, loose=_zeroed_without_fold(model, plan))   # control: no fold
    assert max_diff(raw_outputs(unfolded, x), ref) > 1e-2


def _zeroed_without_fold(model, plan):
    """The loose model's removed channels zeroed but no constant folded (what a prune without the fold does)."""
    import copy
    loose = copy.deepcopy(model).eval()
    with torch.no_grad():
        for i, k in plan.keep.items():
            removed = ~torch.as_tensor(k)
            loose.module_list[i][1].weight[removed] = 0
            loose.module_list[i][1].bias[removed] = 0
    return loose


def test_sparse_training_mode_2_regularizes_the_sliced_convs():
    model = Darknet(str(V4T))
    ls = get_layer_set(model.module_defs, 2)
    sr = BNSparsity(model, ls, 0.01, verbose=False)
    assert set(ls.slices) <= set(sr.layers) and sr.layers == sorted(ls.prunable)
    feeders = {i - 1 for i, d in enumerate(model.module_defs) if d['type'] == 'route' and d.get('groups', 1) > 1}
    assert feeders == set(ls.slices)


def zero_group_channels_(model, layer_set, seed):
    """Zero gamma and beta of the same random channels in every member of each shortcut group (over the group's
    width: a wider member's first channels), of random channels of every other prunable conv, and of random
    channels of each wider member's own tail. Returns {layer: zeroed channel indices}."""
    g = torch.Generator().manual_seed(seed)
    width = {i: layer_set.partial.get(i, layer_set.filters[i]) for i in layer_set.prunable}
    grouped = {i for grp in layer_set.groups for i in grp}
    units = [(grp, 0, width[grp[0]]) for grp in layer_set.groups]
    units += [([i], w, layer_set.filters[i]) for i, w in layer_set.partial.items()]
    units += [([i], 0, layer_set.filters[i]) for i in layer_set.prunable if i not in grouped]
    zeroed = {}
    with torch.no_grad():
        for layers, start, stop in units:
            n = stop - start
            idx = start + torch.randperm(n, generator=g)[:max(1, round(0.4 * n))]
            for i in layers:
                bn = model.module_list[i][1]
                bn.weight[idx], bn.bias[idx] = 0, 0
                zeroed[i] = torch.cat((zeroed.get(i, torch.zeros(0, dtype=torch.long)), idx)).sort().values
    return zeroed


def test_unequal_width_shortcut_couples_only_the_overlap(tmp_path):
    """yolov3-tiny-prn's [shortcut] from=8 adds the first 16 of layer 8's 32 channels to 16-channel layers: those
    16 share the group's mask, layer 8's other 16 channels prune on their own; zero channels out -> outputs
    unchanged, and the written model equals OpenCV's import of it."""
    from tests.helpers import tiny_prn
    cfg = write(tmp_path, 'prn.cfg', tiny_prn(nc=3))
    model = randomize_(Darknet(cfg), seed=11).eval()
    ls = get_layer_set(model.module_defs, 'shortcut')
    assert ls.partial == {8: 16} and [8, 20, 23] in ls.groups and not ls.excluded
    assert 'its first 16 channels; the other 16 on their own' in ls.describe()
    zeroed = zero_group_channels_(model, ls, seed=12)
    plan = make_plan(model, ls, 'shortcut', threshold=0.25)
    assert np.array_equal(plan.keep[8][:16], plan.keep[20]) and np.array_equal(plan.keep[20], plan.keep[23])
    assert set(np.flatnonzero(~plan.keep[8])) == set(zeroed[8].tolist())      # the tail's own zeros went too
    assert (~plan.keep[8][16:]).any()
    x = torch.rand(1, 3, *model.img_size, generator=torch.Generator().manual_seed(13))
    compact = compact_model(model, plan)
    assert max_diff(raw_outputs(compact, x), raw_outputs(model, x)) < 1e-4
    assert_matches_opencv(compact, write_cfg(tmp_path / 'compact.cfg', compact.defs), tmp_path, *model.img_size)


def test_unequal_width_overlap_with_live_beta_folds_like_loose(tmp_path):
    from tests.helpers import tiny_prn
    model = randomize_(Darknet(write(tmp_path, 'prn.cfg', tiny_prn(nc=3))), seed=14).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.normal_(0, 1, generator=torch.Generator().manual_seed(m.num_features))
    ls = get_layer_set(model.module_defs, 'shortcut')
    plan = make_plan(model, ls, 'shortcut', percent=0.5, min_keep=1)
    assert (~plan.keep[8][:16]).any() and (~plan.keep[8][16:]).any()
    x = torch.rand(1, 3, *model.img_size, generator=torch.Generator().manual_seed(15))
    assert max_diff(raw_outputs(compact_model(model, plan), x), raw_outputs(loose_model(model, plan), x)) < 1e-4


def test_unequal_widths_with_more_than_one_wider_member_stay_whole(tmp_path):
    """Two 12-channel convs summed, then an 8-channel conv added to that: the 12-wide members' extra channels
    are coupled among themselves, which no prefix rule expresses; the group is left whole with the reason."""
    s = "[net]\nwidth=48\nheight=32\nchannels=3\n" + conv(12, 3) + conv(12, 3)
    s += "[shortcut]\nfrom=-2\nactivation=linear\n" + conv(8, 1) + "[shortcut]\nfrom=-2\nactivation=linear\n"
    s += conv(3 * 7, 1, bn=0, act='linear') + yolo([0, 1, 2], [(7, 9), (15, 21), (30, 25)], 2)
    ls = get_layer_set(parse_cfg(write(tmp_path, 'u.cfg', s))[1:], 'shortcut')
    assert set(ls.excluded) == {0, 1, 3} and not ls.prunable
    assert all('[shortcut] 2 couples inputs of widths [8, 12]' in why for why in ls.excluded.values())
