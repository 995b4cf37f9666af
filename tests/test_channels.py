"""The channel engine (channels.py), the one prune path (pruning.py + prune_cli.py), replayable plans, errors that
name parameters, and the importance seam.

Each walker is checked against values worked out by hand on a small cfg; a replayed plan against the prune that
wrote it (byte for byte); the CLI's flags against the library's parameter names.
"""
import json

import numpy as np
import pytest
import torch

import channels
import layer_prune
import pruning
import shortcut_prune
import tiny_prune
from importance import IMPORTANCES, Importance
from models import Darknet, load_model
from prune_utils import get_layer_set, make_plan
from tests.helpers import ANCHORS6, conv, max_diff, mini_tiny, mini_yolov3, randomize_, raw_outputs, write, yolo
from utils.darknet_weights import save_weights
from utils.errors import DarkslimError, cli_main

from tests.helpers import one_thread  # noqa: F401 (autouse: one intra-op thread in this file)


def split_cfg():
    """0 conv 8 | 1 route 0 groups=2 id=1 (channels 4..7) | 2 conv 6 | 3 route 2,0 (6 + 8) | 4 conv 8 |
    5 shortcut 4 + 0 | 6 maxpool | 7 conv 4 | 8 shortcut 7 + 6 (unequal: 4 of 8) | 9 conv head | 10 yolo"""
    s = "[net]\nwidth=32\nheight=32\nchannels=3\n\n"
    s += conv(8, 3)                                                     # 0
    s += "[route]\nlayers=-1\ngroups=2\ngroup_id=1\n"                   # 1
    s += conv(6, 1)                                                     # 2
    s += "[route]\nlayers=-1,0\n"                                       # 3
    s += conv(8, 1)                                                     # 4
    s += "[shortcut]\nfrom=0\nactivation=linear\n"                      # 5
    s += "[maxpool]\nsize=2\nstride=2\n"                                # 6
    s += conv(4, 1)                                                     # 7
    s += "[shortcut]\nfrom=-2\nactivation=linear\n"                     # 8: 4 channels (its first input's)
    s += conv(3 * 6, 1, bn=0, act='linear') + yolo([0, 1, 2], ANCHORS6, 1)   # 9 10
    return s


def test_graph_provenance_follows_each_rule_by_hand(tmp_path):
    model = Darknet(write(tmp_path, 's.cfg', split_cfg()))
    g = channels.Graph(model.module_defs)
    assert g.segs[1] == [(0, 4, 4)]                       # concat of one slice: channels 4..7 of conv 0
    assert g.segs[3] == [(2, 0, 6), (0, 0, 8)]            # concatenation in order
    assert g.segs[5] == [(5, 0, 8)] and g.segs[6] == [(5, 0, 8)]   # a sum is a node; maxpool passes
    assert g.segs[8] == [(8, 0, 4)]                       # the first input's width
    assert g.channels == [8, 4, 6, 14, 8, 8, 8, 4, 4, 18, 18]
    assert g.whole_node(1) is None and g.whole_node(6) == 5
    assert g.nodes_read_by(8) == [5, 7] and g.nodes_read_by(0) == [channels.IMAGE]
    assert g.readers()[0] == [1, 3, 5]


def test_channel_flow_slices_concatenates_and_sums_the_overlap_by_hand(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 's.cfg', split_cfg())), seed=1).eval()
    kept = np.array([False, True, True, True, True, True, False, True])    # channels 0 and 6 of convs 0, 4 go
    keep = {0: kept, 4: kept.copy(), 7: kept[:4].copy(), 2: np.array([True] * 5 + [False])}
    flow = channels.channel_flow(model, keep)
    act = lambda i: torch.nn.functional.leaky_relu(model.module_list[i][1].bias.detach(), 0.1)  # noqa: E731
    assert torch.equal(flow[1][0], torch.tensor([True, True, False, True]))    # channels 4..7 of conv 0
    assert torch.equal(flow[3][0], torch.tensor([True] * 5 + [False] + kept.tolist()))
    assert torch.allclose(flow[3][1][[5, 6, 12]], torch.stack([act(2)[5], act(0)[0], act(0)[6]]))
    c5 = act(4) + act(0)                                                        # linear shortcut: the sum
    assert torch.allclose(flow[6][1][[0, 6]], c5[[0, 6]]) and flow[6][1][kept].abs().sum() == 0
    assert torch.equal(flow[8][0], torch.tensor(kept[:4]))                      # the first input's width
    assert torch.allclose(flow[8][1][0], act(7)[0] + c5[0])                     # overlap adds; 6 is outside


