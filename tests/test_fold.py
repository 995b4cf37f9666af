"""Folding the constants of removed channels (channels.conv_shift, channel_flow), checked against sums done
by hand where the fold is not the identity: beta != 0 read by a 3x3 consumer (exact inside the image, off by
the out-of-image taps on the border), and a chain of shortcuts carrying every member's constant.

A BN channel with gamma = 0 outputs act(beta) everywhere. Removing it and folding W.sum(kh, kw) @ act(beta)
into the consumer's BN mean is exact for a 1x1 consumer; for a k x k consumer with zero padding the original
saw 0, not the constant, at out-of-image taps, so the compact model differs there by exactly those taps' sum.
Each check has a twin that runs it with the fold broken on purpose (monkeypatched), to show that it bites.
"""
import numpy as np
import torch

import prune_utils
from models import Darknet
from prune_utils import channel_flow, compact_model, get_layer_set, make_plan
from tests.helpers import ANCHORS6, conv, max_diff, randomize_, raw_outputs, sparsify_, write, yolo

NC = 1
HEAD = 3 * (NC + 5)


def leaky(v):
    return np.where(v > 0, v, 0.1 * v)


# --- broken folds: what a wrong implementation would compute --------------------------------------------------------

def centre_tap_fold(conv_, const_in):
    """conv_shift with the kernel's centre tap instead of the sum over all taps (equal for 1x1 kernels only)."""
    w = conv_.weight.detach()
    cy, cx = w.shape[2] // 2, w.shape[3] // 2
    return w[:, :, cy, cx].double() @ const_in.double()


def flow_forgetting_shortcut_inputs(real_flow):
    """channel_flow where a [shortcut] adds only the constants of its conv inputs, forgetting the one an earlier
    [shortcut] hands it: the first shortcut of a chain is right, every later one loses the chain's constant."""
    def flow(model, keep, *args, **kwargs):
        out = real_flow(model, keep, *args, **kwargs)
        defs = model.module_defs
        for i, d in enumerate(defs):
            if d['type'] == 'shortcut':
                k = out[i][0]
                c = sum(out[j][1] for j in model.inputs[i] if defs[j]['type'] != 'shortcut')
                out[i] = (k, torch.where(k, torch.zeros_like(c), model.module_list[i].act(c)))
        return out
    return flow


# --- (a) 1x1 -> 3x3: exact inside, the missing taps on the border ------------------------------------------------

H, W = 10, 12              # small and not square; every conv has stride 1, so the yolo grid is H x W
REMOVED = [1, 4, 6]        # channels of conv 0 with gamma = 0
BETAS = [0.8, -1.2, 1.5]   # their beta: act(beta) = 0.8, -0.12, 1.5


def one_to_three_cfg():
    """0: conv 1x1 (8 filters, loses REMOVED) -> 1: conv 3x3 pad 1 with BN (the consumer) -> 2: head -> 3: yolo."""
    s = f"[net]\nwidth={W}\nheight={H}\nchannels=3\n\n"
    s += conv(8, 1) + conv(6, 3) + conv(HEAD, 1, bn=0, act='linear') + yolo([0, 1, 2], ANCHORS6, NC)
    return s


def consumer_preactivation(model, x):
    """Conv 1's BN output [C, H, W] (before its activation), caught by a forward hook."""
    got = {}
    hook = model.module_list[1][1].register_forward_hook(lambda m, i, o: got.setdefault('y', o.detach()))
    try:
        raw_outputs(model, x)
    finally:
        hook.remove()
    return got['y'][0].double().numpy()


def missing_tap_sum(model, removed, const):
    """[C_out, H, W]: for every output cell of conv 1, the sum over its out-of-image taps (ky, kx) of
    W[:, removed, ky, kx] @ const, scaled by conv 1's BN gamma / sqrt(var + eps); 0 inside the image."""
    c1, bn = model.module_list[1][0], model.module_list[1][1]
    w = c1.weight.detach().double().numpy()[:, removed]              # [C_out, R, kh, kw]
    kh, kw = w.shape[2:]
    ph, pw = c1.padding
    out = np.zeros((w.shape[0], H, W))
    for y in range(H):
        for x in range(W):
            for ky in range(kh):
                for kx in range(kw):
                    if not (0 <= y + ky - ph < H and 0 <= x + kx - pw < W):
                        out[:, y, x] += w[:, :, ky, kx] @ const
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()
    return scale[:, None, None] * out


def one_to_three(tmp_path):
    """(model, plan, expected compact - original at conv 1's pre-activation, image)."""
    model = randomize_(Darknet(write(tmp_path, 'a.cfg', one_to_three_cfg())), seed=31).eval()
    with torch.no_grad():
        bn0 = model.module_list[0][1]
        bn0.weight[REMOVED] = 0
        bn0.bias[REMOVED] = torch.tensor(BETAS)
    plan = make_plan(model, get_layer_set(model.module_defs, 'normal'), 'normal', threshold=0.25)
    assert np.flatnonzero(~plan.keep[0]).tolist() == REMOVED       # randomize_: every other |gamma| >= 0.5
    assert all(k.all() for i, k in plan.keep.items() if i != 0)
    expected = missing_tap_sum(model, REMOVED, leaky(np.array(BETAS)))
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(32))
    return model, plan, expected, x


