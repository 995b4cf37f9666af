"""Darknet core: cfg text, model, .weights/.pt I/O — specified against OpenCV's Darknet importer and round trips."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from models import Darknet, load_model, make_cfg, model_info, save_checkpoint
from tests.helpers import (ANCHORS6, OUR_CFGS, REPO, SHARED_CFGS, assert_matches_opencv, conv, counted_cost, mini_tiny,
                           mini_yolov3, need_shared, randomize_, write, yolo)
from utils.darknet_weights import load_darknet_weights, save_weights
from utils.errors import DarkslimError
from utils.parse_config import cfg_text, parse_cfg, write_cfg


def built_cfgs(tmp_path):
    return [write(tmp_path, 'mini-yolov3.cfg', mini_yolov3(nc=3)), write(tmp_path, 'mini-tiny.cfg', mini_tiny(nc=2))]


# --- cfg text -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('path', SHARED_CFGS + OUR_CFGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_cfg_round_trip_shipped_and_reference(path, tmp_path):
    defs = parse_cfg(path)
    again = parse_cfg(write_cfg(tmp_path / 'out.cfg', defs))
    assert again == defs
    src_anchors = [d['anchors'] for d in defs if d['type'] == 'yolo']
    assert [d['anchors'] for d in again if d['type'] == 'yolo'] == src_anchors


def test_cfg_round_trip_built(tmp_path):
    for p in built_cfgs(tmp_path):
        defs = parse_cfg(p)
        assert parse_cfg(write_cfg(tmp_path / 'rt.cfg', defs)) == defs


def test_values_are_typed_once_in_the_parser(tmp_path):
    text = ("# comment\n[net]\n width = 64 ; inline\nheight=32\nchannels=3\nhue=.1\nsteps=10,20\npolicy=steps\n\n"
            "[convolutional]\nbatch_normalize=1\nfilters=16 # trailing\nsize=3\nstride=2\npad=1\nactivation=leaky\n"
            "[convolutional]\nfilters=14\nsize=1\nactivation=linear\n"
            "[yolo]\nmask = 0,1\nanchors = 10,13,  16,30, 33,23\nclasses=2\nnum=3\n"
            "[route]\nlayers=-3\n")
    net, c0, _, y, r = parse_cfg(write(tmp_path, 'a.cfg', text))
    assert (net['width'], net['height'], net['hue'], net['steps'], net['policy']) == (64, 32, 0.1, [10, 20], 'steps')
    assert (c0['filters'], c0['size'], c0['activation']) == (16, 3, 'leaky')
    assert y['mask'] == [0, 1] and y['anchors'] == [(10, 13), (16, 30), (33, 23)] and y['classes'] == 2
    assert r['layers'] == [-3]


BAD_CFGS = [
    # (text, line number named, words the message must contain)
    ("[net]\nwidth=32\n[convolutional]\nfilters=4\nsizee=3\n", 5, "unknown key 'sizee'"),
    ("[net]\nwidth=32\n[convolutionl]\nfilters=4\n", 3, "unknown section [convolutionl]"),
    ("width=32\n[net]\n", 1, "before the first section"),
    ("[net]\nwidth 32\n", 2, "has no '='"),
    ("[net]\nheight=32\nwidth=32\n[convolutional]\nfilters=4\n[route]\nlayers=-5\n", 7, "layers=-5 refers to layer -4"),
    ("[net]\nheight=32\nwidth=32\n[convolutional]\nfilters=4\n[shortcut]\nfrom=3\n", 7, "from=3 refers to layer 3"),
    ("[net]\nheight=32\nwidth=32\n[convolutional]\nfilters=20\n[yolo]\nmask=0,1\nanchors=1,2,3,4\nclasses=3\n", 6,
     "expected len(mask)*(classes+5) = 2*(3+5) = 16"),
    ("[net]\nheight=32\nwidth=32\n[convolutional]\nfilters=4\nactivation=gelu\n", 6, "activation='gelu'"),
]


@pytest.mark.parametrize('text,line,words', BAD_CFGS, ids=[b[2][:24] for b in BAD_CFGS])
def test_malformed_cfg_is_refused_naming_file_and_line(text, line, words, tmp_path):
    p = write(tmp_path, 'bad.cfg', text)
    with pytest.raises(DarkslimError) as e:
        parse_cfg(p)
    assert f"{p}:{line}" in str(e.value)
    assert words in str(e.value)


def test_cli_reports_a_bad_cfg_in_one_line_exit_2(tmp_path):
    p = write(tmp_path, 'bad.cfg', BAD_CFGS[0][0])
    r = subprocess.run([sys.executable, 'models.py', 'summary', '--cfg', str(p)], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count('\n') == 0 and f"{p}:5" in r.stderr and 'Traceback' not in r.stderr


# --- model vs OpenCV --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('path', SHARED_CFGS + OUR_CFGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_forward_equals_opencv_darknet_importer(path, tmp_path):
    # 256x320 (not square, not the cfg's 416): sizes come from the input, not the cfg
    model = randomize_(Darknet(path, img_size=(256, 320)), seed=3)
    assert_matches_opencv(model, path, tmp_path, 256, 320)


def test_built_cfgs_equal_opencv(tmp_path):
    for p in built_cfgs(tmp_path):
        net = parse_cfg(p)[0]
        model = randomize_(Darknet(p), seed=4)
        assert_matches_opencv(model, p, tmp_path, net['height'], net['width'])


def test_raw_and_decoded_shapes_follow_the_cfg(tmp_path):
    p = write(tmp_path, 'm.cfg', mini_yolov3(nc=3, width=96, height=64))
    model = Darknet(p).eval()
    inf, raw = model(torch.zeros(2, 3, 64, 96))
    assert [tuple(r.shape) for r in raw] == [(2, 3, 8, 12, 8), (2, 3, 16, 24, 8)]
    assert tuple(inf.shape) == (2, 3 * (8 * 12 + 16 * 24), 8)
    model.train()
    assert [tuple(r.shape) for r in model(torch.zeros(1, 3, 64, 96))] == [(1, 3, 8, 12, 8), (1, 3, 16, 24, 8)]


def test_decode_matches_the_darknet_formula_by_hand(tmp_path):
    text = ("[net]\nwidth=64\nheight=32\nchannels=3\n"
            "[convolutional]\nfilters=7\nsize=1\nstride=16\nactivation=linear\n"
            "[yolo]\nmask=0\nanchors=10,20\nclasses=2\nnum=1\nscale_x_y=1.2\n")
    model = Darknet(write(tmp_path, 'one.cfg', text)).eval()
    x = torch.randn(1, 3, 32, 64)
    inf, raw = model(x)
    t = raw[0][0, 0, 1, 2]                       # cell y=1, x=2 of the 2x4 grid: stride 16 both ways
    s = 1.2
    cx = (1 / (1 + np.exp(-t[0].item())) * s - (s - 1) / 2 + 2) * 16
    cy = (1 / (1 + np.exp(-t[1].item())) * s - (s - 1) / 2 + 1) * 16
    got = inf[0, 1 * 4 + 2]                      # rows are (anchor, y, x) row-major
    assert abs(got[0].item() - cx) < 1e-4 and abs(got[1].item() - cy) < 1e-4
    assert abs(got[2].item() - np.exp(t[2].item()) * 10) < 1e-3 and abs(got[3].item() - np.exp(t[3].item()) * 20) < 1e-3


def test_maxpool_pads_with_minus_infinity_like_darknet(tmp_path):
    # size=2 stride=1 on all-negative input: darknet ignores the out-of-range column/row (no zero padding)
    text = "[net]\nwidth=3\nheight=3\nchannels=1\n[maxpool]\nsize=2\nstride=1\n"
    model = Darknet(write(tmp_path, 'mp.cfg', text)).eval()
    x = -torch.arange(1., 10.).view(1, 1, 3, 3)   # [[-1,-2,-3],[-4,-5,-6],[-7,-8,-9]]
    y = model.module_list[0](x)
    expected = torch.tensor([[-1., -2., -3.], [-4., -5., -6.], [-7., -8., -9.]])  # max over the 2x2 window at/after
    assert torch.equal(y[0, 0], expected)


def test_fuse_keeps_outputs(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 't.cfg', mini_tiny(nc=4)))).eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        before = model(x)[0]
        after = model.fuse()(x)[0]
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


# --- BFLOPs -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,bflops', [('yolov3', 65.879), ('yolov3-tiny', 5.571), ('yolov3-spp', 66.257)])
def test_bflops_equal_darknets_figures(name, bflops):
    # figures AlexeyAB darknet prints for these cfgs at 416x416
    _, ours = model_info(parse_cfg(REPO / 'cfg' / f'{name}.cfg'))
    assert round(ours, 3) == bflops


def test_bflops_of_reference_cfgs_equal_darknets_figures():
    folder = need_shared('darknet-cfg')
    expected = {'yolov4-tiny': 6.910, 'yolov4': 60.137, 'yolov3-tiny-pruned-odd': 3.789}
    for name, bflops in expected.items():
        assert round(model_info(parse_cfg(folder / f'{name}.cfg'))[1], 3) == bflops


def test_params_equal_pytorchs_count(tmp_path):
    p = write(tmp_path, 'm.cfg', mini_yolov3(nc=3))
    assert model_info(parse_cfg(p))[0] == sum(t.numel() for t in Darknet(p).parameters())


def test_params_and_bflops_of_a_tiny_cfg_by_hand(tmp_path):
    # 16x16x3 -> conv 3x3 4 -> maxpool 2/2 -> conv 1x1 8 -> conv 1x1 4 -> shortcut (maxpool + conv) -> head -> yolo
    text = ("[net]\nwidth=16\nheight=16\nchannels=3\n" + conv(4, 3) + "[maxpool]\nsize=2\nstride=2\n"
            + conv(8, 1) + conv(4, 1) + "[shortcut]\nfrom=-3\nactivation=linear\n"
            + conv(18, 1, bn=0, act='linear') + yolo([0, 1, 2], ANCHORS6, 1))
    p = write(tmp_path, 'hand.cfg', text)
    params = (4 * 3 * 9 + 2 * 4) + (8 * 4 + 2 * 8) + (4 * 8 + 2 * 4) + (18 * 4 + 18)          # weights + BN / bias
    flops = (2 * 4 * 3 * 9 * 16 * 16          # conv 3x3, 16x16 output
             + 2 * 2 * 4 * 8 * 8              # maxpool: size^2 * c * 8x8 output
             + 2 * 8 * 4 * 8 * 8 + 2 * 4 * 8 * 8 * 8   # the two 1x1 convs
             + 4 * 8 * 8                      # shortcut: one addition per output value
             + 2 * 18 * 4 * 8 * 8)            # head
    assert model_info(parse_cfg(p)) == (params, pytest.approx(flops / 1e9, rel=1e-12))
    assert counted_cost(Darknet(p), 16, 16) == (params, pytest.approx(flops / 1e9, rel=1e-12))


# --- .weights -------------------------------------------------------------------------------------------------

def darknet_file(path, floats, major=0, minor=2, revision=5, seen=123456789012):
    """A .weights file written the way darknet writes it (header rule of parser.c), independent of our saver."""
    with open(path, 'wb') as f:
        np.array([major, minor, revision], np.int32).tofile(f)
        wide = major * 10 + minor >= 2 and major < 1000 and minor < 1000
        np.array([seen], np.int64 if wide else np.int32).tofile(f)
        floats.astype(np.float32).tofile(f)
    return path


def n_floats(model):
    return sum(t.numel() for t in model.state_dict().values() if t.dtype == torch.float32)


@pytest.mark.parametrize('major,minor', [(0, 2), (0, 1), (1, 0)])
def test_weights_load_then_save_is_byte_identical(major, minor, tmp_path):
    model = Darknet(write(tmp_path, 'm.cfg', mini_yolov3(nc=3)))
    need = n_floats(model)
    src = darknet_file(tmp_path / 'in.weights', np.random.default_rng(0).standard_normal(need), major, minor,
                       seen=77 if minor < 2 and major < 1 else 123456789012)
    load_darknet_weights(model, src)
    out = save_weights(model, tmp_path / 'out.weights')
    assert out.read_bytes() == src.read_bytes()


def test_weights_body_order_is_beta_gamma_mean_var_weights(tmp_path):
    text = "[net]\nwidth=8\nheight=8\nchannels=1\n[convolutional]\nbatch_normalize=1\nfilters=2\nsize=1\n"
    model = Darknet(write(tmp_path, 'c.cfg', text))
    floats = np.arange(10, dtype=np.float32)     # 2 beta, 2 gamma, 2 mean, 2 var, 2 weights (2x1x1x1)
    load_darknet_weights(model, darknet_file(tmp_path / 'w.weights', floats))
    conv, bn = model.module_list[0][0], model.module_list[0][1]
    assert bn.bias.tolist() == [0, 1] and bn.weight.tolist() == [2, 3]
    assert bn.running_mean.tolist() == [4, 5] and bn.running_var.tolist() == [6, 7]
    assert conv.weight.flatten().tolist() == [8, 9]


@pytest.mark.parametrize('delta', [-1, +1, -500])
def test_weights_with_wrong_float_count_are_refused(delta, tmp_path):
    model = Darknet(write(tmp_path, 'm.cfg', mini_yolov3(nc=3)))
    need = n_floats(model)
    bad = darknet_file(tmp_path / 'bad.weights', np.zeros(need + delta))
    with pytest.raises(DarkslimError) as e:
        load_darknet_weights(model, bad)
    msg = str(e.value)
    assert str(bad) in msg and f"holds {need + delta} floats" in msg and f"needs {need}" in msg
    if delta < 0:
        assert 'first layer that does not fit: layer' in msg


def test_summary_cli_validates_weights_exit_2(tmp_path):
    cfg = write(tmp_path, 'm.cfg', mini_tiny(nc=2))
    bad = darknet_file(tmp_path / 'bad.weights', np.zeros(100))
    r = subprocess.run([sys.executable, 'models.py', 'summary', '--cfg', str(cfg), '--weights', str(bad)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert r.stderr.strip().count('\n') == 0 and 'holds 100 floats' in r.stderr
    assert r.stdout == ''  # validated before the layer table is printed


def test_cutoff_saves_and_loads_only_the_first_layers(tmp_path):
    cfg = write(tmp_path, 'm.cfg', mini_yolov3(nc=3))
    full = randomize_(Darknet(cfg), seed=5)
    part = save_weights(full, tmp_path / 'backbone.weights', cutoff=12)
    fresh = Darknet(cfg)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    load_darknet_weights(fresh, part, cutoff=12)
    for k, v in fresh.state_dict().items():
        layer = int(k.split('.')[1])
        assert torch.equal(v, full.state_dict()[k] if layer < 12 else before[k]), k
    with pytest.raises(DarkslimError, match='needs'):
        load_darknet_weights(Darknet(cfg), part)  # cutoff is never inferred


# --- .pt ----------------------------------------------------------------------------------------------------------

def test_pt_to_weights_to_pt_keeps_every_tensor(tmp_path):
    cfg = write(tmp_path, 'm.cfg', mini_yolov3(nc=3))
    model = randomize_(Darknet(cfg), seed=6)
    pt = save_checkpoint(tmp_path / 'a.pt', model)
    ckpt = torch.load(pt, weights_only=True)
    assert ckpt['cfg'] == cfg_text(parse_cfg(cfg))
    subprocess.run([sys.executable, 'models.py', 'convert', '--cfg', str(cfg), '--weights', str(pt),
                    '--out', str(tmp_path / 'b.weights')], cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, 'models.py', 'convert', '--cfg', str(cfg), '--weights',
                    str(tmp_path / 'b.weights'), '--out', str(tmp_path / 'c.pt')], cwd=REPO, check=True,
                   capture_output=True)
    back = torch.load(tmp_path / 'c.pt', weights_only=True)['model']
    for k, v in model.state_dict().items():
        if v.dtype == torch.float32:
            assert torch.equal(back[k], v), k


def test_load_model_decides_format_by_content_and_uses_stored_cfg(tmp_path):
    cfg = write(tmp_path, 'm.cfg', mini_tiny(nc=2))
    model = randomize_(Darknet(cfg), seed=7).eval()
    disguised = save_checkpoint(tmp_path / 'really-a-pt.weights', model)
    again = load_model(None, disguised)             # cfg taken from the checkpoint
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model(x)[0], again(x)[0])


def test_checkpoint_for_another_cfg_is_refused_naming_the_tensor(tmp_path):
    small = randomize_(Darknet(write(tmp_path, 'a.cfg', mini_tiny(nc=2))))
    pt = save_checkpoint(tmp_path / 'a.pt', small)
    other = write(tmp_path, 'b.cfg', mini_tiny(nc=3))
    with pytest.raises(DarkslimError) as e:
        load_model(other, pt)
    assert 'module_list.9.Conv2d.weight' in str(e.value) and '(21, 48, 1, 1)' in str(e.value)


# --- make-cfg / classes ---------------------------------------------------------------------------------------

def test_make_cfg_changes_only_heads_and_classes(tmp_path):
    base = REPO / 'cfg' / 'yolov3.cfg'
    out = make_cfg(base, 3, tmp_path / 'y3.cfg')
    a, b = parse_cfg(base), parse_cfg(out)
    heads = [i for i, d in enumerate(a[1:]) if d['type'] == 'yolo']
    for i, (da, db) in enumerate(zip(a[1:], b[1:])):
        if i + 1 in heads:                        # the conv feeding a [yolo]: len(mask) * (classes + 5)
            assert db['filters'] == len(a[1 + i + 1]['mask']) * (3 + 5)
        elif da['type'] == 'yolo':
            assert db['classes'] == 3 and db['anchors'] == da['anchors']
        else:
            assert db == da
    model = Darknet(out, img_size=64).eval()
    assert model(torch.zeros(1, 3, 64, 64))[0].shape[-1] == 8


def test_a_class_count_below_one_is_refused_by_parameter_in_the_library_and_by_flag_in_the_cli(tmp_path):
    base = REPO / 'cfg' / 'yolov3-tiny.cfg'
    with pytest.raises(DarkslimError) as e:
        make_cfg(base, 0, tmp_path / 'lib.cfg')
    assert str(e.value).startswith('classes 0;') and '--' not in str(e.value) and e.value.param == 'classes'
    r = subprocess.run([sys.executable, 'models.py', 'make-cfg', '--base', str(base), '--classes', '0', '--out',
                        str(tmp_path / 'cli.cfg')], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith('error: --classes 0;') and r.stderr.count('\n') == 1
    assert not list(tmp_path.iterdir())                                  # nothing written by either


def test_load_model_without_random_init_equals_the_plain_route(tmp_path):
    # load_model skips PyTorch's random init when the file provides every tensor; the result must not depend on it
    cfg = write(tmp_path, 'm.cfg', mini_yolov3(nc=3))
    ref = randomize_(Darknet(cfg), seed=8).eval()
    w = save_weights(ref, tmp_path / 'm.weights')
    fast = load_model(cfg, w)
    for k, v in ref.state_dict().items():
        assert torch.equal(fast.state_dict()[k], v), k
    assert torch.equal(fast.module_list[fast.yolo_layers[0]].anchors, ref.module_list[ref.yolo_layers[0]].anchors)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(fast(x)[0], ref(x)[0])


@pytest.mark.parametrize('argv', [
    ['convert', '--cfg', '{cfg}', '--weights', '{w}', '--out', '{w}'],
    ['make-cfg', '--base', '{cfg}', '--classes', '2', '--out', '{cfg}'],
    ['convert', '--weights', '{missing}', '--out', '{out}'],
])
def test_cli_refuses_to_overwrite_inputs_and_names_missing_files(argv, tmp_path):
    cfg = write(tmp_path, 'm.cfg', mini_tiny(nc=2))
    w = save_weights(randomize_(Darknet(cfg)), tmp_path / 'm.weights')
    before = (cfg.read_bytes(), w.read_bytes())
    names = {'cfg': cfg, 'w': w, 'missing': tmp_path / 'nope.pt', 'out': tmp_path / 'o.weights'}
    r = subprocess.run([sys.executable, 'models.py'] + [a.format(**names) for a in argv], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and r.stderr.strip().count('\n') == 0
    assert (cfg.read_bytes(), w.read_bytes()) == before
