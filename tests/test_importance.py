"""Importance criteria (importance.py) and FLOPs-targeted plans (prune_utils.make_plan(target_flops=...)).

`fold` is checked against a brute-force measurement (remove each channel alone with the mean fold and measure
what its consumers output), `l1` against sums over hand-made weights, `act` against hooks, and a FLOPs target
against the BFLOPs of the written cfg and of the plan that keeps one more channel.
"""
import numpy as np
import pytest
import torch

import calibrate
import importance
import models
import prune_utils
import tiny_prune
from models import Darknet
from prune_utils import get_layer_set, loose_model, make_plan
from tests.helpers import ANCHORS6, REPO, conv, narrow_defs, randomize_, write, yolo
from utils.darknet_weights import save_weights
from utils.errors import DarkslimError, cli_main

from tests.helpers import one_thread  # noqa: F401 (autouse: one intra-op thread in this file)


def one_by_one(nc=1):
    """Every consumer of a prunable conv is a 1x1 conv, read directly or through route / maxpool / upsample:
    0 conv3x3 | 1 conv 1x1 (12) | 2 conv 1x1 (10) | 3 maxpool | 4 conv 1x1 (8) | 5 upsample | 6 route 5,2 |
    7 conv 1x1 head | 8 yolo"""
    s = "[net]\nwidth=32\nheight=32\nchannels=3\n\n"
    s += conv(8, 3) + conv(12, 1) + conv(10, 1)
    s += "[maxpool]\nsize=2\nstride=2\n" + conv(8, 1) + "[upsample]\nstride=2\n" + "[route]\nlayers=-1,2\n"
    s += conv(3 * (nc + 5), 1, bn=0, act='linear') + yolo([0, 1, 2], ANCHORS6, nc)
    return s


def images(n=6, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def consumer_inputs(model, layers, x):
    """{conv: its input} on x."""
    got = {}
    handles = [model.module_list[k].register_forward_pre_hook(lambda m, i, k=k: got.__setitem__(k, i[0].detach()))
               for k in layers]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return got


def conv_bn(module, x):
    """A conv layer's output after BN, before the activation (the conv's own output without BN)."""
    with torch.no_grad():
        y = module[0](x)
        return (module[1](y) if len(module) > 1 and isinstance(module[1], torch.nn.BatchNorm2d) else y).double()


# producer conv -> {consumer conv: where the producer's channels start in the consumer's input}, by hand
CONSUMERS = {0: {1: 0}, 1: {2: 0}, 2: {4: 0, 7: 8}, 4: {7: 0}}     # 7 reads route [upsample of 4 (8), 2 (10)]


def brute_force_fold_error(model, layer_set, x):
    """{conv: per-channel error}: remove that one channel with the mean fold (loose_model: the channel outputs 0,
    its mean folded into the consumers' BN); each consumer conv runs on the original input with that channel
    at 0; the mean over images and positions of the squared change of its output (after BN), summed over
    outputs and consumers."""
    means = calibrate.mean_activations(model, layer_set.prunable, x)
    inputs = consumer_inputs(model, [1, 2, 4, 7], x)
    out = {}
    for i in layer_set.prunable:
        errors = []
        for c in range(layer_set.filters[i]):
            keep = {j: np.ones(layer_set.filters[j], dtype=bool) for j in layer_set.prunable}
            keep[i][c] = False
            loose = loose_model(model, prune_utils.Plan('normal', layer_set, keep, 0.0), {i: means[i]})
            err = 0.0
            for k, start in CONSUMERS[i].items():
                xk = inputs[k].clone()
                xk[:, start + c] = 0
                diff = conv_bn(loose.module_list[k], xk) - conv_bn(model.module_list[k], inputs[k])
                err += float((diff ** 2).sum(1).mean())
            errors.append(err)
        out[i] = np.array(errors)
    return out


def test_fold_importance_is_the_brute_force_error_of_removing_each_channel(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 'm.cfg', one_by_one())), seed=3).eval()
    layer_set = get_layer_set(model.module_defs, 'normal')
    assert layer_set.prunable == [0, 1, 2, 4]
    x = images()
    score = importance.IMPORTANCES['fold'].scores(model, layer_set, x)
    brute = brute_force_fold_error(model, layer_set, x)
    for i in layer_set.prunable:
        np.testing.assert_allclose(score[i], brute[i], rtol=1e-5)       # 1x1 consumers: equal, not just ranked
    flat_s = np.concatenate([score[i] for i in layer_set.prunable])
    flat_b = np.concatenate([brute[i] for i in layer_set.prunable])
    assert np.array_equal(np.argsort(flat_s), np.argsort(flat_b))


def test_fold_scores_of_a_shortcut_group_are_shared_sums(tmp_path):
    s = "[net]\nwidth=32\nheight=32\nchannels=3\n\n" + conv(8, 3) + conv(4, 1) + conv(8, 1)
    s += "[shortcut]\nfrom=-3\nactivation=linear\n" + conv(6, 1)
    s += conv(3 * 6, 1, bn=0, act='linear') + yolo([0, 1, 2], ANCHORS6, 1)
    model = randomize_(Darknet(write(tmp_path, 'g.cfg', s)), seed=4).eval()
    layer_set = get_layer_set(model.module_defs, 'shortcut')
    assert layer_set.groups == [[0, 2]]
    x = images()
    shared = importance.IMPORTANCES['fold'].scores(model, layer_set, x)
    alone = importance.fold_own(model, [0, 2, 3], x)                  # each node's own consumers only
    np.testing.assert_allclose(shared[0], alone[0] + alone[2] + alone[3])
    assert alone[0].min() > 0 and alone[3].min() > 0                  # conv 1 reads 0; conv 4 reads shortcut 3
    np.testing.assert_allclose(shared[2], shared[0])


