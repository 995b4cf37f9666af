"""Layer pruning (prune_layers.py + layer_prune.py), specified by equalities of two routes: the pruned network vs
the original where the maths says they agree, every rewritten index vs the layer that produced it in the original
(by weight identity, as our parser, OpenCV and darknet read the written cfg), and the CLI's one-line errors."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layer_prune
import prune_layers
import prune_utils
from models import Darknet, load_model
from prune_layers import find_blocks, prune
from tests.helpers import (ANCHORS6, REPO, assert_matches_opencv, conv, max_diff, mini_yolov3, narrow_defs, randomize_,
                           raw_outputs, sparsify_, write, yolo)
from utils.darknet_weights import save_weights
from utils.errors import DarkslimError, cli_main
from utils.parse_config import layer_inputs, parse_cfg, write_cfg
from tests.helpers import one_thread  # noqa: F401 (autouse: one intra-op thread in this file)

H, W = 96, 128            # small, non-square input
ATOL = 1e-4
NC = 4                    # not the cfgs' 80




def shortcut(frm, act='linear'):
    return f"[shortcut]\nfrom={frm}\nactivation={act}\n"


def route(*layers):
    return f"[route]\nlayers={','.join(map(str, layers))}\n"


def custom_cfg(nc=NC):
    """Residual blocks read across by an absolute route, a 3-input route and a shortcut whose `from` spans two
    blocks. Blocks (shortcut <- from): 3 <- 0, 6 <- 3, 10 <- 7 (absolute from), 15 <- 12, 18 <- 15."""
    s = f"[net]\nwidth={W}\nheight={H}\nchannels=3\n\n"
    s += conv(16, 3, 2)                                     # 0
    s += conv(8, 1) + conv(16, 3) + shortcut(-3)            # 1 2 3
    s += conv(8, 1) + conv(16, 3) + shortcut(-3)            # 4 5 6
    s += shortcut(-7)                                       # 7 = 6 + 0: spans blocks 3 and 6 (itself no block)
    s += conv(8, 1) + conv(16, 3) + shortcut(7)             # 8 9 10
    s += route(3, 10, 6)                                    # 11: absolute, 3 inputs, 48 channels
    s += conv(24, 3, 2)                                     # 12
    s += conv(12, 1) + conv(24, 3) + shortcut(-3)           # 13 14 15
    s += conv(12, 1) + conv(24, 3) + shortcut(-3)           # 16 17 18
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')          # 19
    s += yolo([3, 4, 5], ANCHORS6, nc)                      # 20
    s += route(-3)                                          # 21 -> 18
    s += conv(8, 1) + "[upsample]\nstride=2\n"              # 22 23
    s += route(-1, 10)                                      # 24: relative + absolute
    s += conv(16, 3)                                        # 25
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')          # 26
    s += yolo([0, 1, 2], ANCHORS6, nc)                      # 27
    return s


def one_by_one_blocks_cfg(nc=NC):
    """Two blocks whose constants reach only 1x1 convs: through [shortcut] 6, [maxpool] 7, [route] 11 and
    [upsample] 10 - so folding act(beta) is exact everywhere, borders included."""
    s = "[net]\nwidth=64\nheight=64\nchannels=3\n\n"
    s += conv(16, 3, 2)                                     # 0
    s += conv(8, 1) + conv(16, 3) + shortcut(-3)            # 1 2 3     block 3 <- 0
    s += conv(8, 1) + conv(16, 3) + shortcut(-3)            # 4 5 6     block 6 <- 3 (its conv 4 is 1x1)
    s += "[maxpool]\nsize=2\nstride=2\n"                    # 7
    s += conv(24, 1) + conv(12, 1)                          # 8 9
    s += "[upsample]\nstride=2\n"                           # 10
    s += route(-1, 6)                                       # 11
    s += conv(16, 1)                                        # 12
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')          # 13
    s += yolo([0, 1, 2], ANCHORS6, nc)                      # 14
    s += route(8) + conv(3 * (nc + 5), 1, bn=0, act='linear') + yolo([3, 4, 5], ANCHORS6, nc)   # 15 16 17
    return s


def defs_of(name, tmp_path):
    if name == 'custom':
        return parse_cfg(write(tmp_path, 'custom.cfg', custom_cfg()))
    return narrow_defs(REPO / 'cfg' / f'{name}.cfg', nc=NC, height=H, width=W)


def silence_(model, shortcuts, beta=0.0):
    """gamma = 0 (and beta = `beta`, or N(0, 1) for 'random') in the BN of the conv feeding each [shortcut]."""
    g = torch.Generator().manual_seed(len(shortcuts))
    with torch.no_grad():
        for s in shortcuts:
            bn = model.module_list[s - 1][1]
            bn.weight.zero_()
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) if beta == 'random' else torch.full_like(
                bn.bias, beta))


def image(seed=1, h=H, w=W):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def removed_layers(defs, shortcuts):
    """Every layer a removal of these [shortcut]s deletes: from+1 .. shortcut (read from the cfg here)."""
    gone = set()
    for s in shortcuts:
        f = layer_inputs(defs, s)[1]
        gone |= set(range(f + 1, s + 1))
    return gone


def fingerprints(defs, model, inputs=None, alias=None):
    """Per layer, a hash of what it computes: a conv by its weight tensor, any other layer by its type and its
    inputs' fingerprints (`inputs`: layer -> input layers, default our parser's; `alias`: layer -> the layer
    whose value it stands for)."""
    fp = []
    for i, d in enumerate(defs[1:]):
        if alias and i in alias:
            fp.append(fp[alias[i]])
            continue
        ins = inputs[i] if inputs is not None else layer_inputs(defs, i)
        if d['type'] == 'convolutional':
            key = model.module_list[i][0].weight.detach().numpy().tobytes()
        else:
            key = (d['type'] + ':' + ','.join(fp[j] for j in ins)).encode()
        fp.append(hashlib.sha256(key).hexdigest())
    return fp


def assert_same_producers(src_defs, model, shortcuts, dst_defs, compact, dst_inputs=None):
    """The written network is the original minus the removed layers, and every layer of it computes from the
    same producers as its original (indices compared through weight identity of the convs they reach)."""
    alias = {s: layer_inputs(src_defs, s)[1] for s in shortcuts}     # a removed block leaves its stream
    kept = [i for i in range(len(src_defs) - 1) if i not in removed_layers(src_defs, shortcuts)]
    assert len(dst_defs) - 1 == len(kept)
    before = fingerprints(src_defs, model, alias=alias)
    after = fingerprints(dst_defs, compact, dst_inputs)
    assert after == [before[i] for i in kept]
    for old, d in zip(kept, dst_defs[1:]):     # every key but the renumbered indices is unchanged
        a = {k: v for k, v in src_defs[old + 1].items() if k not in ('layers', 'from')}
        assert a == {k: v for k, v in d.items() if k not in ('layers', 'from')}
        assert [k for k in src_defs[old + 1]] == [k for k in d]


def darknet_inputs(cfg, weights, tmp_path):
    """{layer: input layers} of every [route] / [shortcut] as AlexeyAB/pjreddie darknet parses the cfg (its start-up
    table), after checking it loads the weights and saves the same bytes; None when darknet is not installed."""
    exe = shutil.which('darknet')
    if exe is None:
        return None
    out = tmp_path / 'darknet-resaved.weights'
    r = subprocess.run([exe, 'partial', str(cfg), str(weights), str(out), '100000'], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_bytes() == Path(weights).read_bytes()
    found = {}
    for line in (r.stdout + r.stderr).splitlines():
        m = re.match(r'\s*(\d+) (route|res)\s+(\d+(?: \d+)*)', line)   # res: its `from`, then shapes
        if m:
            i, ins = int(m.group(1)), [int(v) for v in m.group(3).split()]
            found[i] = ins if m.group(2) == 'route' else [i - 1] + ins
    return found


# --- blocks from the graph -------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['yolov3.cfg', 'yolov3-spp.cfg'])
def test_darknet53_blocks_are_its_23_residual_blocks_and_shortcut_sparsity_regularizes_them(name):
    defs = parse_cfg(REPO / 'cfg' / name)
    bs = find_blocks(defs[1:])
    shortcuts = [i for i, d in enumerate(defs[1:]) if d['type'] == 'shortcut']
    assert len(shortcuts) == 23 and bs.rejected == {}
    assert [b.shortcut for b in bs.candidates] == shortcuts
    for b in bs.candidates:                     # 1x1 then 3x3, added to the layer `from` names
        assert b.source == b.shortcut + defs[b.shortcut + 1]['from'][0] == b.shortcut - 3
        assert [defs[j + 1]['size'] for j in b.branch] == [1, 3]
    sparse = prune_utils.get_layer_set(defs[1:], 'shortcut')
    assert all(b.regularized for b in bs.candidates) and {b.last for b in bs.candidates} <= set(sparse.prunable)


def test_shortcuts_that_are_no_blocks_are_listed_with_why(tmp_path):
    s = "[net]\nwidth=64\nheight=64\nchannels=3\n\n" + conv(16, 3, 2)          # 0
    s += conv(16, 1) + shortcut(-2)                                          # 1 2
    s += conv(16, 1) + shortcut(-2, 'leaky')                                 # 3 4
    s += conv(16, 1) + shortcut('-2,-1')                                     # 5 6
    s += conv(16, 1, bn=0) + shortcut(-2)                                    # 7 8
    s += conv(8, 1) + conv(16, 3) + shortcut(-3)                             # 9 10 11 (route 17 reads 9)
    s += conv(16, 1) + "[maxpool]\nsize=1\nstride=1\n" + shortcut(-3)        # 12 13 14
    s += conv(16, 3, act='logistic') + shortcut(-2)                          # 15 16
    s += route(9, 16) + conv(27, 1) + conv(27, 1) + shortcut(-2)             # 17 18 19 20
    s += yolo([0, 1, 2], ANCHORS6, 4)                                        # 21
    s += route(17) + conv(8, 1) + conv(24, 3) + shortcut(-3)                 # 22 23 24 25
    s += conv(27, 1, bn=0, act='linear') + yolo([3, 4, 5], ANCHORS6, 4)      # 26 27
    bs = find_blocks(parse_cfg(write(tmp_path, 'r.cfg', s))[1:])
    assert bs.rejected == {
        2: 'its constant would pass [shortcut] 4 activation leaky (not linear: act(x + c) is no shift of act(x))',
        4: 'activation leaky (removing it turns act(x + branch) into x, no constant shift)',
        6: 'adds 3 layers (from=-2,-1); expected one',
        8: 'last branch conv 7 has no BN (no gamma to score)',
        11: 'layer 17 reads branch layer 9; expected the branch to feed only [shortcut] 11',
        14: 'branch 12..13 holds [maxpool] 13; expected a plain chain of convs',
        16: 'last branch conv 15 activation logistic (act(0) != 0)',
        20: 'its constant act(beta) would reach [yolo] 21 with no conv between to absorb it'}
    # the one candidate's stream reaches the logistic conv 15 through route 22 -> 17 -> [shortcut] 16: the
    # shortcut layer set leaves its last conv whole, so -sr --prune 1 does not regularize its gamma
    [b] = bs.candidates
    assert (b.shortcut, b.source, b.branch, b.regularized) == (25, 22, [23, 24], False)
    assert 'layer 24 is not in the shortcut layer set' in b.note


# --- removal with gamma = beta = 0: outputs unchanged ----------------------------------------------------------

def chosen_blocks(name, defs):
    if name == 'custom':
        return [6, 10, 18]                     # spanned by shortcut 7 and route 11, read by routes 11, 21, 24
    return [b.shortcut for b in find_blocks(defs[1:]).candidates][::3]


@pytest.mark.parametrize('channels', [False, True], ids=['layers', 'layers+channels'])
@pytest.mark.parametrize('name', ['yolov3', 'yolov3-spp', 'custom'])
def test_removing_blocks_with_zero_gamma_and_beta_keeps_outputs(name, channels, tmp_path):
    defs = defs_of(name, tmp_path)
    model = randomize_(Darknet(defs, img_size=(H, W)), seed=2).eval()
    chosen = chosen_blocks(name, defs)
    if channels:                               # and a share of the remaining channels at gamma = beta = 0
        sparsify_(model, prune_utils.get_layer_set(model.module_defs, 'shortcut'), share=0.4, seed=3)
    silence_(model, chosen)
    result = prune(model, len(chosen), threshold=0.25 if channels else None)   # randomize_: |gamma| >= 0.5
    assert [b.shortcut for b in result.plan.removed] == chosen                  # the score-0 blocks go
    x = image()
    ref = raw_outputs(model, x)
    assert max_diff(raw_outputs(result.compact, x), ref) < ATOL
    assert max_diff(raw_outputs(result.loose, x), ref) < ATOL
    n_layers = len(model.module_defs) - len(removed_layers(defs, chosen))
    assert len(result.compact.module_defs) == n_layers
    if channels:
        assert result.plan.channel_plan.removed_share > 0.3
    else:
        assert_same_producers(defs, model, chosen, result.compact.defs, result.compact)


# --- the fold: exact for 1x1 consumers, at the border only for k x k ones ----------------------------------------

def test_constants_of_removed_blocks_fold_exactly_into_1x1_consumers(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 'c.cfg', one_by_one_blocks_cfg())), seed=4).eval()
    assert [b.shortcut for b in find_blocks(model.module_defs).candidates] == [3, 6]
    # channels at gamma = 0 with beta != 0 too, for the layer + channel prune (its fold is prune_utils')
    sparsify_(model, prune_utils.get_layer_set(model.module_defs, 'shortcut'), share=0.4, seed=5, beta='random')
    silence_(model, [3, 6], beta='random')                  # each branch outputs act(beta) != 0
    x = image(2, 64, 64)
    ref = raw_outputs(model, x)
    for channels in (None, 0.25):
        result = prune(model, 2, threshold=channels)
        assert [b.shortcut for b in result.plan.removed] == [3, 6]
        assert max_diff(raw_outputs(result.compact, x), ref) < ATOL
    assert result.plan.channel_plan.removed_share > 0.3
    # the same blocks with their constants dropped (beta = 0: what removal without the fold computes) move the
    # outputs, so the fold above did the work
    unfolded = Darknet(write(tmp_path, 'c.cfg', one_by_one_blocks_cfg())).eval()
    unfolded.load_state_dict(model.state_dict())
    silence_(unfolded, [3, 6], beta=0.0)
    assert max_diff(raw_outputs(unfolded, x), ref) > 1e-2


def test_constants_into_kxk_consumers_differ_only_at_the_image_border(tmp_path):
    # mini_yolov3: blocks 8 and 11 feed 3x3 conv 12 (stride 2); away from the border the fold is exact
    model = randomize_(Darknet(write(tmp_path, 'm.cfg', mini_yolov3(nc=NC, width=256, height=256))), seed=5).eval()
    silence_(model, [8, 11], beta='random')
    result = prune(model, 2)
    x = image(3, 256, 256)
    diffs = [(u - v).abs().amax((0, 1, 4)) for u, v in zip(raw_outputs(model, x), raw_outputs(result.compact, x))]
    assert max(d.max().item() for d in diffs) > 1e-2                    # the border: an approximation
    assert max(d[6:-6, 6:-6].max().item() for d in diffs) < ATOL        # the interior: exact
    assert max_diff(raw_outputs(result.loose, x), raw_outputs(result.compact, x)) < ATOL


def test_compact_equals_loose_for_any_gamma_and_beta(tmp_path):
    model = randomize_(Darknet(defs_of('yolov3-spp', tmp_path), img_size=(H, W)), seed=6).eval()
    with torch.no_grad():                       # beta far from 0: large constants in every block
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.normal_(0, 1, generator=torch.Generator().manual_seed(m.num_features))
    result = prune(model, 12)
    x = image(4)
    assert max_diff(raw_outputs(result.compact, x), raw_outputs(result.loose, x)) < ATOL


# --- written files: our parser, OpenCV, darknet ----------------------------------------------------------------

@pytest.mark.parametrize('channels', [False, True], ids=['layers', 'layers+channels'])
def test_written_model_loads_in_opencv_and_darknet_with_indices_at_the_same_producers(channels, tmp_path):
    defs = defs_of('custom', tmp_path)
    model = randomize_(Darknet(defs), seed=7).eval()
    chosen = chosen_blocks('custom', defs)
    if channels:
        sparsify_(model, prune_utils.get_layer_set(model.module_defs, 'shortcut'), share=0.4, seed=8)
    silence_(model, chosen)
    result = prune(model, len(chosen), threshold=0.25 if channels else None)
    paths = {'.cfg': write_cfg(tmp_path / 'p.cfg', result.compact.defs),
             '.weights': save_weights(result.compact, tmp_path / 'p.weights')}
    written = load_model(paths['.cfg'], paths['.weights'])
    x = image(5)
    assert max_diff(raw_outputs(written, x), raw_outputs(result.compact, x)) < 1e-6
    assert max_diff(raw_outputs(written, x), raw_outputs(model, x)) < ATOL
    (tmp_path / 'cv').mkdir()
    assert_matches_opencv(written, paths['.cfg'], tmp_path / 'cv', H, W)
    dst = parse_cfg(paths['.cfg'])
    ours = {i: layer_inputs(dst, i) for i, d in enumerate(dst[1:]) if d['type'] in ('route', 'shortcut')}
    theirs = darknet_inputs(paths['.cfg'], paths['.weights'], tmp_path)
    assert theirs is None or theirs == ours
    if not channels:                            # conv weights unchanged: producers checked by identity
        assert_same_producers(defs, model, chosen, dst, written)
        if theirs is not None:
            assert_same_producers(defs, model, chosen, dst, written,
                                  {i: theirs.get(i, layer_inputs(dst, i)) for i in range(len(dst) - 1)})


# --- N = 0, N too large, the CLI --------------------------------------------------------------------------------

def test_removing_no_block_changes_nothing(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 'm.cfg', mini_yolov3(nc=NC))), seed=9).eval()
    result = prune(model, 0)
    assert result.plan.removed == [] and result.compact.cfg_text() == model.cfg_text()
    a = save_weights(model, tmp_path / 'a.weights').read_bytes()
    assert save_weights(result.compact, tmp_path / 'b.weights').read_bytes() == a


@pytest.mark.parametrize('n', [5, -1])
def test_more_blocks_than_candidates_is_a_one_line_error(n, tmp_path):
    model = Darknet(write(tmp_path, 'm.cfg', mini_yolov3(nc=NC))).eval()             # 4 candidate blocks
    with pytest.raises(DarkslimError) as e:
        prune(model, n)
    assert str(e.value) == (f"n_blocks {n}: the cfg has 4 candidate residual blocks (of 4 [shortcut] layers); "
                            "expected n_blocks in 0..4")


def test_help_names_the_sparse_training_mode():
    text = layer_prune.get_args_parser().format_help()
    assert '-sr --prune 1' in text and '--shortcuts N' in text


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cli(*args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, str(REPO / 'layer_prune.py'), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope='module')
def narrow_v3(tmp_path_factory):
    """A narrow yolov3 (cfg + darknet .weights) with every third block's last BN at gamma = beta = 0."""
    d = tmp_path_factory.mktemp('v3')
    defs = defs_of('yolov3', d)
    model = randomize_(Darknet(defs), seed=10).eval()
    chosen = chosen_blocks('yolov3', defs)
    silence_(model, chosen)
    return write_cfg(d / 'v3.cfg', defs), save_weights(model, d / 'v3.weights'), model, chosen


