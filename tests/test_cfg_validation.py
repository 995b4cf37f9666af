"""Reading cfgs right: every typed option has a documented valid range (`parse_config.RANGES`), bad input is a
one-line DarkslimError naming file:line, repeated keys follow darknet (first wins), shortcuts of unequal channels
and `[yolo] new_coords=1` heads decode as darknet/OpenCV do."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from models import Darknet
from tests.helpers import (ANCHORS6, OUR_CFGS, REPO, SHARED_CFGS, assert_matches_opencv, conv, mini_tiny, randomize_,
                           tiny_prn, write, yolo)
from utils.errors import DarkslimError
from utils.parse_config import RANGES, infer_shapes, parse_cfg, write_cfg

# A small valid network touching every section type; the cases below change one line of it.
BASE = ("[net]\nwidth=32\nheight=32\nchannels=3\nbatch=4\nsubdivisions=1\npolicy=steps\nsteps=10,20\nscales=.1,.1\n"
        "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=1\npad=1\nactivation=leaky\n"   # 0: 8x32x32
        "[maxpool]\nsize=2\nstride=2\n"                                                                 # 1: 8x16x16
        "[convolutional]\nfilters=14\nsize=1\nstride=1\nactivation=linear\n"                           # 2: 14x16x16
        "[yolo]\nmask=0,1\nanchors=4,5, 8,9, 12,14\nclasses=2\nnum=3\nignore_thresh=.7\nscale_x_y=1.1\n"  # 3
        "[route]\nlayers=-3\n"                                                                          # 4: -> 1
        "[upsample]\nstride=2\n"                                                                        # 5: 8x32x32
        "[shortcut]\nfrom=0\nactivation=linear\n")                                                      # 6: 5 + 0


def variant(old, new, text=BASE):
    """(text with `old` replaced by `new`, 1-based number of the first line that changed)."""
    assert text.count(old) == 1, old
    out = text.replace(old, new)
    a, b = text.splitlines(), out.splitlines()
    return out, next(n for n, (x, y) in enumerate(zip(a + [''], b), 1) if x != y)


def refused(tmp_path, text, line):
    """The DarkslimError message parse_cfg gives for `text`, checked to name the file and `line`."""
    p = write(tmp_path, 'bad.cfg', text)
    with pytest.raises(DarkslimError) as e:
        parse_cfg(p)
    msg = str(e.value)
    assert f"{p}:{line}" in msg and '\n' not in msg, msg
    return msg


def run_summary(cfg):
    return subprocess.run([sys.executable, 'models.py', 'summary', '--cfg', str(cfg)], cwd=REPO,
                          capture_output=True, text=True)


def assert_one_line_exit_2(r, *words):
    assert r.returncode == 2, r.stderr
    assert 'Traceback' not in r.stderr and r.stderr.strip().count('\n') == 0, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_base_network_is_valid(tmp_path):
    shapes = infer_shapes(parse_cfg(write(tmp_path, 'base.cfg', BASE)))
    assert shapes == [(8, 32, 32), (8, 16, 16), (14, 16, 16), (14, 16, 16), (8, 16, 16), (8, 32, 32), (8, 32, 32)]


# --- text where a number belongs, binary files ------------------------------------------------------------------

TEXT_IN_NUMBERS = [
    ("filters=8\n", "filters=abc\n", "filters='abc'; expected an integer >= 1"),
    ("size=3\nstride=1\npad=1", "size=3x3\nstride=1\npad=1", "size='3x3'; expected an integer >= 1"),
    ("size=3\nstride=1\npad=1", "size=3\nstride=1.5\npad=1", "stride='1.5'; expected an integer >= 1"),
    ("width=32", "width=wide", "width='wide'; expected an integer >= 1"),
    ("classes=2", "classes=two", "classes='two'; expected an integer >= 1"),
    ("scale_x_y=1.1", "scale_x_y=big", "scale_x_y='big'; expected a number > 0"),
    ("ignore_thresh=.7", "ignore_thresh=nan", "ignore_thresh='nan'; expected a number in [0, 1]"),
    ("mask=0,1", "mask=0,one", "mask='0,one'; expected a comma list of integers >= 0"),
    ("anchors=4,5, 8,9, 12,14", "anchors=4,5, 8,x, 12,14", "anchors='4,5, 8,x, 12,14'; expected"),
]


@pytest.mark.parametrize('old,new,words', TEXT_IN_NUMBERS, ids=[c[1].split('\n')[0] for c in TEXT_IN_NUMBERS])
def test_text_in_a_numeric_option_is_a_one_line_error(old, new, words, tmp_path):
    text, line = variant(old, new)
    assert words in refused(tmp_path, text, line)


def test_binary_file_as_cfg_is_a_one_line_error(tmp_path):
    p = tmp_path / 'model.weights'
    p.write_bytes(np.array([0, 2, 5], np.int32).tobytes() + np.linspace(-1, 1, 64, dtype=np.float32).tobytes())
    with pytest.raises(DarkslimError) as e:
        parse_cfg(p)
    assert f"{p}:1" in str(e.value) and 'expected a Darknet .cfg text file' in str(e.value)


def test_comment_in_another_encoding_is_read_like_darknet(tmp_path):
    # darknet reads bytes and skips comments: a cfg annotated in GBK/Latin-1 must still load
    p = tmp_path / 'annotated.cfg'
    p.write_bytes(BASE.replace('[maxpool]\n', '[maxpool]\n# \u6c60\u5316 pooling\n').encode('gbk'))
    assert parse_cfg(p)[2]['type'] == 'maxpool'


@pytest.mark.parametrize('kind', ['text', 'binary'])
def test_cli_reports_unreadable_cfg_in_one_line_exit_2(kind, tmp_path):
    if kind == 'text':
        text, line = variant("filters=8\n", "filters=abc\n")
        p = write(tmp_path, 'bad.cfg', text)
        where = f"{p}:{line}"
    else:
        p = tmp_path / 'bad.cfg'
        p.write_bytes(bytes(range(256)))
        where = str(p)
    assert_one_line_exit_2(run_summary(p), where)


# --- impossible values ------------------------------------------------------------------------------------------

IMPOSSIBLE = [
    # (old, new, words in the message)
    ("filters=8\n", "filters=0\n", "filters=0; expected an integer >= 1"),
    ("filters=14", "filters=-14", "filters=-14; expected an integer >= 1"),
    ("size=3\nstride=1\npad=1", "size=0\nstride=1\npad=1", "size=0; expected an integer >= 1"),
    ("size=3\nstride=1\npad=1", "size=3\nstride=-1\npad=1", "stride=-1; expected an integer >= 1"),
    ("size=3\nstride=1\npad=1", "size=3\nstride=1\npad=2", "pad=2; expected 0 or 1"),
    ("batch_normalize=1", "batch_normalize=2", "batch_normalize=2; expected 0 or 1"),
    ("filters=8\n", "filters=8\npadding=-1\n", "padding=-1; expected an integer >= 0"),
    ("filters=8\n", "filters=8\ngroups=0\n", "groups=0; expected an integer >= 1"),
    ("filters=8\n", "filters=8\ngroups=2\n", "groups=2 does not divide the 3 input channels"),
    ("filters=14\nsize=1", "filters=14\nsize=1\ngroups=4", "groups=4 does not divide filters=14"),
    ("[maxpool]\nsize=2", "[maxpool]\nsize=0", "size=0; expected an integer >= 1"),
    ("size=2\nstride=2", "size=2\nstride=0", "stride=0; expected an integer >= 1"),
    ("size=2\nstride=2", "size=2\nstride=2\npadding=-1", "padding=-1; expected an integer >= 0"),
    ("[maxpool]\nsize=2", "[maxpool]\nsize=40\npadding=0", "input 32x32 too small for size=40"),
    ("[upsample]\nstride=2", "[upsample]\nstride=0", "stride=0; expected an integer >= 1"),
    ("[upsample]\nstride=2", "[upsample]\nstride=-2", "stride=-2; expected an integer >= 1"),
    ("layers=-3", "layers=", "layers=''; expected a comma list of integers"),
    ("layers=-3", "layers=-3\ngroups=0", "groups=0; expected an integer >= 1"),
    ("layers=-3", "layers=-3\ngroups=3", "groups=3 does not divide the 8 channels of layer 1"),
    ("layers=-3", "layers=-3\ngroup_id=2\ngroups=2", "group_id=2; expected 0..1 (groups=2)"),
    ("layers=-3", "layers=-3\ngroup_id=-1", "group_id=-1; expected an integer >= 0"),
    ("from=0", "from=", "from=''; expected a comma list of integers"),
    ("mask=0,1", "mask=0,3", "mask=0,3 refers to anchor 3; expected indices 0..2 of the 3 anchors"),
    ("mask=0,1", "mask=-1,0", "mask='-1,0'; expected a comma list of integers >= 0"),
    ("anchors=4,5, 8,9, 12,14", "anchors=4,5, 8,9, 12", "anchors has 5 numbers; expected w,h pairs"),
    ("anchors=4,5, 8,9, 12,14", "anchors=4,5, 0,9, 12,14", "expected comma-separated w,h pairs of numbers > 0"),
    ("num=3", "num=4", "num=4 but anchors= holds 3 pairs; expected equal"),
    ("num=3", "num=0", "num=0; expected an integer >= 1"),
    ("classes=2", "classes=0", "classes=0; expected an integer >= 1"),
    ("classes=2", "classes=-1", "classes=-1; expected an integer >= 1"),
    ("classes=2", "classes=2\ncounters_per_class=5,6,7", "counters_per_class has 3 values; expected classes=2"),
    ("ignore_thresh=.7", "ignore_thresh=1.5", "ignore_thresh=1.5; expected a number in [0, 1]"),
    ("scale_x_y=1.1", "scale_x_y=0", "scale_x_y=0; expected a number > 0"),
    ("scale_x_y=1.1", "scale_x_y=1.1\nnew_coords=2", "new_coords=2; expected 0 or 1"),
    ("scale_x_y=1.1", "scale_x_y=1.1\niou_loss=l2", "iou_loss='l2'; expected one of ciou, diou, giou, iou, mse"),
    ("width=32", "width=0", "width=0; expected an integer >= 1"),
    ("height=32", "height=-32", "height=-32; expected an integer >= 1"),
    ("channels=3", "channels=0", "channels=0; expected an integer >= 1"),
    ("batch=4", "batch=0", "batch=0; expected an integer >= 1"),
    ("subdivisions=1", "subdivisions=0", "subdivisions=0; expected an integer >= 1"),
    ("policy=steps", "policy=stepz", "policy='stepz'; expected one of constant, exp, poly, random, sgdr, sigmoid"),
    ("batch=4", "batch=4\nmomentum=1.5", "momentum=1.5; expected a number in [0, 1]"),
    ("activation=leaky", "activation=gelu", "activation='gelu'; expected one of leaky, linear, logistic, mish"),
]


@pytest.mark.parametrize('old,new,words', IMPOSSIBLE, ids=[c[2][:40] for c in IMPOSSIBLE])
def test_impossible_value_is_refused_naming_file_line_and_expectation(old, new, words, tmp_path):
    text, line = variant(old, new)
    assert words in refused(tmp_path, text, line)


def test_shortcut_of_another_height_width_is_refused(tmp_path):
    text, line = variant("from=0", "from=1")          # layer 1 is 16x16, the previous layer 32x32
    assert "from=1: layer 1 is 16x16, the previous layer 32x32; expected equal height x width" in \
        refused(tmp_path, text, line)


def out_of_range_values(opt):
    """Texts that `opt` must refuse, derived from its documented range."""
    if opt.kind == 'choice':
        return ['no-such-choice']
    if opt.kind in ('int', 'ints'):
        bad = ['abc', '1.5']
    elif opt.kind in ('real', 'reals'):
        bad = ['abc', 'nan']
    else:
        return []
    if opt.lo is not None:
        bad.append(str(opt.lo if opt.above else opt.lo - 1))
    if opt.hi is not None:
        bad.append(str(opt.hi + 1))
    return bad


RANGE_CASES = [(t, k, v) for t, opts in RANGES.items() for k, opt in opts.items() if k != 'anchors'
               for v in out_of_range_values(opt)]


def with_option(section, key, value):
    """(BASE with `key=value` in its first [section]: replacing the key's line there, else right after the
    header; the line number of that option)."""
    lines = BASE.splitlines()
    head = next(n for n, s in enumerate(lines) if s == f"[{section}]")
    end = next((n for n in range(head + 1, len(lines)) if lines[n].startswith('[')), len(lines))
    at = next((n for n in range(head + 1, end) if lines[n].startswith(f"{key}=")), None)
    if at is None:
        at = head + 1
        lines.insert(at, '')
    lines[at] = f"{key}={value}"
    return '\n'.join(lines) + '\n', at + 1


@pytest.mark.parametrize('section,key,value', RANGE_CASES, ids=[f"{t}.{k}={v}" for t, k, v in RANGE_CASES])
def test_every_documented_range_is_enforced(section, key, value, tmp_path):
    text, line = with_option(section, key, value)
    msg = refused(tmp_path, text, line)
    assert f"{key}={value!r}" in msg or f"{key}={value}" in msg


@pytest.mark.parametrize('path', SHARED_CFGS + OUR_CFGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_official_and_shipped_cfg_parses_without_warnings(path, capsys):
    defs = parse_cfg(path)
    assert len(infer_shapes(defs)) == len(defs) - 1
    assert capsys.readouterr().err == ''


# --- unknown layer types ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['avgpool', 'scale_channels', 'sam', 'local_avgpool', 'Gaussian_yolo', 'reorg',
                                  'dropout', 'softmax', 'implicit', 'region'])
def test_darknet_layer_we_do_not_implement_is_a_one_line_refusal(kind, tmp_path):
    text, line = variant("[upsample]\n", f"[{kind}]\n")
    msg = refused(tmp_path, text, line)
    assert f"[{kind}] is a darknet layer darkslim does not support" in msg and '[convolutional]' in msg


def test_cli_refuses_an_unsupported_layer_in_one_line_exit_2(tmp_path):
    text, line = variant("[upsample]\n", "[sam]\n")
    p = write(tmp_path, 'sam.cfg', text)
    assert_one_line_exit_2(run_summary(p), f"{p}:{line}", '[sam]')


def test_darknet_section_aliases_are_read_as_the_full_names(tmp_path):
    # darknet parser.c: [conv] = [convolutional], [max] = [maxpool], [network] = [net]
    short = BASE.replace('[net]', '[network]').replace('[convolutional]', '[conv]').replace('[maxpool]', '[max]')
    assert parse_cfg(write(tmp_path, 'short.cfg', short)) == parse_cfg(write(tmp_path, 'long.cfg', BASE))


# --- repeated keys ------------------------------------------------------------------------------------------------

# the [net] block of darknet's cfg/yolov3-openimages.cfg: batch and subdivisions are given twice
OPENIMAGES_NET = ("[net]\n# Testing\n batch=1\n subdivisions=1\n# Training\nbatch=64\nsubdivisions=16\n"
                  "width=96\nheight=96\nchannels=3\nmomentum=0.9\ndecay=0.0005\n")


def test_repeated_key_takes_the_first_value_with_one_warning_line_each(tmp_path, capsys):
    text = OPENIMAGES_NET + mini_tiny(nc=2).split('\n\n', 1)[1]
    p = write(tmp_path, 'openimages-like.cfg', text)
    lines = text.splitlines()
    keys = ('batch', 'subdivisions')
    first = {k: next(n for n, s in enumerate(lines, 1) if s.strip().startswith(f"{k}=")) for k in keys}  # ' batch=1'
    again = {k: next(n for n, s in enumerate(lines, 1) if s.startswith(f"{k}=")) for k in keys}         # 'batch=64'
    net = parse_cfg(p)[0]
    assert (net['batch'], net['subdivisions']) == (1, 1)  # darknet option_find: the first match in the list
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    for k, line in zip(keys, err):
        assert f"{p}:{again[k]}" in line and f"line {first[k]}" in line and 'darknet uses the first' in line


def test_repeated_key_cfg_is_written_with_the_value_in_use(tmp_path, capsys):
    text = OPENIMAGES_NET + mini_tiny(nc=2).split('\n\n', 1)[1]
    defs = parse_cfg(write(tmp_path, 'in.cfg', text))
    capsys.readouterr()
    out = write_cfg(tmp_path / 'out.cfg', defs)
    written = out.read_text()
    assert written.count('batch=') == 1 and 'batch=1\n' in written and 'subdivisions=1\n' in written
    assert parse_cfg(out) == defs and capsys.readouterr().err == ''


def test_repeated_structural_key_builds_darknets_network(tmp_path, capsys):
    # filters given twice: darknet builds 8 filters; the written cfg (8 only) reads the same in OpenCV
    text, _ = variant("filters=8\n", "filters=8\nfilters=16\n", mini_tiny(nc=2))
    model = randomize_(Darknet(write(tmp_path, 'twice.cfg', text)), seed=1)
    assert model.module_list[0][0].out_channels == 8
    assert_matches_opencv(model, write_cfg(tmp_path / 'once.cfg', model.defs), tmp_path, 96, 96)


# --- [shortcut] of unequal channels ---------------------------------------------------------------------------------

def shortcut_cfg(c_prev, c_from, nc=2):
    """conv(c_from) -> conv -> conv(c_prev) -> [shortcut] from=-3 -> head: the shortcut adds c_from channels
    to c_prev channels."""
    s = "[net]\nwidth=48\nheight=32\nchannels=3\n"
    s += conv(c_from, 3) + conv(5, 1) + conv(c_prev, 3)
    s += "[shortcut]\nfrom=-3\nactivation=leaky\n"
    s += conv(3 * (nc + 5), 1, bn=0, act='linear') + yolo([0, 1, 2], ANCHORS6[:3], nc)
    return s


@pytest.mark.parametrize('c_prev,c_from', [(8, 12), (12, 8)], ids=['from-wider', 'from-narrower'])
def test_shortcut_of_unequal_channels_equals_opencv(c_prev, c_from, tmp_path):
    p = write(tmp_path, 'sc.cfg', shortcut_cfg(c_prev, c_from))
    # darknet shortcut_layer.c: the output has the previous layer's channels
    assert infer_shapes(parse_cfg(p))[3] == (c_prev, 32, 48)
    model = randomize_(Darknet(p), seed=2)
    assert_matches_opencv(model, p, tmp_path, 32, 48)


def test_shortcut_adds_the_overlapping_channels_only(tmp_path):
    # by hand: out[k] = prev[k] + from[k] for k < min(C_prev, C_from); prev's extra channels pass unchanged
    for c_prev, c_from in [(8, 12), (12, 8)]:
        model = Darknet(write(tmp_path, 'sc.cfg', shortcut_cfg(c_prev, c_from))).eval()
        sc = model.module_list[3]
        prev, src = torch.randn(1, c_prev, 4, 6), torch.randn(1, c_from, 4, 6)
        k = min(c_prev, c_from)
        expected = prev.clone()
        expected[:, :k] += src[:, :k]
        assert torch.allclose(sc([prev, src]), torch.nn.functional.leaky_relu(expected, 0.1))


def test_tiny_prn_like_network_equals_opencv(tmp_path):
    p = write(tmp_path, 'prn.cfg', tiny_prn())
    defs = parse_cfg(p)
    shapes = infer_shapes(defs)
    assert shapes[8][0] == 32 and shapes[21][0] == 16 and shapes[22] == shapes[21] and shapes[25] == shapes[21]
    assert_matches_opencv(randomize_(Darknet(p), seed=5), p, tmp_path, 96, 96)


# --- [yolo] new_coords=1 (scaled-YOLOv4 heads) ----------------------------------------------------------------------

def new_coords_cfg(nc=2, head_act='logistic', width=96, height=64):
    """Two heads as yolov4-csp.cfg has them: logistic head convs, [yolo] scale_x_y=2.0 new_coords=1."""
    s = f"[net]\nwidth={width}\nheight={height}\nchannels=3\n"
    s += conv(8, 3, 2) + conv(16, 3, 2) + conv(24, 3, 2)                   # 0 1 2: /8
    s += conv(3 * (nc + 5), 1, bn=0, act=head_act)                         # 3
    s += yolo([3, 4, 5], ANCHORS6, nc) + "scale_x_y=2.0\nnew_coords=1\n"  # 4
    s += "[route]\nlayers=-3\n" + conv(8, 1) + "[upsample]\nstride=2\n"   # 5 6 7
    s += "[route]\nlayers=-1,1\n" + conv(3 * (nc + 5), 1, bn=0, act=head_act)  # 8 9
    s += yolo([0, 1, 2], ANCHORS6, nc) + "scale_x_y=2.0\nnew_coords=1\n"  # 10
    return s


def test_new_coords_decode_equals_opencv(tmp_path):
    p = write(tmp_path, 'csp.cfg', new_coords_cfg())
    assert_matches_opencv(randomize_(Darknet(p), seed=6), p, tmp_path, 64, 96)


def test_new_coords_decode_matches_yolo_layer_c_by_hand(tmp_path):
    model = randomize_(Darknet(write(tmp_path, 'csp.cfg', new_coords_cfg())), seed=7).eval()
    with torch.no_grad():
        inf, raw = model(torch.rand(1, 3, 64, 96))
    start, s = 0, 2.0
    for r, anchors in zip(raw, [ANCHORS6[3:], ANCHORS6[:3]]):
        t = r[0].numpy().astype(np.float64)               # [na, ny, nx, 5+nc], already logistic
        na, ny, nx, _ = t.shape
        gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
        a = np.array(anchors, np.float64).reshape(na, 1, 1, 2)
        # darknet yolo_layer.c: x*scale_x_y - 0.5*(scale_x_y - 1), then b.x = (i + x) / lw; b.w = x*x*4*anchor / w
        bx = (t[..., 0] * s - 0.5 * (s - 1) + gx) / nx * 96
        by = (t[..., 1] * s - 0.5 * (s - 1) + gy) / ny * 64
        bwh = t[..., 2:4] ** 2 * 4 * a
        expected = np.concatenate([bx[..., None], by[..., None], bwh, t[..., 4:]], -1).reshape(-1, t.shape[-1])
        got = inf[0, start:start + na * ny * nx].numpy()
        start += na * ny * nx
        assert np.abs(got - expected).max() < 1e-4


def test_new_coords_needs_a_logistic_head(tmp_path):
    text = new_coords_cfg(head_act='linear')
    lines = text.splitlines()
    line = next(n for n, s in enumerate(lines, 1) if s == 'new_coords=1')
    msg = refused(tmp_path, text, line)
    assert 'new_coords=1' in msg and 'expected activation=logistic' in msg


def new_coords_targets():
    """[N, 6] (image, class, cx, cy, w, h) targets for the 96 x 64 input of new_coords_cfg."""
    return torch.tensor([[0, 0, 0.30, 0.40, 0.20, 0.30], [0, 1, 0.70, 0.60, 0.40, 0.50],
                         [1, 1, 0.50, 0.50, 0.10, 0.15]])


def test_new_coords_loss_decodes_boxes_as_the_model_does(tmp_path):
    """Two routes to the same boxes: the loss's decode (grid units) + grid, times the stride, equals the eval
    decode of models.YOLOLayer (which test_new_coords_decode_equals_opencv checks against OpenCV)."""
    from utils.loss import decode_xywh
    model = randomize_(Darknet(write(tmp_path, 'csp.cfg', new_coords_cfg())), seed=8).eval()
    with torch.no_grad():
        inf, raw = model(torch.rand(1, 3, 64, 96))
    start = 0
    for r, i in zip(raw, model.yolo_layers):
        head = model.module_list[i]
        _, na, ny, nx, _ = r.shape
        stride = torch.tensor([96 / nx, 64 / ny])
        yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing='ij')
        grid = torch.stack((xv, yv), 2).view(1, ny, nx, 2).float()
        box = decode_xywh(r[0], head, (head.anchors / stride).view(na, 1, 1, 2))
        expected = torch.cat(((box[..., :2] + grid) * stride, box[..., 2:] * stride), -1).reshape(-1, 4)
        assert torch.allclose(inf[0, start:start + na * ny * nx, :4], expected, atol=1e-4)
        start += na * ny * nx


def test_new_coords_objectness_and_class_loss_equal_the_logit_route(tmp_path):
    """A new_coords head outputs p = sigmoid(z) of the same conv output z a default head outputs: with darknet's
    objectness target 1 (gr=0) and no ignore rule, BCE on p equals BCE with logits on z, term by term."""
    from utils.loss import compute_loss
    csp = new_coords_cfg().replace('[yolo]', '[yolo]\nignore_thresh=1')
    plain = csp.replace('activation=logistic', 'activation=linear').replace('new_coords=1', 'new_coords=0')
    a = randomize_(Darknet(write(tmp_path, 'a.cfg', csp)), seed=9).train()
    b = Darknet(write(tmp_path, 'b.cfg', plain)).train()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    ra, rb = a(x), b(x)
    assert torch.allclose(ra[0], torch.sigmoid(rb[0]), atol=1e-6)
    _, ia = compute_loss(ra, new_coords_targets(), a, hyp={'gr': 0.0}, img_hw=(64, 96))
    _, ib = compute_loss(rb, new_coords_targets(), b, hyp={'gr': 0.0}, img_hw=(64, 96))
    assert ia[1] > 0.1 and ia[2] > 0.1                                   # obj and cls terms are not trivial
    assert torch.allclose(ia[1:3], ib[1:3], rtol=1e-4)
    assert not torch.isclose(ia[0], ib[0])                               # while the boxes decode differently


def test_a_new_coords_model_trains(tmp_path):
    """Gradients flow through the probability-space loss: 40 SGD steps on one batch lower the loss and every
    term, with finite gradients."""
    from utils.loss import compute_loss
    torch.manual_seed(0)
    model = randomize_(Darknet(write(tmp_path, 'csp.cfg', new_coords_cfg())), seed=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    items = []
    for _ in range(40):
        loss, it = compute_loss(model(x), new_coords_targets(), model, img_hw=(64, 96))
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        items.append(it)
    assert items[-1][3] < 0.5 * items[0][3]
    assert (items[-1][:3] < items[0][:3]).all()