"""Transfer to another class count: `train.py --cfg my-3cls.cfg --weights yolov3-tiny.weights`.

- Every layer whose tensors all fit the cfg is loaded bit for bit, from a .pt (by name) or a darknet .weights
  (read with the shapes of the network that wrote it: the cfg's own network with the class count solved from
  the file's length); a layer is loaded all or nothing.
- The layers left at their initialisation (for a class-count change exactly the convs feeding [yolo]) are named
  in one line, by index and type; train.py gives those heads the prior biases of a fresh head.
- A file no class count explains is one line, exit 2; --cfg may be left out for a .pt that stores its cfg.
"""
import math
import subprocess
import sys

import pytest
import torch

import models
import train as train_module
import training
from data.make_shapes import make_shapes
from models import Darknet, load_transfer
from tests.helpers import REPO, conv, mini_tiny, mini_yolov3, need_shared, randomize_, write
from tests.helpers import one_thread  # noqa: F401 (autouse: one intra-op thread in this file)
from utils.darknet_weights import save_weights
from utils.errors import DarkslimError
from utils.parse_config import infer_shapes, parse_cfg_text

SHAPES_NC = 5  # make_shapes classes


def net(text):
    defs = parse_cfg_text(text)
    infer_shapes(defs)
    return Darknet(defs)


def head_convs(text):
    """The conv right before each [yolo] section of cfg text (what feeds it in these cfgs), by layer index."""
    types = [line[1:-1] for line in text.splitlines() if line.startswith('[')][1:]
    return {i - 1 for i, t in enumerate(types) if t == 'yolo'}


def source_files(tmp_path, text, seed=0):
    """A randomized model of cfg `text`, written as darknet .weights and as a .pt; returns (model, weights, pt)."""
    model = randomize_(net(text), seed)
    w, pt = tmp_path / 'src.weights', tmp_path / 'src.pt'
    save_weights(model, w)
    models.save_checkpoint(pt, model)
    return model, w, pt


def layer_tensors(model, i):
    return {k: v for k, v in model.state_dict().items() if k.startswith(f"module_list.{i}.")}


@pytest.mark.parametrize('fmt', ['weights', 'pt'])
def test_another_class_count_loads_every_other_layer_bit_for_bit_and_leaves_the_heads(tmp_path, fmt):
    src, w, pt = source_files(tmp_path, mini_tiny(nc=5))
    target = mini_tiny(nc=2)
    torch.manual_seed(7)
    fresh = net(target)                               # the initialisation the target gets
    torch.manual_seed(7)
    model = net(target)
    done = load_transfer(model, w if fmt == 'weights' else pt)
    heads = head_convs(target)
    assert heads == {9, 16}                           # (mini_tiny's layout, derived from the cfg text above)
    assert set(done.kept) == heads and done.source_nc == 5 and done.nc == 2
    for i, d in enumerate(model.module_defs):
        ours, theirs, init = layer_tensors(model, i), layer_tensors(src, i), layer_tensors(fresh, i)
        for k, v in ours.items():
            assert torch.equal(v, init[k] if i in heads else theirs[k]), k
    line = done.line({i: d['type'] for i, d in enumerate(model.module_defs)})
    assert '\n' not in line and '(5 classes -> 2)' in line and 'loaded 7 of 9 layers' in line
    assert '9 convolutional (Conv2d.weight 30x48x1x1 in the file, 21x48x1x1 here)' in line
    assert '16 convolutional (Conv2d.weight 30x24x1x1 in the file, 21x24x1x1 here)' in line


@pytest.mark.parametrize('nc', [1, 3, 80])
def test_the_class_count_of_a_weights_file_is_solved_from_its_length(tmp_path, nc):
    """Files written by save_weights for mini_yolov3 with nc classes, read against the 2-class cfg."""
    src = randomize_(net(mini_yolov3(nc=nc)), 1)
    save_weights(src, tmp_path / 'w.weights')
    assert models.darknet_classes(parse_cfg_text(mini_yolov3(nc=2)), tmp_path / 'w.weights') == nc
    model = net(mini_yolov3(nc=2))
    done = load_transfer(model, tmp_path / 'w.weights')
    assert set(done.kept) == (set() if nc == 2 else head_convs(mini_yolov3(nc=2)))
    for i in done.loaded:
        theirs = layer_tensors(src, i)
        assert all(torch.equal(v, theirs[k]) for k, v in layer_tensors(model, i).items())