def border_and_interior_error(model, plan, expected, x):
    """(max |compact - original| inside, max |compact - original - expected| on the border)."""
    diff = consumer_preactivation(compact_model(model, plan), x) - consumer_preactivation(model, x)
    inside = np.zeros((H, W), bool)
    inside[1:-1, 1:-1] = True
    return np.abs(diff[:, inside]).max(), np.abs((diff - expected)[:, ~inside]).max()


def test_3x3_consumer_of_nonzero_beta_is_exact_inside_and_off_by_the_missing_taps_on_the_border(tmp_path):
    model, plan, expected, x = one_to_three(tmp_path)
    assert np.abs(expected[:, 1:-1, 1:-1]).max() == 0
    edge, corner = np.abs(expected[:, 0, W // 2]).max(), np.abs(expected[:, 0, 0]).max()
    assert edge > 1e-2 and corner > 1e-2                             # the border effect is not negligible
    interior, border = border_and_interior_error(model, plan, expected, x)
    assert interior < 1e-5
    assert border < 1e-5


def test_3x3_check_fails_when_the_fold_uses_the_centre_tap(tmp_path, monkeypatch):
    model, plan, expected, x = one_to_three(tmp_path)
    monkeypatch.setattr(prune_utils, 'conv_shift', centre_tap_fold)
    interior, border = border_and_interior_error(model, plan, expected, x)
    assert interior > 1e-3 and border > 1e-3


# --- (b) a chain of shortcuts: every member's constant summed ------------------------------------------------

def shortcut_chain_cfg():
    """Three residual blocks of 1x1 convs: shortcuts 3 = 0 + 2, 6 = 3 + 5, 9 = 6 + 8 couple convs 0, 2, 5, 8 into
    one group; every reader of a removed channel (convs 1, 4, 7, 10, 11 and the shortcuts) is 1x1 or a sum,
    so the fold is exact everywhere, borders included."""
    s = "[net]\nwidth=32\nheight=32\nchannels=3\n\n"
    s += conv(8, 3, 2)                                                  # 0 (3x3 on the image: reads no constant)
    for _ in range(3):
        s += conv(4, 1) + conv(8, 1) + "[shortcut]\nfrom=-3\nactivation=linear\n"   # 1 2 3 | 4 5 6 | 7 8 9
    s += conv(8, 1) + conv(HEAD, 1, bn=0, act='linear') + yolo([0, 1, 2], ANCHORS6, NC)   # 10 11 12
    return s


def shortcut_chain(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 'b.cfg', shortcut_chain_cfg())), seed=33).eval()
    layer_set = get_layer_set(model.module_defs, 'shortcut')
    shortcuts = [i for i, d in enumerate(model.module_defs) if d['type'] == 'shortcut']
    group = sorted({i for s in shortcuts for i in model.inputs[s] if model.module_defs[i]['type'] == 'convolutional'})
    assert len(shortcuts) >= 2 and layer_set.groups == [group]
    zeroed = sparsify_(model, layer_set, share=0.5, seed=34, beta='random')
    plan = make_plan(model, layer_set, 'shortcut', threshold=0.25)
    idx = zeroed[group[0]].numpy()
    assert all(np.array_equal(np.flatnonzero(~plan.keep[i]), idx) for i in group)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(35))
    return model, plan, group, shortcuts, idx, x


def test_chain_of_shortcuts_sums_every_members_constant_and_compact_equals_original(tmp_path):
    model, plan, group, shortcuts, idx, x = shortcut_chain(tmp_path)
    # by hand: linear shortcuts add, so the last one carries act(beta) of every group member at the removed channels
    betas = np.stack([model.module_list[i][1].bias.detach().double().numpy()[idx] for i in group])
    by_hand = leaky(betas).sum(0)
    assert np.abs(by_hand).max() > 0.1
    flow = channel_flow(model, plan.keep)
    assert np.allclose(flow[shortcuts[-1]][1].double().numpy()[idx], by_hand, atol=1e-6)
    assert max_diff(raw_outputs(compact_model(model, plan), x), raw_outputs(model, x)) < 1e-4


def test_chain_check_fails_when_a_shortcut_forgets_the_earlier_shortcuts_constant(tmp_path, monkeypatch):
    model, plan, _, _, _, x = shortcut_chain(tmp_path)
    monkeypatch.setattr(prune_utils, 'channel_flow', flow_forgetting_shortcut_inputs(prune_utils.channel_flow))
    assert max_diff(raw_outputs(compact_model(model, plan), x), raw_outputs(model, x)) > 1e-3
