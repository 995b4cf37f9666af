"""Network slimming (prune_utils.py + the four prune scripts), specified by equalities of two routes:
pruned-vs-original outputs where the maths says they must agree, written files vs OpenCV's Darknet importer,
masks vs the |gamma| rule recomputed here, and the CLIs' one-line errors."""
import copy
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models import Darknet, load_model, model_info, save_checkpoint
from prune_cli import resolve_inputs
from prune_utils import compact_model, get_layer_set, loose_model, make_plan, threshold_for_percent
from tests.helpers import (ANCHORS6, OUR_CFGS, REPO, SHARED_CFGS, assert_matches_opencv, conv, counted_cost, max_diff,
                           mini_tiny, mini_yolov3, narrow_defs, one_by_one_cfg, randomize_, raw_outputs, sparsify_,
                           write, yolo)
from tests.helpers import one_thread  # noqa: F401 (autouse: one intra-op thread in this file)
from utils.darknet_weights import save_weights
from utils.errors import DarkslimError
from utils.parse_config import parse_cfg, write_cfg

H, W = 96, 128            # small, non-square input for every model test
ATOL = 1e-4
# reference cfgs not already covered by a same-named cfg of ours (those differ only in [net] width/height)
CFGS = OUR_CFGS + [p for p in SHARED_CFGS if p.name not in {q.name for q in OUR_CFGS}]
# (strategy, layer-set mode, round_to)
STRATEGIES = [('normal', 'normal', None), ('shortcut', 'shortcut', None), ('regular', 'normal', 'pow2'),
              ('regular8', 'normal', 8), ('tiny', 'tiny', None)]




def has_shortcut(defs):
    return any(d['type'] == 'shortcut' for d in defs)


def cases():
    for path in CFGS:
        short = has_shortcut(parse_cfg(path))
        for strategy, mode, round_to in STRATEGIES:
            if mode == 'tiny' and short:
                continue
            yield pytest.param(path, mode, round_to, id=f"{path.parent.name}/{path.stem}-{strategy}")


def image(seed=1):
    return torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(seed))


def prune(model, mode, round_to=None, **how):
    layer_set = get_layer_set(model.module_defs, mode)
    plan = make_plan(model, layer_set, mode, round_to=round_to, **how)
    loose = loose_model(model, plan)
    return layer_set, plan, loose, compact_model(model, plan, loose)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cli(script, *args, cwd=REPO):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=env)


# --- layer sets ---------------------------------------------------------------------------------------------------

def test_yolov3_layer_sets_follow_the_residual_structure():
    defs = parse_cfg(REPO / 'cfg' / 'yolov3.cfg')[1:]
    bn = [i for i, d in enumerate(defs) if d['type'] == 'convolutional' and d.get('batch_normalize')]
    # every [shortcut] here adds layer i-1 and layer i+from, both convs or shortcuts: the convs among them are
    # exactly what normal mode must leave whole
    coupled = set()
    for i, d in enumerate(defs):
        if d['type'] == 'shortcut':
            coupled |= {j for j in (i - 1, i + d['from'][0]) if defs[j]['type'] == 'convolutional'}
    normal = get_layer_set(defs, 'normal')
    assert set(normal.excluded) == coupled and set(normal.prunable) == set(bn) - coupled
    assert all(normal.excluded[j].startswith('coupled by [shortcut]') for j in coupled)
    assert normal.groups == []
    # shortcut mode: Darknet-53's five stages have 1, 2, 8, 8, 4 residual blocks, each stage one group of its
    # downsampling conv plus one conv per block
    sc = get_layer_set(defs, 1)
    assert sorted(sc.prunable) == bn and sc.excluded == {}
    assert [len(g) for g in sc.groups] == [2, 3, 9, 9, 5]
    assert sorted(j for g in sc.groups for j in g) == sorted(coupled)
    assert get_layer_set(defs, 'regular') == normal and get_layer_set(defs, 0) == normal


def test_spp_route_and_upsample_feeders_are_prunable():
    defs = parse_cfg(REPO / 'cfg' / 'yolov3-spp.cfg')[1:]
    ls = get_layer_set(defs, 'normal')
    spp = next(i for i, d in enumerate(defs) if d['type'] == 'route' and len(d['layers']) == 4)
    feeders = {i - 1 for i, d in enumerate(defs) if d['type'] == 'upsample'}
    spp_conv = next(j for j in range(spp, 0, -1) if defs[j]['type'] == 'convolutional')
    assert spp_conv in ls.prunable and feeders <= set(ls.prunable)


def test_yolo_feeders_are_excluded_and_grouped_route_inputs_are_sliced(tmp_path):
    defs = parse_cfg(REPO / 'cfg' / 'yolov4-tiny.cfg')[1:]
    ls = get_layer_set(defs, 'tiny')
    grouped = {i - 1 for i, d in enumerate(defs) if d['type'] == 'route' and d.get('groups', 1) > 1
               and d['layers'] == [-1]}
    assert ls.slices == {i: 2 for i in grouped} and grouped <= set(ls.prunable)
    assert '2 equal slices ([route] groups split)' in ls.describe()
    # a BN conv feeding a [yolo] directly (no head conv without BN in between)
    text = mini_tiny(nc=2).replace("batch_normalize=0\nfilters=21", "batch_normalize=1\nfilters=21")
    ls = get_layer_set(parse_cfg(write(tmp_path, 't.cfg', text))[1:], 'tiny')
    assert ls.excluded == {9: 'feeds [yolo] 10', 16: 'feeds [yolo] 17'}
    assert 9 not in ls.prunable and 'feeds [yolo] 17' in ls.describe()