def test_changed_layers_are_every_conv_downstream_of_a_removed_channel(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 's.cfg', split_cfg())), seed=1).eval()
    keep = {2: np.array([True] * 5 + [False])}
    # conv 4 reads route 3 (conv 2 lost a channel); 7 reads 6 <- 5 = 4 + 0; 9 reads 8 = 7 + 6
    assert channels.changed_layers(model, keep) == [4, 7, 9]
    kept = np.array([False, True, True, True, True, True, False, True])    # a shortcut group: 0, 4 and 7
    assert channels.changed_layers(model, {0: kept, 4: kept, 7: kept[:4]}) == [2, 4, 7, 9]


def test_constant_reach_stops_at_convs_and_names_the_layer_that_cannot_absorb(tmp_path):
    model = Darknet(write(tmp_path, 's.cfg', split_cfg()))
    g = channels.Graph(model.module_defs)
    assert channels.constant_reach_problem(g, 5) == ''    # 5 -> 6 -> 8 -> conv 9 absorbs it
    text = split_cfg().replace("[shortcut]\nfrom=-2\nactivation=linear\n", "[shortcut]\nfrom=-2\nactivation=leaky\n")
    g = channels.Graph(Darknet(write(tmp_path, 't.cfg', text)).module_defs)
    assert channels.constant_reach_problem(g, 5).startswith('its constant would pass [shortcut] 8 activation leaky')


