"""Our model and our .cfg/.weights files against AlexeyAB darknet, the runtime users deploy pruned models into. It
reads the yolov4 additions ([route] groups, scale_x_y, new_coords) that the 2018 original of tests/test_darknet.py
does not, so it is the darknet that checks the yolov4-tiny family.

- The build helper (utils/darknet_build.py): its cache key follows the source tree and the flags, a tree is
  built once (also when two builds race), and a machine without the tools or with a failing make skips these
  tests with the reason.
- The official yolov3, yolov3-spp, yolov3-tiny and yolov4-tiny cfgs (../shared/darknet-cfg) with seeded weights
  and a prune of each by every strategy that applies: libdarknet's [yolo] outputs equal ours (1e-3) on a real
  letterboxed image, compared in the [yolo] layer's output space (utils.darknet_lib.to_darknet_space).
- The real yolov3-tiny (../shared/models/yolov3-tiny-coco) and its 0.1 tiny prune: the same, AlexeyAB's
  save_weights writes our file back byte for byte (bar the version it stamps in the header) and `darknet detector
  test` prints the detection our model makes.

Skipped without ../shared, or where AlexeyAB darknet cannot be built (the skip says why)."""
import math
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import pruning
from models import Darknet, load_model, model_info
from prune_layers import find_blocks
from prune_utils import get_layer_set
from tests.helpers import (head_decoding, narrow_defs, need_alexeyab, need_shared, one_thread, randomize_,  # noqa: F401
                           raw_outputs, sparsify_)
from utils import darknet_build
from utils.darknet_lib import cfg_for_input, darknet_detect, darknet_run, max_yolo_diff
from utils.darknet_weights import save_weights
from utils.datasets import image_tensor, imread, letterbox
from utils.parse_config import infer_shapes, layer_inputs, parse_cfg, write_cfg

TOL = 1e-3                   # BN: darknet divides by sqrt(var) + 1e-6 (folded into the conv), ours sqrt(var + 1e-5)
PARAM_BUDGET = 10_000_000    # random-weight models: darknet's own random init and our files stay well under 1 s
CLI_THRESH = 0.1             # the uncalibrated 10 % prune of a dense model scores lower than the original
MIN_SIDE = 128               # input height: the smallest multiple of the cfg's stride >= this; width one stride more


@pytest.fixture(scope='module')
def alexeyab():
    return need_alexeyab()


# --- the build helper ---------------------------------------------------------------------------------------------

def fake_source(folder):
    """A tiny source tree with the layout build_alexeyab expects (Makefile, include/darknet.h, src/)."""
    (folder / 'src').mkdir(parents=True)
    (folder / 'include').mkdir()
    (folder / 'Makefile').write_text('all:\n')
    (folder / 'include' / 'darknet.h').write_text('int x;\n')
    (folder / 'src' / 'a.c').write_text('int a = 1;\n')
    return folder


def fake_tools(folder, make_script):
    """`folder`/bin with gcc and g++ that do nothing and `make` running `make_script` (sh); returns the bin."""
    bin_ = folder / 'bin'
    bin_.mkdir()
    for name, body in (('gcc', 'exit 0'), ('g++', 'exit 0'), ('make', make_script)):
        (bin_ / name).write_text(f'#!/bin/sh\n{body}\n')
        (bin_ / name).chmod(0o755)
    return bin_


# a make that writes the three products (into its working folder) and logs each run
GOOD_MAKE = 'echo run >> "$MAKE_LOG"; sleep "${MAKE_SLEEP:-0}"; touch libdarknet.so darknet'


def entries(cache):
    return sorted(p.name for p in Path(cache).iterdir()) if Path(cache).exists() else []


def test_cache_key_follows_the_files_and_the_flags_not_the_mtimes(tmp_path):
    src = fake_source(tmp_path / 'src')
    key = darknet_build.source_key(src)
    copy = tmp_path / 'copy'
    shutil.copytree(src, copy)
    for p in copy.rglob('*'):
        p.touch()                                       # new mtimes, same files
    assert darknet_build.source_key(copy) == key
    (copy / 'src' / 'a.c').write_text('int a = 2;\n')   # one byte
    assert darknet_build.source_key(copy) != key
    (copy / 'src' / 'a.c').write_text('int a = 1;\n')
    assert darknet_build.source_key(copy) == key
    (copy / 'src' / 'a.c').rename(copy / 'src' / 'b.c')  # same contents, another name
    assert darknet_build.source_key(copy) != key
    assert darknet_build.source_key(src, ('AVX=1',)) != key