def test_tiny_mode_refuses_shortcuts_pointing_to_shortcut_prune(tmp_path):
    with pytest.raises(DarkslimError, match='shortcut_prune.py'):
        get_layer_set(parse_cfg(write(tmp_path, 'm.cfg', mini_yolov3()))[1:], 2)


def test_describe_lists_every_bn_conv_once(tmp_path):
    defs = parse_cfg(write(tmp_path, 'm.cfg', mini_yolov3()))[1:]
    ls = get_layer_set(defs, 'shortcut')
    text = ls.describe()
    bn = [i for i, d in enumerate(defs) if d['type'] == 'convolutional' and d.get('batch_normalize')]
    rows = [line.split('|')[1].strip() for line in text.splitlines() if line.startswith('| ') and 'layer' not in line]
    assert rows == [str(i) for i in bn]
    assert f"{len(ls.groups)} shortcut groups" in text


# --- invariant 1 (and 2): zero channels out -> same outputs ---------------------------------------------------------

@pytest.mark.parametrize('path,mode,round_to', list(cases()))
def test_removing_zero_channels_keeps_outputs(path, mode, round_to):
    model = randomize_(Darknet(narrow_defs(path), img_size=(H, W)), seed=2).eval()
    share = 0.6 if round_to == 'pow2' else 0.4        # powers of two (at least 8) restore a cut of under half
    sparsify_(model, get_layer_set(model.module_defs, mode), share=share, seed=3, beta=0.0)
    layer_set, plan, loose, compact = prune(model, mode, round_to, threshold=0.25)   # randomize_: |gamma| >= 0.5
    assert all(k.any() for k in plan.keep.values())
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())
    x = image()
    ref = raw_outputs(model, x)
    assert max_diff(raw_outputs(compact, x), ref) < ATOL
    assert max_diff(raw_outputs(compact, x), raw_outputs(loose, x)) < ATOL


def test_full_width_yolov3_zero_channels_shortcut_prune():
    model = randomize_(Darknet(REPO / 'cfg' / 'yolov3.cfg', img_size=64), seed=5).eval()
    sparsify_(model, get_layer_set(model.module_defs, 1), share=0.5, seed=6)
    _, plan, _, compact = prune(model, 'shortcut', threshold=0.25)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert max_diff(raw_outputs(compact, x), raw_outputs(model, x)) < ATOL
    assert model_info(compact.defs)[1] < 0.6 * model_info(model.defs)[1]


# --- invariant 2: compact == loose, always ----------------------------------------------------------------------------

@pytest.mark.parametrize('mode,round_to', [('normal', None), ('shortcut', None), ('normal', 'pow2'), ('normal', 16)])
@pytest.mark.parametrize('cfg', ['yolov3-spp.cfg', 'mini'])
def test_compact_equals_loose_for_any_gamma_and_beta(cfg, mode, round_to, tmp_path):
    defs = narrow_defs(REPO / 'cfg' / cfg) if cfg != 'mini' else parse_cfg(write(tmp_path, 'm.cfg', mini_yolov3()))
    model = randomize_(Darknet(defs, img_size=(H, W)), seed=7).eval()
    with torch.no_grad():              # beta far from 0, so removed channels carry large constants
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.normal_(0, 1, generator=torch.Generator().manual_seed(m.num_features))
    _, plan, loose, compact = prune(model, mode, round_to, percent=0.5, min_keep=1)
    assert plan.removed_share > 0.1
    x = image(4)
    assert max_diff(raw_outputs(compact, x), raw_outputs(loose, x)) < ATOL
    # compact copies loose's weights, so the line above checks the slicing against the library's own loose model;
    # against a network built here: with the removed channels' beta at 0 nothing is folded, and the compact model
    # must equal the original with those channels' gamma and beta zeroed (route offsets, groups, borders and all)
    with torch.no_grad():
        for i, k in plan.keep.items():
            model.module_list[i][1].bias[~torch.as_tensor(k)] = 0
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for i, k in plan.keep.items():
            zeroed.module_list[i][1].weight[~torch.as_tensor(k)] = 0
    ref = raw_outputs(zeroed, x)
    assert max_diff(raw_outputs(model, x), ref) > 1e-2          # the removed channels carried signal
    assert max_diff(raw_outputs(compact_model(model, plan), x), ref) < ATOL


# --- invariant 3: the fold is exact for 1x1 consumers ---------------------------------------------------------------

@pytest.mark.parametrize('mode,round_to', [('normal', None), ('shortcut', None), ('normal', 'pow2')])
def test_fold_of_nonzero_beta_is_exact_for_1x1_consumers(mode, round_to, tmp_path):
    model = randomize_(Darknet(write(tmp_path, 'c.cfg', one_by_one_cfg())), seed=8).eval()
    layer_set = get_layer_set(model.module_defs, mode)
    assert layer_set.groups == ([[0, 2]] if mode == 'shortcut' else [])   # conv 0 + conv 2 -> [shortcut] 3
    zeroed = sparsify_(model, layer_set, share=0.5, seed=9, beta='random')
    _, plan, _, compact = prune(model, mode, round_to, threshold=0.25)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ref = raw_outputs(model, x)
    assert max_diff(raw_outputs(compact, x), ref) < ATOL
    # the same channels dropped without folding their constants: outputs move, so the fold above did the work
    assert sum(int((~torch.as_tensor(k)).sum()) for k in plan.keep.values()) > 0
    unfolded = randomize_(Darknet(write(tmp_path, 'c.cfg', one_by_one_cfg())), seed=8).eval()
    unfolded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i, idx in zeroed.items():
            if i in plan.keep and not plan.keep[i][idx.numpy()].any():
                unfolded.module_list[i][1].bias[idx] = 0
    assert max_diff(raw_outputs(unfolded, x), ref) > 1e-2