def test_conv_shift_of_a_grouped_conv_sums_each_groups_own_inputs(tmp_path):
    conv_ = torch.nn.Conv2d(4, 4, 3, groups=2, bias=False)
    torch.nn.init.normal_(conv_.weight, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([1.0, -2.0, 0.5, 3.0])
    w = conv_.weight.detach().double().sum((2, 3))                  # [4 out, 2 in per group]
    by_hand = torch.stack([w[0] @ c[:2].double(), w[1] @ c[:2].double(), w[2] @ c[2:].double(),
                           w[3] @ c[2:].double()])
    assert torch.allclose(channels.conv_shift(conv_, c), by_hand)
    x = torch.rand(1, 4, 8, 8)                                       # and it is what the constant adds inside
    inside = conv_(torch.nn.functional.pad(x, (1, 1, 1, 1)) + c.view(1, 4, 1, 1))[..., 2:-2, 2:-2] - \
        conv_(torch.nn.functional.pad(x, (1, 1, 1, 1)))[..., 2:-2, 2:-2]
    assert torch.allclose(inside, by_hand.float().view(1, 4, 1, 1).expand_as(inside), atol=1e-5)


def test_every_layer_type_of_the_parser_has_a_channel_rule():
    from utils.parse_config import SHAPE_RULES
    assert set(channels.RULES) == set(SHAPE_RULES)


# --- modes, errors, importance ----------------------------------------------------------------------------------

def test_modes_are_the_names_and_train_py_numbers_only(tmp_path):
    defs = Darknet(write(tmp_path, 't.cfg', mini_tiny())).module_defs
    assert get_layer_set(defs, 2) == get_layer_set(defs, 'tiny')
    for bad in ('2', 'layer', 3):
        with pytest.raises(DarkslimError, match=r"^mode .*; expected 0\|1\|2"):
            get_layer_set(defs, bad)


def test_library_errors_name_parameters_and_the_cli_shows_flags(tmp_path, capsys):
    model = randomize_(Darknet(write(tmp_path, 't.cfg', mini_tiny())), seed=3).eval()
    ls = get_layer_set(model.module_defs, 'tiny')
    with pytest.raises(DarkslimError) as e:
        make_plan(model, ls, 'tiny', percent=0.999)
    assert e.value.param == 'percent'
    assert 'the highest safe percent is' in str(e.value) and 'min_keep K' in str(e.value) and '--' not in str(e.value)
    cfg, weights = write(tmp_path, 't.cfg', mini_tiny()), save_weights(model, tmp_path / 't.weights')
    args = tiny_prune.get_args_parser().parse_args(['--cfg', str(cfg), '--weights', str(weights), '--percent',
                                                    '0.999', '--out', str(tmp_path / 'p')])
    with pytest.raises(SystemExit):
        cli_main(tiny_prune.main, args)
    err = capsys.readouterr().err
    assert err.startswith('error: --percent 0.999 would remove every channel')
    assert 'highest safe --percent is' in err and 'pass --min-keep K' in err


def test_the_importance_is_a_parameter_of_the_plan(tmp_path):
    """An importance that ranks channels by their index (the last channel most important) removes the first
    channels of every layer; the plan, its table and its JSON name it."""
    model = randomize_(Darknet(write(tmp_path, 't.cfg', mini_tiny())), seed=4).eval()
    ls = get_layer_set(model.module_defs, 'tiny')
    by_index = Importance('index', 'channel index', lambda m, layers, images=None: {
        i: np.arange(ls.filters[i], dtype=float) / ls.filters[i] for i in layers.prunable})
    IMPORTANCES['index'] = by_index
    try:
        plan = make_plan(model, ls, 'tiny', percent=0.5, importance='index')
        assert 'importance index: channel index' in plan.table() and plan.to_json()['importance'] == 'index'
    finally:
        del IMPORTANCES['index']
    for i, k in plan.keep.items():
        assert not k[:ls.filters[i] // 2 - 1].any() and k[-1]
    gamma = make_plan(model, ls, 'tiny', percent=0.5)
    assert gamma.importance == 'gamma' and 'score <' in gamma.table()
    with pytest.raises(DarkslimError, match="importance 'nope'; expected one of"):
        make_plan(model, ls, 'tiny', percent=0.5, importance='nope')


# --- replay ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def v3_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('v3')
    model = randomize_(Darknet(write(d, 'm.cfg', mini_yolov3(nc=5))), seed=5).eval()
    from data.make_shapes import make_shapes
    data = make_shapes(d / 'shapes', n_train=4, n_val=1, img_size=64, seed=1)
    return d / 'm.cfg', save_weights(model, d / 'm.weights'), data, model


def run_script(module, *args):
    return module.main(module.get_args_parser().parse_args([str(a) for a in args]))


@pytest.mark.parametrize('script,options', [
    (shortcut_prune, ['--percent', '0.4', '--calib', '4', '--img-size', '64']),
    (layer_prune, ['--shortcuts', '2', '--percent', '0.3', '--round-to', '4']),
    (layer_prune, ['--shortcuts', '1', '--calib', '4', '--img-size', '64']),
])
def test_a_replayed_plan_writes_the_same_bytes(script, options, v3_files, tmp_path):
    cfg, weights, data, _ = v3_files
    common = ['--cfg', cfg, '--weights', weights, '--latency-runs', '0', '--data', data]
    run_script(script, *common, *options, '--out', tmp_path / 'a')
    calib = ['--calib', '4', '--img-size', '64'] if '--calib' in options else []
    for stored in ('a.json', 'a.pt'):
        run_script(script, *common, *calib, '--plan', tmp_path / stored, '--out', tmp_path / stored[2:])
        for ext in ('.cfg', '.weights'):
            assert (tmp_path / f'a{ext}').read_bytes() == (tmp_path / f'{stored[2:]}{ext}').read_bytes()


def test_a_plan_for_another_model_is_refused_in_one_line(v3_files, tmp_path, capsys):
    cfg, weights, _, _ = v3_files
    run_script(shortcut_prune, '--cfg', cfg, '--weights', weights, '--percent', '0.4', '--latency-runs', '0',
               '--out', tmp_path / 'a')
    tiny = randomize_(Darknet(write(tmp_path, 't.cfg', mini_tiny(nc=5))), seed=6)
    args = shortcut_prune.get_args_parser().parse_args([
        '--cfg', str(tmp_path / 't.cfg'), '--weights', str(save_weights(tiny, tmp_path / 't.weights')),
        '--plan', str(tmp_path / 'a.json'), '--out', str(tmp_path / 'b')])
    with pytest.raises(SystemExit):
        cli_main(shortcut_prune.main, args)
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '--plan: a shortcut plan of layers' in err and not (tmp_path / 'b.cfg').exists()


# --- layer prune: one path with the channel strategies ------------------------------------------------------------

def test_blocks_go_even_when_the_channel_step_removes_nothing(v3_files, tmp_path, capsys):
    """--shortcuts 2 --threshold below every score: the blocks are removed and written, one warning line says
    the channel step removed nothing."""
    cfg, weights, _, model = v3_files
    run_script(layer_prune, '--cfg', cfg, '--weights', weights, '--shortcuts', '2', '--threshold', '1e-4',
               '--latency-runs', '0', '--out', tmp_path / 'p')
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith('warning: the channel step removed nothing')]
    assert len(warnings) == 1
    report = json.loads((tmp_path / 'p.json').read_text())
    assert len(report['plan']['removed']) == 2 and report['plan']['channel'] is None
    assert report['warnings'] == warnings
    written = load_model(tmp_path / 'p.cfg', tmp_path / 'p.weights')
    assert len(written.module_defs) == len(model.module_defs) - 6


def test_layer_prune_with_calibration_beats_the_beta_fold_on_the_calibration_images(v3_files, tmp_path):
    """Blocks that are alive (gamma not 0): with 'mean' their measured mean output is folded instead of
    act(beta), which is the best constant for the 1x1 consumers; the calibrated model is closer to the
    original on the images it was measured on."""
    cfg, weights, data, model = v3_files
    import calibrate
    images = calibrate.calibration_images(data, 4, 64, verbose=False)
    result = pruning.prune(model, 'layer', pruning.PruneOptions(n_blocks=2, calib_steps=('mean',)), images)
    assert result.calibration['steps'] == ['mean'] and result.calibration['images'] == 4
    ref = raw_outputs(model, images)
    assert max_diff(raw_outputs(result.nets['compact'], images), ref) < \
        max_diff(raw_outputs(result.nets['beta_fold'], images), ref)
    run_script(layer_prune, '--cfg', cfg, '--weights', weights, '--data', data, '--shortcuts', '2', '--calib', '4',
               '--img-size', '64', '--latency-runs', '0', '--out', tmp_path / 'p')
    report = json.loads((tmp_path / 'p.json').read_text())
    assert report['calibration']['steps'] == ['mean', 'refit', 'bn'] and 'beta_fold' in report['map']


def test_layer_prune_has_every_option_of_the_channel_scripts():
    def flags(parser):
        return {o for a in parser._actions for o in a.option_strings}
    assert flags(shortcut_prune.get_args_parser()) | {'--shortcuts', '--round-to'} == \
        flags(layer_prune.get_args_parser())


# --- recovery: stages, distillation, iterative steps -------------------------------------------------------------

def test_the_report_has_a_row_per_stage_ending_with_distillation(v3_files, tmp_path):
    cfg, weights, data, model = v3_files
    run_script(shortcut_prune, '--cfg', cfg, '--weights', weights, '--data', data, '--target-flops', '0.3',
               '--min-keep', '2', '--calib', '4', '--calib-steps', 'mean,bn', '--distill', '4', '--distill-batch', '2',
               '--img-size', '64', '--latency-runs', '0', '--out', tmp_path / 'p')
    report = json.loads((tmp_path / 'p.json').read_text())
    assert [r['stage'] for r in report['stages']] == ['beta_fold', 'mean', 'bn', 'distill']
    assert all(r['seconds'] is not None and 'mAP50' in r for r in report['stages'])
    assert report['stages'][-1]['mAP50'] == report['map']['compact']['mAP50']       # the last stage is written
    assert report['calibration']['distill']['iters'] == 4 and report['importance'] == 'gamma'
    assert report['after']['bflops'] <= 0.7 * report['before']['bflops']


def test_iterative_steps_reach_the_target_and_store_each_steps_plan(v3_files):
    cfg, weights, data, model = v3_files
    import calibrate
    images = calibrate.calibration_images(data, 4, 64, verbose=False)
    opts = pruning.PruneOptions(target_flops=0.4, min_keep=2, steps=2, calib_steps=('mean',), distill_iters=2,
                                distill={'batch': 2})
    result = pruning.prune(model, 'shortcut', opts, images)
    hw = tuple(model.img_size)
    orig = models_info(model.defs, hw)
    assert models_info(result.nets['compact'].defs, hw) <= 0.6 * orig + 1e-9
    assert len(result.plan.steps) == 2 and result.plan.bflops[1] == pytest.approx(models_info(
        result.nets['compact'].defs, hw))
    first = result.plan.steps[0]
    assert 1 - first['bflops'][1] / first['bflops'][0] >= 0.2 - 1e-9                # half the target in step 1
    for i, k in result.plan.keep.items():                                            # composite: the final widths
        assert int(k.sum()) == result.nets['compact'].module_defs[i]['filters']
    with pytest.raises(DarkslimError, match='steps 2 reaches a target_flops in equal steps'):
        pruning.prune(model, 'shortcut', pruning.PruneOptions(percent=0.3, steps=2), images)
    with pytest.raises(DarkslimError, match='distill_iters distils on the calibration images'):
        pruning.prune(model, 'shortcut', pruning.PruneOptions(percent=0.3, distill_iters=3))


def models_info(defs, hw):
    from models import model_info
    return model_info(defs, *hw)[1]