def test_a_layer_is_loaded_all_or_nothing(tmp_path):
    """The source has no BatchNorm on conv 2 (its conv weight has the target's shape) and conv 6 twice as wide
    (so conv 8, which reads it, differs too): those layers keep their initialisation whole; the rest loads."""
    text = mini_tiny(nc=2)
    source = text.replace(conv(16, 3), conv(16, 3, bn=0), 1).replace(conv(32, 3), conv(64, 3), 1)
    src, _, pt = source_files(tmp_path, source)
    torch.manual_seed(3)
    fresh = net(text)
    torch.manual_seed(3)
    model = net(text)
    done = load_transfer(model, pt)
    assert done.kept == {2: 'no BatchNorm2d.weight in the file',
                         6: 'Conv2d.weight 64x24x3x3 in the file, 32x24x3x3 here',
                         8: 'Conv2d.weight 48x64x3x3 in the file, 48x32x3x3 here'}
    assert model.module_list[2][0].weight.shape == src.module_list[2][0].weight.shape
    for i in range(len(model.module_defs)):
        ref = fresh if i in done.kept else src
        assert all(torch.equal(v, layer_tensors(ref, i)[k]) for k, v in layer_tensors(model, i).items()), i


def test_layers_of_the_file_the_cfg_lacks_are_named_not_dropped_silently(tmp_path):
    text = mini_tiny(nc=2)
    src, _, pt = source_files(tmp_path, text + "[route]\nlayers=-2\n" + conv(8, 1) + conv(4, 3))   # 18 19 20
    model = net(text)
    done = load_transfer(model, pt)
    assert not done.kept and done.unused == [19, 20] and not done.exact
    assert done.line({i: d['type'] for i, d in enumerate(model.module_defs)}).endswith(
        "loaded 9 of 9 layers with parameters; left at their initialisation: none; not in the cfg, unused: the "
        "file's layers 19..20")
    for i in range(len(model.module_defs)):
        assert all(torch.equal(v, layer_tensors(src, i)[k]) for k, v in layer_tensors(model, i).items()), i


def test_a_file_no_class_count_explains_is_one_line(tmp_path):
    _, w, _ = source_files(tmp_path, mini_tiny(nc=5))
    short = tmp_path / 'short.weights'
    short.write_bytes(w.read_bytes()[:-12])           # three floats missing
    with pytest.raises(DarkslimError, match=r'short\.weights: holds \d+ floats after the header; .* no class '
                                            r'count fits'):
        load_transfer(net(mini_tiny(nc=2)), short)
    other = tmp_path / 'other.weights'                 # another network: no class count of this one fits
    save_weights(net(mini_yolov3(nc=2)), other)
    with pytest.raises(DarkslimError, match='no class count fits'):
        load_transfer(net(mini_tiny(nc=2)), other)
    partial = tmp_path / 'partial.weights'               # layers 0..4 only (as darknet53.conv.74 is of darknet53)
    save_weights(net(mini_tiny(nc=5)), partial, cutoff=5)
    with pytest.raises(DarkslimError, match=r'no class count fits; layers 0\.\.4 of this cfg need exactly that many '
                                            r'\(a partial file such as darknet53\.conv\.74: read it with a layer '
                                            r'cutoff of 5\); expected'):
        load_transfer(net(mini_tiny(nc=2)), partial)
    _, _, pt = source_files(tmp_path, mini_yolov3(nc=2))  # a .pt of another network: nothing fits
    with pytest.raises(DarkslimError, match=r'src\.pt: no layer of the file fits the cfg \(layer 0: '):
        load_transfer(net(mini_tiny(nc=2, width=64, height=64).replace(conv(8, 3), conv(6, 3), 1)), pt)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """8 train / 4 val make_shapes images at 64 px (5 classes)."""
    return make_shapes(tmp_path_factory.mktemp('shapes') / 'shapes', n_train=8, n_val=4, img_size=64, seed=0)


def run_train(*argv):
    return train_module.train(train_module.get_args_parser().parse_args([str(a) for a in argv]))