# --- invariant 4: masks --------------------------------------------------------------------------------------------

def random_gamma_model(tmp_path, text=None, seed=10):
    model = randomize_(Darknet(write(tmp_path, 'm.cfg', text or mini_yolov3())), seed=seed).eval()
    with torch.no_grad():              # sparse-training-like: most |gamma| near 0, a tail near 1
        g = torch.Generator().manual_seed(seed)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) ** 4 * torch.sign(torch.randn(
                    m.num_features, generator=g)))
    return model


def test_shortcut_groups_keep_the_union_of_member_masks(tmp_path):
    model = random_gamma_model(tmp_path)
    ls = get_layer_set(model.module_defs, 'shortcut')
    plan = make_plan(model, ls, 'shortcut', percent=0.4)
    assert ls.groups
    for group in ls.groups:
        gammas = np.stack([model.module_list[i][1].weight.detach().abs().numpy() for i in group])
        union = (gammas >= plan.threshold).any(0)
        for i in group:
            assert np.array_equal(plan.keep[i], union)
        assert (~union).any() and not (gammas >= plan.threshold)[0].all()  # a real union, channels removed


@pytest.mark.parametrize('round_to', ['pow2', 8, 32])
def test_regular_counts_are_powers_of_two_or_multiples_filled_by_strongest(round_to, tmp_path):
    model = random_gamma_model(tmp_path, seed=11)
    ls = get_layer_set(model.module_defs, 'regular')
    plan = make_plan(model, ls, 'regular', percent=0.6, min_keep=1, round_to=round_to)
    for i, keep in plan.keep.items():
        n, k = len(keep), int(keep.sum())
        ok = (k & (k - 1)) == 0 if round_to == 'pow2' else k % round_to == 0
        assert 1 <= k <= n and (ok or k == n), (i, k, n)
        g = model.module_list[i][1].weight.detach().abs().numpy()
        assert g[keep].min() >= g[~keep].max() if (~keep).any() else True   # the strongest channels are kept


def test_too_high_percent_names_layers_and_the_highest_safe_percent(tmp_path):
    model = random_gamma_model(tmp_path, seed=12)
    ls = get_layer_set(model.module_defs, 'normal')
    with pytest.raises(DarkslimError) as e:
        make_plan(model, ls, 'normal', percent=0.95)
    msg = str(e.value)
    assert '\n' not in msg and 'would remove every channel of layer(s)' in msg
    safe = float(msg.split('highest safe percent is ')[1].split()[0])
    named = [int(t.split()[0]) for t in msg.split('layer(s) ')[1].split(';')[0].split(', ')]
    gmax = {i: model.module_list[i][1].weight.detach().abs().max().item() for i in ls.prunable}
    assert min(gmax, key=gmax.get) in named
    plan = make_plan(model, ls, 'normal', percent=safe)                     # the reported percent works...
    assert all(k.any() for k in plan.keep.values())
    with pytest.raises(DarkslimError):                                     # ...and is the highest that does
        make_plan(model, ls, 'normal', percent=safe + 0.001 + 1 / sum(len(k) for k in plan.keep.values()))


def test_min_keep_keeps_the_k_strongest_of_emptied_layers_only(tmp_path):
    model = random_gamma_model(tmp_path, seed=12)
    ls = get_layer_set(model.module_defs, 'normal')
    k = 3
    plan = make_plan(model, ls, 'normal', percent=0.95, min_keep=k)
    gammas = {i: model.module_list[i][1].weight.detach().abs().numpy() for i in ls.prunable}
    cut = {i: g >= plan.threshold for i, g in gammas.items()}               # the |gamma| rule alone
    emptied = [i for i in ls.prunable if not cut[i].any()]
    assert plan.topped_up == emptied and emptied
    for i in emptied:
        assert np.array_equal(np.flatnonzero(plan.keep[i]), np.sort(np.argsort(-gammas[i], kind='stable')[:k]))
    # layers the cut leaves with 1..K-1 channels stay as cut (--min-keep is no floor for every layer)
    thin = [i for i in ls.prunable if 0 < cut[i].sum() < k]
    assert thin
    assert all(np.array_equal(plan.keep[i], cut[i]) for i in ls.prunable if i not in emptied)