def test_cli_writes_the_pruned_model_atomically_leaving_its_inputs(narrow_v3, tmp_path):
    cfg, weights, model, chosen = narrow_v3
    before = digest(cfg), digest(weights)
    out = tmp_path / 'out' / 'p'
    r = run_cli('--cfg', cfg, '--weights', weights, '--shortcuts', len(chosen), '--latency-runs', 0, '--out', out)
    assert r.returncode == 0, r.stderr
    assert (digest(cfg), digest(weights)) == before                                   # inputs untouched
    names = [f'p{ext}' for ext in prune_utils.OUTPUT_EXTS]
    assert sorted(os.listdir(out.parent)) == sorted(names)                             # atomic: no temp files
    scores = [float(row.split('|')[5]) for row in r.stdout.splitlines() if re.match(r'\| \d+ ', row)]
    assert len(scores) == 23 and scores == sorted(scores) and scores[:len(chosen)] == [0.0] * len(chosen)
    report = json.loads(Path(f'{out}.json').read_text())
    assert [b['shortcut'] for b in report['plan']['removed']] == chosen
    assert report['strategy'] == 'layer' and report['after']['params'] < report['before']['params']
    written = load_model(f'{out}.cfg', f'{out}.weights')
    assert max_diff(raw_outputs(written, image(6)), raw_outputs(model, image(6))) < ATOL
    assert max_diff(raw_outputs(load_model(None, f'{out}.pt'), image(6)), raw_outputs(model, image(6))) < ATOL
    (tmp_path / 'cv').mkdir()
    assert_matches_opencv(written, f'{out}.cfg', tmp_path / 'cv', H, W)
    dst = parse_cfg(f'{out}.cfg')
    theirs = darknet_inputs(f'{out}.cfg', f'{out}.weights', tmp_path)
    assert theirs is None or theirs == {i: layer_inputs(dst, i) for i, d in enumerate(dst[1:])
                                        if d['type'] in ('route', 'shortcut')}