def test_act_importance_is_the_mean_absolute_activation(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 'm.cfg', one_by_one())), seed=5).eval()
    x = images()
    got = {}
    handle = model.module_list[2].register_forward_hook(lambda m, i, o: got.__setitem__('a', o.detach().double()))
    with torch.no_grad():
        model(x)
    handle.remove()
    by_hand = got['a'].abs().mean((0, 2, 3)).numpy()
    np.testing.assert_allclose(importance.act(model, [2], x)[2], by_hand, rtol=1e-6)
    with pytest.raises(DarkslimError, match='importance act measures activations'):
        importance.IMPORTANCES['act'].scores(model, [2])


def test_l1_is_the_filter_norm_and_greedy_leaves_out_removed_inputs(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 'm.cfg', one_by_one())), seed=6).eval()
    w = model.module_list[2][0].weight                                # [10, 12, 1, 1]
    with torch.no_grad():
        w.copy_(torch.arange(120, dtype=torch.float32).view(10, 12, 1, 1) - 60)
    by_hand = [sum(abs(o * 12 + c - 60) for c in range(12)) for o in range(10)]
    assert importance.l1(model, [2])[2].tolist() == by_hand
    np.testing.assert_allclose(importance.IMPORTANCES['l1'].scores(model, [2])[2], np.array(by_hand) / np.mean(by_hand))
    layer_set = get_layer_set(model.module_defs, 'normal')
    keep = {1: np.ones(12, dtype=bool), 2: np.ones(10, dtype=bool), 4: np.ones(8, dtype=bool)}
    keep[1][[0, 5]] = False                                           # conv 1 loses two channels; 2 reads them
    greedy = importance.l1(model, layer_set, keep=keep)
    plain = importance.l1(model, layer_set)
    assert greedy[2].tolist() == [sum(abs(o * 12 + c - 60) for c in range(12) if c not in (0, 5)) for o in range(10)]
    assert np.array_equal(greedy[1], plain[1]) and np.array_equal(greedy[4], plain[4])   # inputs intact
    plan = make_plan(model, layer_set, 'normal', percent=0.3, importance='l1', greedy=True)
    assert plan.greedy and 'greedy' in plan.table()


# --- FLOPs target -------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def v4tiny():
    defs = narrow_defs(REPO / 'cfg' / 'yolov4-tiny.cfg', nc=3, div=8, height=96, width=96)
    return randomize_(Darknet(defs), seed=7).eval()


@pytest.mark.parametrize('target', [0.2, 0.35, 0.5])
def test_a_flops_target_is_met_by_the_fewest_channels(target, v4tiny):
    model = v4tiny
    layer_set = get_layer_set(model.module_defs, 'tiny')
    plan = make_plan(model, layer_set, 'tiny', target_flops=target, min_keep=1)
    hw = tuple(model.img_size)
    orig = models.model_info(model.defs, *hw)[1]
    written = models.model_info(prune_utils.compact_defs(model, plan), *hw)[1]   # the cfg that would be written
    assert written <= (1 - target) * orig and plan.bflops == pytest.approx((orig, written))
    scores = prune_utils.score_channels(model, layer_set)
    flat = np.sort(np.concatenate([scores[i] for i in layer_set.prunable]))
    last = flat[flat < plan.threshold].max()                          # the highest-score channel removed
    back = prune_utils.plan_from_scores(layer_set, 'tiny', scores, threshold=float(last), min_keep=1)
    assert prune_utils.compact_bflops(model, back.keep, hw) > (1 - target) * orig   # keeping it goes over
    for i, g in layer_set.slices.items():                             # [route] groups splits: equal halves
        assert len(set(plan.keep[i].reshape(g, -1).sum(1))) == 1
    for grp in layer_set.groups:
        assert all(np.array_equal(plan.keep[grp[0]], plan.keep[j]) for j in grp)
    assert 'BFLOPs' in plan.table().splitlines()[1] and f"target: at least {target:.1%} fewer" in plan.table()


def test_an_impossible_flops_target_is_one_line_exit_2_and_writes_nothing(v4tiny, tmp_path, capsys):
    cfg = write(tmp_path, 'v4.cfg', v4tiny.cfg_text())
    weights = save_weights(v4tiny, tmp_path / 'v4.weights')
    args = tiny_prune.get_args_parser().parse_args(['--cfg', str(cfg), '--weights', str(weights),
                                                    '--target-flops', '0.97', '--out', str(tmp_path / 'o' / 'p')])
    with pytest.raises(SystemExit) as e:
        cli_main(tiny_prune.main, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and err.startswith('error: --target-flops 0.97: the layer set')
    assert '--min-keep K' in err and not (tmp_path / 'o').exists()
    with pytest.raises(DarkslimError, match=r"target_flops 1.5; expected"):
        make_plan(v4tiny, get_layer_set(v4tiny.module_defs, 'tiny'), 'tiny', target_flops=1.5)


def test_layer_prune_flops_target_counts_the_blocks(tmp_path):
    import pruning
    defs = narrow_defs(REPO / 'cfg' / 'yolov3.cfg', nc=3, div=8, height=64, width=64)
    model = randomize_(Darknet(defs), seed=8).eval()
    result = pruning.prune(model, 'layer', pruning.PruneOptions(n_blocks=4, target_flops=0.4, min_keep=1))
    hw = tuple(model.img_size)
    orig = models.model_info(model.defs, *hw)[1]
    assert models.model_info(result.nets['compact'].defs, *hw)[1] <= 0.6 * orig
    assert len(result.plan.removed) == 4 and result.plan.channel_plan is not None