@pytest.mark.parametrize('mode', ['normal', 'shortcut'])
def test_layer_keep_is_a_floor_for_every_layer(tmp_path, mode):
    # the reference is brute force over each unit: the cut, or its ceil(F * n) strongest channels when the cut
    # keeps fewer (a shortcut group's score is its members' maximum |gamma|)
    model = random_gamma_model(tmp_path, seed=12)
    ls = get_layer_set(model.module_defs, mode)
    f = 0.3
    plan = make_plan(model, ls, mode, percent=0.9, layer_keep=f)
    gammas = {i: model.module_list[i][1].weight.detach().abs().numpy() for i in ls.prunable}
    units = [list(g) for g in ls.groups] + [[i] for i in ls.prunable if ls.group_of(i) is None]
    raised = []
    for unit in units:
        score = np.max(np.stack([gammas[i] for i in unit]), 0)
        floor = math.ceil(f * len(score))
        cut = score >= plan.threshold
        want = cut if cut.sum() >= floor else np.isin(np.arange(len(score)), np.argsort(-score, kind='stable')[:floor])
        raised += unit if cut.sum() < floor else []
        assert all(np.array_equal(plan.keep[i], want) for i in unit), unit
    assert raised and sorted(raised) == plan.topped_up
    # without the floor the same cut leaves some layer below it (the case the floor exists for)
    assert make_plan(model, ls, mode, percent=0.9, min_keep=1).removed_share > plan.removed_share


def test_layer_keep_holds_under_a_flops_target(tmp_path):
    model = random_gamma_model(tmp_path, seed=12)
    ls = get_layer_set(model.module_defs, 'normal')
    hw = tuple(model.img_size)
    plan = make_plan(model, ls, 'normal', target_flops=0.6, layer_keep=0.25)
    assert all(k.sum() >= math.ceil(0.25 * len(k)) for k in plan.keep.values())
    assert plan.bflops[1] <= 0.4 * plan.bflops[0] + 1e-12
    assert plan.bflops[1] == pytest.approx(model_info(compact_model(model, plan).defs, *hw)[1])
    # the floor binds here: without it the same target leaves layers below a quarter of their channels
    bare = make_plan(model, ls, 'normal', target_flops=0.6, min_keep=1)
    assert plan.topped_up and any(k.sum() < math.ceil(0.25 * len(k)) for k in bare.keep.values())
    # a target the floors put out of reach is refused naming the floor
    with pytest.raises(DarkslimError, match=r'keeping its layer_keep 0.5 share; expected a smaller target_flops'):
        make_plan(model, ls, 'normal', target_flops=0.5, layer_keep=0.5)


def test_layer_keep_is_refused_with_steps(tmp_path):
    import pruning                      # a K-step prune's floor would be a share of an already narrowed model
    model = random_gamma_model(tmp_path)
    with pytest.raises(DarkslimError, match='expected one step with layer_keep') as e:
        pruning.prune(model, 'normal', pruning.PruneOptions(target_flops=0.3, steps=2, layer_keep=0.1))
    assert e.value.param == 'layer_keep'


@pytest.mark.parametrize('value', ['0', '1', '1.5'])
def test_layer_keep_outside_0_1_is_refused_in_one_line(tmp_path, value):
    model = random_gamma_model(tmp_path)
    ckpt = tmp_path / 'm.pt'
    save_checkpoint(ckpt, model)
    r = run_cli('normal_prune.py', '--weights', ckpt, '--percent', '0.5', '--layer-keep', value, '--out',
                tmp_path / 'o')
    assert one_line_error(r) and '--layer-keep' in r.stderr and 'in (0, 1)' in r.stderr, r.stderr
    assert not (tmp_path / 'o').exists() and not list(tmp_path.glob('o.*'))


def test_no_prunable_layer_is_a_self_contained_one_line_error(tmp_path):
    # both BN convs feed a [yolo] directly (0 -> 1; 0 -> route 2 -> 3 -> 4): nothing may lose channels
    head = conv(3 * (2 + 5), 1, act='linear')
    text = ("[net]\nwidth=32\nheight=32\nchannels=3\n\n" + head + yolo([0, 1, 2], ANCHORS6, 2)
            + "[route]\nlayers=0\n" + head + yolo([3, 4, 5], ANCHORS6, 2))
    model = Darknet(write(tmp_path, 'y.cfg', text)).eval()
    ls = get_layer_set(model.module_defs, 'tiny')
    assert ls.prunable == [] and ls.excluded == {0: 'feeds [yolo] 1', 3: 'feeds [yolo] 4'}
    with pytest.raises(DarkslimError) as e:
        make_plan(model, ls, 'tiny', percent=0.3)
    msg = str(e.value)                       # nothing printed before it: the message carries the layer list
    assert '\n' not in msg and 'above' not in msg
    assert 'all 2 BN convs are excluded (layer 0: feeds [yolo] 1; layer 3: feeds [yolo] 4)' in msg


def test_threshold_and_percent_agree(tmp_path):
    model = random_gamma_model(tmp_path, seed=13)
    ls = get_layer_set(model.module_defs, 'shortcut')
    by_percent = make_plan(model, ls, 'shortcut', percent=0.3)
    by_threshold = make_plan(model, ls, 'shortcut', threshold=by_percent.threshold)
    assert all(np.array_equal(by_percent.keep[i], by_threshold.keep[i]) for i in ls.prunable)
    # and the other way round: the share of channels under a threshold, asked as a percent, gives the same cut
    by_threshold = make_plan(model, ls, 'shortcut', threshold=0.05)
    flat = np.concatenate([model.module_list[i][1].weight.detach().abs().numpy() for i in ls.prunable])
    by_percent = make_plan(model, ls, 'shortcut', percent=float((flat < 0.05).mean()))
    assert all(np.array_equal(by_percent.keep[i], by_threshold.keep[i]) for i in ls.prunable)
    assert threshold_for_percent(flat, 0.0) == 0.0