def test_cli_more_blocks_than_candidates_is_one_line_exit_2_without_output(narrow_v3, tmp_path, capsys):
    cfg, weights, _, _ = narrow_v3
    args = layer_prune.get_args_parser().parse_args(['--cfg', str(cfg), '--weights', str(weights),
                                                     '--shortcuts', '24', '--out', str(tmp_path / 'no' / 'p')])
    with pytest.raises(SystemExit) as e:
        cli_main(layer_prune.main, args)
    err = capsys.readouterr()
    assert e.value.code == 2 and err.out == '' and err.err.count('\n') == 1
    assert err.err == (f"error: {cfg}: --shortcuts 24: the cfg has 23 candidate residual blocks (of 23 [shortcut] "
                       "layers); expected --shortcuts in 0..23\n")
    assert not (tmp_path / 'no').exists()


def test_fold_scores_blocks_by_the_damage_their_removal_does(tmp_path):
    """A block whose last BN is silenced (gamma = beta = 0: it adds exactly 0) does no damage; live blocks do,
    and the score is the head-output change of the layer-pruned model (an independent route: the compact model
    with the block's measured mean folded in)."""
    import calibrate
    from prune_layers import compact_layer_model, make_layer_plan
    model = randomize_(Darknet(write(tmp_path, 'm.cfg', mini_yolov3(nc=NC))), seed=21).eval()
    blocks = find_blocks(model.module_defs).candidates
    silence_(model, [blocks[1].shortcut])
    x = torch.rand(4, 3, H, W, generator=torch.Generator().manual_seed(22))
    plan = make_layer_plan(model, 1, 'fold', x)
    scores = {b.shortcut: b.score for b in plan.block_set.candidates}
    assert scores[blocks[1].shortcut] < 1e-12 and min(v for k, v in scores.items() if k != blocks[1].shortcut) > 1e-6
    assert [b.shortcut for b in plan.removed] == [blocks[1].shortcut]
    live = make_layer_plan(model, 0, 'fold', x)
    live.removed = [next(b for b in live.block_set.candidates if b.shortcut == blocks[2].shortcut)]
    means = calibrate.mean_activations(model, [live.removed[0].last], x)
    live.keep_layers, live.where = prune_layers._layer_map(len(model.module_defs), live.removed)
    small = compact_layer_model(model, live, means)
    by_route = sum(float(((a.double() - b.double()) ** 2).mean()) for a, b in zip(raw_outputs(small, x),
                                                                                   raw_outputs(model, x)))
    assert scores[blocks[2].shortcut] == pytest.approx(by_route, rel=1e-4)
    assert 'head-output error' in plan.table()