def test_train_names_the_layers_it_left_and_gives_those_heads_prior_biases(tmp_path, shapes, capsys):
    text = mini_tiny(nc=SHAPES_NC, width=64, height=64)
    cfg = write(tmp_path, 'five.cfg', text)
    src, w, _ = source_files(tmp_path, mini_tiny(nc=2, width=64, height=64))
    config = training.TrainConfig(cfg=str(cfg), data=str(shapes), weights=str(w), img_size=64, workers=0,
                                  notest=True, out_dir=str(tmp_path / 'run'))
    run = training.build(config)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('transfer ')]
    assert lines == [f"transfer {w} (2 classes -> 5): loaded 7 of 9 layers with parameters; left at their "
                     "initialisation: 9 convolutional (Conv2d.weight 21x48x1x1 in the file, 30x48x1x1 here), "
                     "16 convolutional (Conv2d.weight 21x24x1x1 in the file, 30x24x1x1 here)"]
    cells = {9: 8 * 8, 16: 16 * 16}                   # 64 px through three /2 maxpools; head 16 upsampled x2
    assert set(cells) == head_convs(text)
    for i in cells:                                   # priors, by hand: 3 anchors per head
        p = min(8 / (3 * cells[i]), 0.25)
        bias = run.model.module_list[i][0].bias.detach().view(3, SHAPES_NC + 5)
        assert torch.allclose(bias[:, 4], torch.full((3,), math.log(p / (1 - p))))
        assert torch.allclose(bias[:, 5:], torch.full((3, SHAPES_NC), math.log(0.6 / (SHAPES_NC - 0.99))))
    for i in set(range(len(run.model.module_defs))) - head_convs(text):
        theirs = layer_tensors(src, i)
        assert all(torch.equal(v, theirs[k]) for k, v in layer_tensors(run.model, i).items()), i


def test_without_cfg_a_pt_gives_its_own_and_a_weights_file_is_refused(tmp_path, shapes):
    text = mini_tiny(nc=SHAPES_NC, width=64, height=64)
    _, w, pt = source_files(tmp_path, text)
    common = ['--data', shapes, '--img-size', 64, '--batch-size', 8, '--workers', 0, '--epochs', 1, '--notest']
    run_train(*common, '--weights', pt, '--out-dir', tmp_path / 'run')
    saved = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)
    assert saved['cfg'] == models.load_model(None, pt).cfg_text() and saved['args']['cfg'] is None
    with pytest.raises(DarkslimError, match=r'^no --cfg given and --weights \S+src\.weights is a darknet \.weights '
                                            r'file, which stores no cfg; expected --cfg with it$'):
        run_train(*common, '--weights', w, '--out-dir', tmp_path / 'bad')


def test_train_py_exits_2_with_one_line_for_weights_no_class_count_explains(tmp_path, shapes):
    cfg = write(tmp_path, 'five.cfg', mini_tiny(nc=SHAPES_NC, width=64, height=64))
    bad = tmp_path / 'bad.weights'
    save_weights(net(mini_yolov3(nc=SHAPES_NC)), bad)
    r = subprocess.run([sys.executable, 'train.py', '--cfg', str(cfg), '--data', str(shapes), '--weights', str(bad),
                        '--epochs', '1', '--workers', '0', '--out-dir', str(tmp_path / 'o')],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'bad.weights: holds' in lines[0] and 'no class count fits' in lines[0]
    assert not (tmp_path / 'o' / 'last.pt').exists()


def test_coco_yolov3_tiny_into_a_3_class_cfg(tmp_path):
    """The real case: the COCO yolov3-tiny (80 classes) read into its 3-class cfg (models.py make-cfg)."""
    root = need_shared('models/yolov3-tiny-coco')
    three = tmp_path / 'tiny-3.cfg'
    models.make_cfg(root / 'yolov3-tiny.cfg', 3, three)
    coco = models.load_model(root / 'yolov3-tiny.cfg', root / 'yolov3-tiny.weights')
    model = Darknet(str(three))
    done = load_transfer(model, root / 'yolov3-tiny.weights')
    heads = head_convs(three.read_text())
    assert set(done.kept) == heads and done.source_nc == 80 and len(heads) == 2
    for i in range(len(model.module_defs)):
        if i not in heads:
            theirs = layer_tensors(coco, i)
            assert all(torch.equal(v, theirs[k]) for k, v in layer_tensors(model, i).items()), i
    assert all(f"{i} convolutional (Conv2d.weight 255x" in done.line(
        {j: d['type'] for j, d in enumerate(model.module_defs)}) for i in heads)