def test_ties_at_the_cut_go_together_without_crashing(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 't.cfg', mini_tiny())), seed=14).eval()
    ls = get_layer_set(model.module_defs, 'tiny')
    with torch.no_grad():
        for i in ls.prunable:                  # |gamma| in {0.25, 0.5, 0.75, 1.0}: huge ties
            bn = model.module_list[i][1]
            bn.weight.copy_(((torch.arange(bn.num_features) % 4) + 1) * 0.25)
    plan = make_plan(model, ls, 'tiny', percent=0.3)
    # 30% asked; the quarter at 0.25 and the tie at 0.5 straddle the cut: all channels at 0.5 go too
    for i in ls.prunable:
        g = model.module_list[i][1].weight.detach().numpy()
        assert np.array_equal(plan.keep[i], g > 0.5)
    assert math.isclose(plan.threshold, 0.625)


# --- CLI: files, OpenCV, inputs untouched --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def narrow_v3(tmp_path_factory):
    """A narrow yolov3 (cfg + darknet .weights) with 40% of the prunable channels at gamma = beta = 0."""
    d = tmp_path_factory.mktemp('v3')
    defs = narrow_defs(REPO / 'cfg' / 'yolov3.cfg', nc=3, div=8, height=H, width=W)
    model = randomize_(Darknet(defs), seed=15).eval()
    sparsify_(model, get_layer_set(model.module_defs, 'shortcut'), share=0.4, seed=16)
    cfg = write_cfg(d / 'v3.cfg', defs)
    return cfg, save_weights(model, d / 'v3.weights'), model


@pytest.mark.parametrize('script,extra', [('shortcut_prune.py', []), ('regular_prune.py', ['--round-to', '8'])])
def test_cli_writes_a_model_darknet_and_opencv_load(script, extra, narrow_v3, tmp_path):
    cfg, weights, model = narrow_v3
    before = digest(cfg), digest(weights)
    out = tmp_path / 'out' / 'p'
    r = run_cli(script, '--cfg', cfg, '--weights', weights, '--percent', '0.3', '--latency-runs', '1',
                '--out', out, *extra)
    assert r.returncode == 0, r.stderr
    assert (digest(cfg), digest(weights)) == before                                  # inputs untouched
    assert 'mAP skipped' in r.stdout
    written = load_model(f'{out}.cfg', f'{out}.weights')
    from_pt = load_model(None, f'{out}.pt')
    x = image(5)
    ref = raw_outputs(model, x)
    assert max_diff(raw_outputs(written, x), ref) < ATOL                              # gamma = beta = 0 removed
    assert max_diff(raw_outputs(from_pt, x), ref) < ATOL
    # the written .weights are what OpenCV reads: our loader's save is byte-identical to them
    assert save_weights(written, tmp_path / 'again.weights').read_bytes() == Path(f'{out}.weights').read_bytes()
    (tmp_path / 'cv').mkdir()
    assert_matches_opencv(written, f'{out}.cfg', tmp_path / 'cv', H, W)
    src, dst = parse_cfg(cfg), parse_cfg(f'{out}.cfg')
    assert [d.get('anchors') for d in dst] == [d.get('anchors') for d in src]
    for a, b in zip(src, dst):                                       # only conv filters may change
        assert {k: v for k, v in a.items() if k != 'filters'} == {k: v for k, v in b.items() if k != 'filters'}
    report = json.loads(Path(f'{out}.json').read_text())
    assert report['after']['weights_bytes'] == Path(f'{out}.weights').stat().st_size
    # params and BFLOPs counted from the tensors of the models themselves (the report uses the cfg's layer table)
    assert report['img_size'] == [H, W]
    assert (report['after']['params'], report['after']['bflops']) == pytest.approx(counted_cost(written, H, W))
    assert (report['before']['params'], report['before']['bflops']) == pytest.approx(counted_cost(model, H, W))
    assert report['map'] is None
    rows = {r['layer']: r for r in report['plan']['layers']}
    assert all(rows[i]['after'] == dst[i + 1]['filters'] for i in rows)
    png = cv2.imread(f'{out}-channels.png')
    assert png is not None and png.shape[1] >= 640


def test_cli_tiny_from_pt_checkpoint_without_cfg(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 't.cfg', mini_tiny(nc=4))), seed=17).eval()
    sparsify_(model, get_layer_set(model.module_defs, 'tiny'), share=0.3, seed=18)
    pt = save_checkpoint(tmp_path / 'sparse.pt', model)
    before = digest(pt)
    r = run_cli('tiny_prune.py', '--weights', pt, '--threshold', '0.25', '--latency-runs', '1',
                '--out', tmp_path / 'p')
    assert r.returncode == 0, r.stderr
    assert digest(pt) == before
    x = torch.rand(1, 3, 96, 96)
    assert max_diff(raw_outputs(load_model(tmp_path / 'p.cfg', tmp_path / 'p.weights'), x),
                    raw_outputs(model, x)) < ATOL
    assert_matches_opencv(load_model(tmp_path / 'p.cfg', tmp_path / 'p.weights'), tmp_path / 'p.cfg', tmp_path,
                          96, 96)


def one_line_error(r):
    return r.returncode == 2 and 'Traceback' not in r.stderr and r.stderr.strip().count('\n') == 0