def test_a_tree_is_built_once_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    src, cache, log = fake_source(tmp_path / 'src'), tmp_path / 'cache', tmp_path / 'make.log'
    monkeypatch.setenv('PATH', f"{fake_tools(tmp_path, GOOD_MAKE)}:/usr/bin:/bin")
    monkeypatch.setenv('MAKE_LOG', str(log))
    before = sorted(p.relative_to(src) for p in src.rglob('*'))
    first = darknet_build.build_alexeyab(src, cache)
    assert first.api == 'alexeyab' and first.lib.is_file() and first.header.is_file() and first.cli.is_file()
    assert first.home == cache / f'alexeyab-{darknet_build.source_key(src)}'
    assert darknet_build.build_alexeyab(src, cache) == first
    assert log.read_text().count('run') == 1                 # the second call found the cached build
    assert sorted(p.relative_to(src) for p in src.rglob('*')) == before    # built in a copy
    (src / 'src' / 'a.c').write_text('int a = 3;\n')
    second = darknet_build.build_alexeyab(src, cache)
    assert second.home != first.home and log.read_text().count('run') == 2
    assert entries(cache) == sorted([first.home.name, second.home.name])   # no temp folders left


def test_two_builds_at_once_end_with_one_complete_entry(tmp_path, monkeypatch):
    src, cache = fake_source(tmp_path / 'src'), tmp_path / 'cache'
    monkeypatch.setenv('PATH', f"{fake_tools(tmp_path, GOOD_MAKE)}:/usr/bin:/bin")
    monkeypatch.setenv('MAKE_LOG', str(tmp_path / 'make.log'))
    monkeypatch.setenv('MAKE_SLEEP', '0.5')                   # both are inside make at the same time
    got = []
    threads = [threading.Thread(target=lambda: got.append(darknet_build.build_alexeyab(src, cache)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] == got[1] and got[0].lib.is_file()
    assert entries(cache) == [got[0].home.name]


def test_no_compiler_skips_with_the_reason(tmp_path, monkeypatch):
    src, cache = fake_source(tmp_path / 'src'), tmp_path / 'cache'
    (tmp_path / 'empty').mkdir()
    monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
    with pytest.raises(pytest.skip.Exception) as skipped:
        need_alexeyab(src, cache)
    assert 'make, gcc, g++ not found on PATH' in str(skipped.value)
    assert entries(cache) == []


def test_a_failing_make_skips_with_its_last_lines(tmp_path, monkeypatch):
    src, cache = fake_source(tmp_path / 'src'), tmp_path / 'cache'
    script = ('i=1; while [ $i -le 40 ]; do echo "compiling part $i"; i=$((i+1)); done; '
              'echo "./src/gemm.c:12:5: error: expected \';\' before \'}\' token" >&2; exit 2')
    monkeypatch.setenv('PATH', f"{fake_tools(tmp_path, script)}:/usr/bin:/bin")
    with pytest.raises(pytest.skip.Exception) as skipped:
        need_alexeyab(src, cache)
    why = str(skipped.value)
    assert "src/gemm.c:12:5: error: expected ';'" in why and 'failed (exit 2)' in why
    assert 'compiling part 40' in why and 'compiling part 1\n' not in why    # the last lines only
    assert entries(cache) == []                                              # nothing that looks built


# --- the official cfgs with seeded weights, and their prunes ------------------------------------------------------

def small_defs(path):
    """`path`'s graph and classes at a small non-square input (height: the smallest multiple of the cfg's total
    stride >= MIN_SIDE; width: one stride more), its widths divided by the smallest power of two that brings its
    parameters within PARAM_BUDGET (1 for the tiny cfgs)."""
    defs = parse_cfg(path)
    stride = defs[0]['height'] // min(h for _, h, _ in infer_shapes(defs))
    h = stride * math.ceil(MIN_SIDE / stride)
    nc = next(d['classes'] for d in defs if d['type'] == 'yolo')
    div = 1
    while model_info(small := narrow_defs(path, nc=nc, div=div, height=h, width=h + stride))[0] > PARAM_BUDGET:
        div *= 2
    return small


def with_new_coords(defs):
    """The cfg with every [yolo] decoding as the scaled-YOLOv4 cfgs do: new_coords=1, scale_x_y=2, its input
    conv logistic-activated."""
    for i, d in enumerate(defs[1:]):
        if d['type'] == 'yolo':
            d.update(new_coords=1, scale_x_y=2.0)
            defs[layer_inputs(defs, i)[0] + 1]['activation'] = 'logistic'
    infer_shapes(defs)
    return defs


def prunes(module_defs):
    """{strategy: PruneOptions} for the cfg: with [shortcut]s normal (convs no shortcut couples), shortcut (all,
    coupled ones sharing one mask) and layer (a third of the removable residual blocks, then channels); without,
    tiny (all convs; the normal set is the same one there) and regular (that set, kept counts rounded to 8)."""
    if any(d['type'] == 'shortcut' for d in module_defs):
        n_blocks = max(1, len(find_blocks(module_defs).candidates) // 3)
        return {'normal': pruning.PruneOptions(percent=0.3), 'shortcut': pruning.PruneOptions(percent=0.3),
                'layer': pruning.PruneOptions(n_blocks=n_blocks, percent=0.3)}
    return {'tiny': pruning.PruneOptions(percent=0.3), 'regular': pruning.PruneOptions(percent=0.3, round_to=8)}


def real_image():
    folder = need_shared('datasets/coco128/images/val2017')
    return sorted(folder.glob('*.jpg'))[0]


def letterboxed(path, height, width):
    """The image letterboxed to height x width as our loader does: [1, 3, H, W] RGB 0..1."""
    return image_tensor(letterbox(imread(str(path)), (height, width))[0])[None]


def alexeyab_check(runtime, model, cfg, weights, x, workdir, resave=False):
    """(max difference of our [yolo] outputs vs AlexeyAB's for input x, its [yolo] buffers {layer: array},
    its save_weights of `weights` as bytes or None)."""
    workdir = Path(workdir)
    run_cfg = cfg_for_input(cfg, workdir / 'run.cfg', x.shape[2], x.shape[3])
    out = workdir / 'resaved.weights' if resave else None
    bufs, _ = darknet_run(run_cfg, weights, workdir, x=x.numpy(), resave=out, runtime=runtime)
    assert sorted(bufs) == model.yolo_layers                  # the same [yolo] layers at the same indices
    diff = max_yolo_diff(raw_outputs(model, x), [bufs[i] for i in sorted(bufs)], head_decoding(model))
    return diff, bufs, out.read_bytes() if resave else None


def filters(defs):
    return sum(d.get('filters', 0) for d in defs)


@pytest.mark.parametrize('name, variant', [('yolov3', None), ('yolov3-spp', None), ('yolov3-tiny', None),
                                           ('yolov4-tiny', None), ('yolov4-tiny', with_new_coords)])
def test_official_cfg_and_its_prunes_equal_alexeyab_on_a_real_image(name, variant, alexeyab, tmp_path):
    defs = small_defs(need_shared(f'darknet-cfg/{name}.cfg'))
    defs = variant(defs) if variant else defs
    model = randomize_(Darknet(defs), seed=3).eval()
    # 40 % of each prunable unit at gamma 0 with a random beta: the prunes remove them and fold act(beta) onward
    mode = 'shortcut' if any(d['type'] == 'shortcut' for d in model.module_defs) else 'tiny'
    sparsify_(model, get_layer_set(model.module_defs, mode, model.in_channels), share=0.4, seed=4, beta='random')
    nets = {'original': model}
    for strategy, options in prunes(model.module_defs).items():
        nets[strategy] = pruning.prune(model, strategy, options).nets['compact'].eval()
        assert filters(nets[strategy].module_defs) < filters(model.module_defs)          # it did prune
    x = letterboxed(real_image(), defs[0]['height'], defs[0]['width'])
    diffs = {}
    for label, net in nets.items():
        cfg = write_cfg(tmp_path / f'{label}.cfg', net.defs)
        weights = save_weights(net, tmp_path / f'{label}.weights')
        diffs[label] = alexeyab_check(alexeyab, net, cfg, weights, x, tmp_path / label)[0]
    assert max(diffs.values()) < TOL, diffs


# --- the real yolov3-tiny and its 0.1 tiny prune ------------------------------------------------------------------

@pytest.fixture(scope='module')
def real_models(tmp_path_factory):
    """{label: (model, cfg, weights)}: the official COCO yolov3-tiny and its 10 % tiny prune (no calibration)
    written by our writer."""
    folder = need_shared('models/yolov3-tiny-coco')
    cfg, weights = folder / 'yolov3-tiny.cfg', folder / 'yolov3-tiny.weights'
    model = load_model(cfg, weights)
    compact = pruning.prune(model, 'tiny', pruning.PruneOptions(percent=0.1)).nets['compact'].eval()
    assert filters(compact.module_defs) < filters(model.module_defs)
    out = tmp_path_factory.mktemp('real')
    pruned = (compact, write_cfg(out / 'tiny-0.1.cfg', compact.defs), save_weights(compact, out / 'tiny-0.1.weights'))
    return {'original': (model, cfg, weights), 'tiny-0.1': pruned}


def our_top_detection(model, path):
    """(class, percent, (left, top, width, height) in image pixels) of our model's highest obj x class score on
    the image resized to the network size without letterboxing, as AlexeyAB's detector test feeds it."""
    img = imread(str(path))
    h, w = model.img_size
    x = image_tensor(cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR))[None]
    with torch.no_grad():
        inf = model.eval()(x)[0][0].double()                     # [N, 5 + nc]: cx, cy, w, h (input pixels), obj, p
    scores = inf[:, 5:] * inf[:, 4:5]
    k, c = divmod(int(scores.argmax()), scores.shape[1])
    cx, cy, bw, bh = (inf[k, :4] * torch.tensor([img.shape[1] / w, img.shape[0] / h] * 2)).tolist()
    return c, 100 * float(scores[k, c]), (cx - bw / 2, cy - bh / 2, bw, bh)


def iou(a, b):
    """IoU of two (left, top, width, height) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.mark.parametrize('label', ['original', 'tiny-0.1'])
def test_real_yolov3_tiny_and_its_prune_in_alexeyab(label, real_models, alexeyab, tmp_path):
    model, cfg, weights = real_models[label]
    image = real_image()
    net = parse_cfg(cfg)[0]
    x = letterboxed(image, net['height'], net['width'])
    diff, bufs, resaved = alexeyab_check(alexeyab, model, cfg, weights, x, tmp_path / 'lib', resave=True)
    assert diff < TOL
    if label == 'original':
        assert max(b[:, 4].max() for b in bufs.values()) > 0.5    # a real detector sees something here
    # AlexeyAB writes our file back; its header's revision field says its own version (src/version.h)
    ours = weights.read_bytes()
    major, minor, revision = darknet_build.weights_version(alexeyab)
    assert ours[:8] == np.array([major, minor], np.int32).tobytes()
    assert resaved == ours[:8] + np.int32(revision).tobytes() + ours[12:]
    # its detector CLI finds the detection our model makes on the same plainly resized image
    names = (need_shared('models/yolov3-tiny-coco') / 'coco.names').read_text().splitlines()
    (tmp_path / 'names.txt').write_text('\n'.join(names) + '\n')
    (tmp_path / 'coco.data').write_text(f'classes={model.nc}\nnames=names.txt\n')
    found, log = darknet_detect(alexeyab, tmp_path / 'coco.data', cfg, weights, image, tmp_path, thresh=CLI_THRESH)
    assert found, log[-2000:]
    assert all(d.name in names and 100 * CLI_THRESH <= d.percent <= 100 and d.box for d in found)
    assert (tmp_path / 'predictions.jpg').stat().st_size > 0
    top = max(found, key=lambda d: d.percent)
    c, percent, box = our_top_detection(model, image)
    assert top.name == names[c] and abs(top.percent - percent) <= 3, (top, names[c], percent)
    assert iou(top.box, box) > 0.8, (top.box, box)