def test_cli_too_high_percent_is_one_line_exit_2_without_output(narrow_v3, tmp_path):
    cfg, weights, _ = narrow_v3
    r = run_cli('normal_prune.py', '--cfg', cfg, '--weights', weights, '--percent', '0.99', '--out',
                tmp_path / 'p')
    assert one_line_error(r), r.stderr
    assert 'highest safe --percent is' in r.stderr and r.stdout == ''
    assert list(tmp_path.iterdir()) == []


def test_a_cut_that_removes_nothing_is_refused_and_writes_nothing(narrow_v3, tmp_path):
    cfg, weights, model = narrow_v3
    ls = get_layer_set(model.module_defs, 'normal')
    with pytest.raises(DarkslimError, match='nothing to prune: percent 0 removes no channel'):
        make_plan(model, ls, 'normal', percent=0)
    with pytest.raises(DarkslimError, match='nothing to prune'):  # below every |gamma|, the zeros included
        make_plan(model, ls, 'normal', threshold=0)
    r = run_cli('normal_prune.py', '--cfg', cfg, '--weights', weights, '--percent', '0', '--out', tmp_path / 'p')
    assert one_line_error(r), r.stderr
    assert r.stderr.startswith('error: nothing to prune') and r.stdout == ''
    assert list(tmp_path.iterdir()) == []


def _checkpoint_trained_as(tmp_path, model, **args):
    return save_checkpoint(tmp_path / 'trained.pt', model, args={'cfg': 'x.cfg', **args})


@pytest.mark.parametrize('trained, strategy, expected', [
    ({'sr': False}, 'shortcut', 'was not sparse-trained (train.py without -sr)'),
    ({'sr': True, 'prune': 0}, 'shortcut', 'was sparse-trained for the normal layer set (-sr --prune 0), not the '
                                          'shortcut one'),
    ({'sr': True, 'prune': 1}, 'shortcut', None),
    ({'sr': True, 'prune': 0}, 'normal', None),
])
def test_prune_warns_when_the_checkpoint_was_sparse_trained_for_another_layer_set(tmp_path, narrow_v3, trained,
                                                                                 strategy, expected):
    cfg, _, model = narrow_v3
    pt = _checkpoint_trained_as(tmp_path, model, **trained)
    script = f"{strategy}_prune.py"
    r = run_cli(script, '--cfg', cfg, '--weights', pt, '--percent', '0.3', '--latency-runs', '0', '--out',
                tmp_path / 'p')
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stdout.splitlines() if line.startswith('warning:')]
    report = json.loads((tmp_path / 'p.json').read_text())['sparsity_training']
    if expected is None:
        assert warnings == [] and report['warning'] is None
    else:
        assert len(warnings) == 1 and expected in warnings[0] and report['warning'] == warnings[0]
    assert report['sparse_trained'] == trained['sr']


def test_power_of_two_rounding_keeps_at_least_8_unless_the_layer_is_smaller(tmp_path):
    model = random_gamma_model(tmp_path, seed=11)
    ls = get_layer_set(model.module_defs, 'regular')
    loose = make_plan(model, ls, 'normal', percent=0.85, min_keep=1)
    plan = make_plan(model, ls, 'regular', percent=0.85, min_keep=1, round_to='pow2')
    few = [i for i, keep in loose.keep.items() if 0 < keep.sum() < 8 < len(keep)]
    assert few, 'the cut must leave some layer with 1..7 of more than 8 channels'
    for i, keep in plan.keep.items():
        n, k, cut = len(keep), int(keep.sum()), int(loose.keep[i].sum())
        # the next power of two of what the cut keeps, floored at 8, capped at the layer's size
        assert k == min(n, max(8, 1 << (cut - 1).bit_length())), (i, cut, k, n)


def test_cli_without_arguments_prunes_weights_last_pt_or_says_what_to_pass(tmp_path):
    r = run_cli('shortcut_prune.py', cwd=tmp_path)
    assert one_line_error(r) and 'weights/last.pt' in r.stderr and '--weights' in r.stderr
    model = randomize_(Darknet(write(tmp_path, 'm.cfg', mini_yolov3(nc=2))), seed=19).eval()
    (tmp_path / 'weights').mkdir()
    save_checkpoint(tmp_path / 'weights' / 'last.pt', model)
    r = run_cli('shortcut_prune.py', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / 'weights' / 'last-shortcut-0.5'
    assert all(Path(f'{out}{ext}').is_file() for ext in ('.cfg', '.weights', '.pt', '.json', '-channels.png'))
    assert json.loads(Path(f'{out}.json').read_text())['plan']['percent'] == 0.5


def test_default_output_prefix_names_the_rounding_and_arguments_stay_untouched(tmp_path):
    import regular_prune
    cfg, weights = write(tmp_path, 'm.cfg', ''), write(tmp_path, 'm.weights', '')   # only their names matter
    prefixes = []
    for extra in ([], ['--round-to', '8'], ['--round-to', '32'], ['--threshold', '0.1']):
        args = regular_prune.get_args_parser().parse_args(['--cfg', str(cfg), '--weights', str(weights), *extra])
        given = dict(vars(args))
        resolved = resolve_inputs(args, 'regular')
        prefix, percent = resolved.prefix, resolved.percent
        assert vars(args) == given                                    # the default percent is returned, not set
        assert percent == (None if '--threshold' in extra else 0.5)
        prefixes.append(prefix)
    assert prefixes == [os.path.join('weights', f'm-regular-{v}') for v in ('0.5-pow2', '0.5-r8', '0.5-r32',
                                                                            't0.1-pow2')]


def test_cli_refuses_to_overwrite_its_input(narrow_v3):
    cfg, weights, _ = narrow_v3
    r = run_cli('normal_prune.py', '--cfg', cfg, '--weights', weights, '--out', str(cfg)[:-4])
    assert one_line_error(r) and 'is an input' in r.stderr


def same_detections(a, b, score_tol=2e-5, box_tol=2e-3):
    """Every COCO-json detection of `a` has one in `b` (same image and class, score and box within the json's
    rounding) and the counts agree: robust to ties reordering near-equal scores."""
    if len(a) != len(b):
        return False
    unused = list(b)
    for d in a:
        match = next((e for e in unused if (e['image_id'], e['category_id']) == (d['image_id'], d['category_id'])
                      and abs(e['score'] - d['score']) <= score_tol
                      and max(abs(u - v) for u, v in zip(e['bbox'], d['bbox'])) <= box_tol), None)
        if match is None:
            return False
        unused.remove(match)
    return True


def test_cli_with_data_reports_map_of_original_loose_and_compact(tmp_path):
    from utils.evaluate import evaluate
    from data.make_shapes import make_shapes
    data = make_shapes(tmp_path / 'shapes', n_train=1, n_val=6, img_size=64, seed=1)
    nc = 5                                                   # make_shapes' class count
    model = randomize_(Darknet(write(tmp_path, 't.cfg', mini_tiny(nc=nc, width=64, height=64))), seed=25).eval()
    with torch.no_grad():                  # objectness high enough that some boxes pass conf-thres 0.001
        for i in model.yolo_layers:
            model.module_list[i - 1][0].bias.fill_(0.5)
    sparsify_(model, get_layer_set(model.module_defs, 'tiny'), share=0.3, seed=21)
    pt = save_checkpoint(tmp_path / 's.pt', model)
    r = run_cli('tiny_prune.py', '--weights', pt, '--data', data, '--threshold', '0.25', '--img-size', 64,
                '--latency-runs', '1', '--out', tmp_path / 'p')
    assert r.returncode == 0, r.stderr
    assert 'mAP@0.5' in r.stdout
    maps = json.loads((tmp_path / 'p.json').read_text())['map']
    assert set(maps) == {'original', 'loose', 'compact'}
    # random weights, but dense low-confidence boxes of every class (multi-label NMS): some overlap a shape by
    # IoU >= 0.5, so the mAPs compared below are not 0 == 0
    assert maps['original']['mAP50'] > 0
    # gamma = beta = 0 channels removed: the three models detect the same boxes, so the same mAP
    for key in ('mAP50', 'mAP50_95'):
        assert maps['compact'][key] == pytest.approx(maps['original'][key], abs=1e-6)
        assert maps['loose'][key] == pytest.approx(maps['original'][key], abs=1e-6)
    # the same detections, compared directly: the original model vs the written compact model (COCO json)
    dets = {}
    for name, m in (('original', model), ('compact', load_model(tmp_path / 'p.cfg', tmp_path / 'p.weights'))):
        evaluate(m, data, img_size=64, verbose=False, save_json=tmp_path / f'{name}-dets.json')
        dets[name] = json.loads((tmp_path / f'{name}-dets.json').read_text())
    assert len(dets['original']) > 0
    assert same_detections(dets['original'], dets['compact'])
    moved = [{**d, 'score': d['score'] + 1e-3} for d in dets['compact']]     # and the comparison can fail
    assert not same_detections(dets['original'], moved)


def test_cli_calib_writes_the_calibrated_model_and_reports_the_beta_fold_beside_it(tmp_path):
    """--calib N on a model whose removed channels are alive (gamma small, not zero): the written model is the
    calibrated one (closer to the original than the beta fold on new images), the JSON names the steps and
    the number of train images used (the split has 3: --calib 50 uses 3), and mAP of the beta fold is reported.
    Steps mean and refit: re-estimating BN (the default's third step) on 3 images would replace this random
    model's arbitrary running statistics, which the original output depends on."""
    from data.make_shapes import make_shapes
    data = make_shapes(tmp_path / 'shapes', n_train=3, n_val=2, img_size=64, seed=2)
    model = randomize_(Darknet(write(tmp_path, 't.cfg', mini_tiny(nc=5, width=64, height=64))), seed=26).eval()
    pt = save_checkpoint(tmp_path / 's.pt', model)
    r = run_cli('tiny_prune.py', '--weights', pt, '--data', data, '--percent', '0.3', '--calib', '50',
                '--calib-steps', 'mean,refit', '--img-size', 64, '--latency-runs', '0', '--out', tmp_path / 'p')
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / 'p.json').read_text())
    assert report['calibration']['steps'] == ['mean', 'refit'] and report['calibration']['images'] == 3
    assert set(report['map']) == {'original', 'loose', 'compact', 'beta_fold'}
    written = load_model(tmp_path / 'p.cfg', tmp_path / 'p.weights')
    plan = make_plan(model, get_layer_set(model.module_defs, 'tiny'), 'tiny', percent=0.3)
    beta = compact_model(model, plan)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    assert max_diff(raw_outputs(written, x), raw_outputs(model, x)) < max_diff(raw_outputs(beta, x),
                                                                                raw_outputs(model, x))
    r = run_cli('tiny_prune.py', '--weights', pt, '--percent', '0.3', '--calib', '5', '--out', tmp_path / 'q')
    assert one_line_error(r) and '--calib 5 needs --data' in r.stderr and not (tmp_path / 'q.cfg').exists()


def test_the_library_imports_and_evaluates_from_outside_the_repository(tmp_path):
    """`import prune_utils` with the repository appended to sys.path and another working directory (where a
    bare `import test` would find Python's own test package): plan, surgery and evaluation all work."""
    from data.make_shapes import make_shapes
    data = make_shapes(tmp_path / 'shapes', n_train=1, n_val=3, img_size=64, seed=3)
    cfg = write(tmp_path, 't.cfg', mini_tiny(nc=5, width=64, height=64))
    code = f"""
import sys
sys.path.append({str(REPO)!r})
import prune_utils, models
from tests.helpers import randomize_
from utils.evaluate import evaluate
m = randomize_(models.Darknet({str(cfg)!r}), seed=1).eval()
ls = prune_utils.get_layer_set(m.module_defs, 'tiny')
c = prune_utils.compact_model(m, prune_utils.make_plan(m, ls, 'tiny', percent=0.3))
r = evaluate(c, {str(data)!r}, img_size=64, verbose=False)
print('images', r['images'], 'channels', sum(d.get('filters', 0) for d in c.module_defs) < sum(d.get('filters', 0) for d in m.module_defs))
"""
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['images', '3', 'channels', 'True']


# --- a yolov4-csp-shaped network: mish, CSP splits, SPP, [yolo] new_coords=1 heads ---------------------------------

def csp_cfg(nc=3):
    """yolov4-csp.cfg's building blocks at toy width (96 x 128 input): mish convs, a CSP block (route -2 split,
    a residual, concatenation of both parts), SPP maxpools, logistic head convs and new_coords=1 heads."""
    m = 'mish'
    s = "[net]\nwidth=128\nheight=96\nchannels=3\n"
    s += conv(8, 3, 1, act=m) + conv(16, 3, 2, act=m)                      # 0 1        /2
    s += conv(8, 1, act=m) + "[route]\nlayers=-2\n" + conv(8, 1, act=m)    # 2 3 4      CSP: part A, part B
    s += conv(8, 1, act=m) + conv(8, 3, act=m) + "[shortcut]\nfrom=-3\nactivation=linear\n"  # 5 6 7
    s += conv(8, 1, act=m) + "[route]\nlayers=-1,-7\n" + conv(16, 1, act=m)  # 8 9 10     transition
    s += conv(32, 3, 2, act=m) + conv(16, 1, act='leaky')                   # 11 12      /4
    s += "[maxpool]\nsize=5\nstride=1\n[route]\nlayers=-2\n[maxpool]\nsize=9\nstride=1\n"  # 13 14 15  SPP
    s += "[route]\nlayers=-1,-3,-4\n" + conv(16, 1, act=m)                  # 16 17
    s += conv(3 * (nc + 5), 1, bn=0, act='logistic')                        # 18
    s += yolo([3, 4, 5], ANCHORS6, nc) + "scale_x_y=2.0\nnew_coords=1\n"   # 19
    s += "[route]\nlayers=-3\n" + conv(8, 1, act=m) + "[upsample]\nstride=2\n"  # 20 21 22
    s += "[route]\nlayers=-1,10\n" + conv(16, 3, act=m)                      # 23 24     /2
    s += conv(3 * (nc + 5), 1, bn=0, act='logistic')                        # 25
    s += yolo([0, 1, 2], ANCHORS6, nc) + "scale_x_y=2.0\nnew_coords=1\n"   # 26
    return s


@pytest.mark.parametrize('mode', ['normal', 'shortcut'])
def test_csp_shaped_zero_channels_keep_outputs(mode, tmp_path):
    model = randomize_(Darknet(write(tmp_path, 'csp.cfg', csp_cfg())), seed=21).eval()
    ls = get_layer_set(model.module_defs, mode)
    assert {2, 5, 8, 10, 17, 24} <= set(ls.prunable) and 18 not in ls.prunable    # 18: the logistic head
    # the residual [shortcut] 7 couples 4 and 6: one group in shortcut mode, left whole in normal mode
    assert ls.groups == [[4, 6]] if mode == 'shortcut' else {4, 6} <= set(ls.excluded)
    sparsify_(model, ls, share=0.4, seed=22, beta=0.0)
    _, plan, loose, compact = prune(model, mode, threshold=0.25)
    assert all(k.any() for k in plan.keep.values()) and plan.removed_share > 0.2
    x = image(5)
    assert max_diff(raw_outputs(compact, x), raw_outputs(model, x)) < ATOL
    assert max_diff(raw_outputs(compact, x), raw_outputs(loose, x)) < ATOL


def test_csp_shaped_prune_with_live_beta_equals_loose_and_opencv(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 'csp.cfg', csp_cfg())), seed=23).eval()
    with torch.no_grad():              # beta far from 0: removed mish channels carry constants into routes and SPP
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.normal_(0, 1, generator=torch.Generator().manual_seed(m.num_features))
    _, plan, loose, compact = prune(model, 'shortcut', percent=0.5, min_keep=1)
    assert plan.removed_share > 0.2
    x = image(6)
    assert max_diff(raw_outputs(compact, x), raw_outputs(loose, x)) < ATOL
    cfg = write_cfg(tmp_path / 'compact.cfg', compact.defs)
    assert_matches_opencv(compact, cfg, tmp_path, H, W)
