"""Our model and our .cfg/.weights files against the original darknet (libdarknet from Debian's `darknet` package):
the same input gives the same [yolo] outputs, darknet re-saves our .weights byte for byte, and the darknet CLI
detects objects with a model a prune script wrote. Skipped where libdarknet (or gcc for its accessor shim) is
absent; the real-model tests also need ../shared.

Outputs are compared in darknet's [yolo] output space: logistic(x, y, objectness, classes), raw w, h."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import Darknet, load_model
from prune_utils import get_layer_set
from tests.helpers import (REPO, narrow_defs, need_darknet, need_darknet_cli, need_shared, randomize_, raw_outputs,
                           sparsify_)
from utils.darknet_lib import DARKNET_CLI, cfg_for_input, darknet_run, max_yolo_diff
from utils.darknet_weights import save_weights
from utils.datasets import image_tensor, imread, letterbox
from utils.parse_config import parse_cfg, write_cfg

TOL = 1e-3           # darknet's BN divides by sqrt(var) + 1e-6, ours by sqrt(var + 1e-5): ~1e-5 relative per layer
H, W = 128, 160      # small, non-square input for the random-weight models


@pytest.fixture(autouse=True, scope='module')
def darknet_and_one_thread():
    need_darknet()
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2-core machine is shared: one intra-op thread keeps small forwards fast
    yield
    torch.set_num_threads(n)


def darknet_check(model, cfg, weights, x, workdir):
    """(max difference of our raw heads vs darknet's [yolo] buffers for input x, darknet's re-save of
    `weights` as bytes, darknet's buffers). One darknet load does both."""
    run_cfg = cfg_for_input(cfg, Path(workdir) / 'run.cfg', x.shape[2], x.shape[3])
    resaved = Path(workdir) / 'darknet-resaved.weights'
    bufs, _ = darknet_run(run_cfg, weights, workdir, x=x.numpy(), resave=resaved)
    theirs = [bufs[i] for i in sorted(bufs)]
    assert sorted(bufs) == model.yolo_layers              # same [yolo] layers at the same indices
    return max_yolo_diff(raw_outputs(model, x), theirs), resaved.read_bytes(), theirs


def first_val_image():
    folder = need_shared('datasets/coco128/images/val2017')
    return sorted(folder.glob('*.jpg'))[0]


def letterboxed(path, cfg):
    """The image letterboxed to the cfg's [net] size as our loader does: [1, 3, H, W] RGB 0..1."""
    net = parse_cfg(cfg)[0]
    return image_tensor(letterbox(imread(str(path)), (net['height'], net['width']))[0])[None]


# --- (a) the real yolov3-tiny on a real image ---------------------------------------------------------------------

def test_real_yolov3_tiny_equals_darknet_on_a_coco_image(tmp_path):
    folder = need_shared('models/yolov3-tiny-coco')
    cfg, weights = folder / 'yolov3-tiny.cfg', folder / 'yolov3-tiny.weights'
    x = letterboxed(first_val_image(), cfg)
    diff, resaved, theirs = darknet_check(load_model(cfg, weights), cfg, weights, x, tmp_path)
    assert diff < TOL
    assert max(t[:, 4].max() for t in theirs) > 0.5                 # a real detector sees something here
    assert resaved == weights.read_bytes()                            # (d) darknet writes the file we read


# --- (b) random-weight yolov3 and yolov3-spp --------------------------------------------------------------------

@pytest.mark.parametrize('name', ['yolov3', 'yolov3-spp'])
def test_random_weight_model_equals_darknet_and_darknet_resaves_our_weights(name, tmp_path):
    cfg = REPO / 'cfg' / f'{name}.cfg'
    # the cfg's graph with half its widths (80 classes kept): darknet's random init of the full 62M weights
    # before loading ours alone takes seconds
    defs = narrow_defs(cfg, nc=80, div=2, height=H, width=W)
    cfg = write_cfg(tmp_path / f'{name}-half.cfg', defs)
    model = randomize_(Darknet(defs), seed=3).eval()                  # running_var >= 0.5
    weights = save_weights(model, tmp_path / f'{name}.weights')
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    diff, resaved, _ = darknet_check(model, cfg, weights, x, tmp_path)
    assert diff < TOL
    assert resaved == weights.read_bytes()                            # (d)


# --- (c) every model a prune script writes ---------------------------------------------------------------------

def run_script(script, *args, cwd=REPO):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r


RUN_AS_MAIN = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name='__main__')
    except SystemExit as e:
        if e.code:
            print(f'{argv[0]} exited {e.code}', file=sys.stderr)
            raise
"""


def run_scripts(commands):
    """Run each [script, *args] exactly as `python script args` runs it (runpy, as __main__), all in one child
    Python so torch is imported once rather than per script; fails on the first non-zero exit."""
    argvs = [[str(REPO / script), *map(str, args)] for script, *args in commands]
    r = subprocess.run([sys.executable, '-c', RUN_AS_MAIN, json.dumps(argvs)], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]


def sparse_model_files(folder, cfg_name, mode, seed):
    """A narrow copy of our `cfg_name` with 40% of each prunable unit's channels at gamma 0 and random beta
    (so the prune folds nonzero constants into the next layers): (cfg, weights) written to `folder`."""
    defs = narrow_defs(REPO / 'cfg' / cfg_name, nc=3, div=8, height=96, width=128)
    model = randomize_(Darknet(defs), seed=seed).eval()
    sparsify_(model, get_layer_set(model.module_defs, mode), share=0.4, seed=seed + 1, beta='random')
    return write_cfg(folder / f'{mode}-sparse.cfg', defs), save_weights(model, folder / f'{mode}-sparse.weights')


# script, extra arguments, the sparse model it prunes (powers of two, at least 8, restore a cut of under half at
# these narrow widths: that case removes more)
PRUNES = {'normal': ('normal_prune.py', [], 'v3'), 'regular-pow2': ('regular_prune.py', ['--percent', '0.6'], 'v3'),
          'regular-r8': ('regular_prune.py', ['--round-to', '8'], 'v3'), 'shortcut': ('shortcut_prune.py', [], 'v3'),
          'tiny': ('tiny_prune.py', [], 'tiny')}


@pytest.fixture(scope='module')
def pruned(tmp_path_factory):
    """{case: (source cfg, output prefix)}: each prune script run once on its sparse model (--percent 0.3 unless
    the case gives its own)."""
    folder = tmp_path_factory.mktemp('prune')
    sources = {'v3': sparse_model_files(folder, 'yolov3.cfg', 'shortcut', seed=20),
               'tiny': sparse_model_files(folder, 'yolov3-tiny.cfg', 'tiny', seed=30)}
    commands, outs = [], {}
    for case, (script, extra, src) in PRUNES.items():
        cfg, weights = sources[src]
        outs[case] = (cfg, folder / case)
        percent = [] if '--percent' in extra else ['--percent', '0.3']
        commands.append([script, '--cfg', cfg, '--weights', weights, *percent, '--latency-runs', '0',
                         '--out', folder / case, *extra])
    run_scripts(commands)
    return outs


@pytest.mark.parametrize('case', list(PRUNES))
def test_every_pruned_model_equals_darknet_and_darknet_resaves_it(case, pruned, tmp_path):
    cfg, out = pruned[case]
    pcfg, pweights = Path(f'{out}.cfg'), Path(f'{out}.weights')
    src, dst = parse_cfg(cfg), parse_cfg(pcfg)
    assert sum(d.get('filters', 0) for d in dst) < sum(d.get('filters', 0) for d in src)   # it did prune
    net = dst[0]
    x = torch.rand(1, 3, net['height'], net['width'], generator=torch.Generator().manual_seed(2))
    diff, resaved, _ = darknet_check(load_model(pcfg, pweights), pcfg, pweights, x, tmp_path)
    assert diff < TOL
    assert resaved == pweights.read_bytes()                           # (d)


# --- (e) the darknet CLI on a pruned real model --------------------------------------------------------------

DETECTION_LINE = re.compile(r'^(.+): (\d+)%$')  # darknet's draw_detections prints `name: NN%` per detection


def test_darknet_cli_detects_with_a_pruned_real_model(tmp_path):
    need_darknet_cli()
    folder = need_shared('models/yolov3-tiny-coco')
    image = first_val_image()
    cfg, weights = folder / 'yolov3-tiny.cfg', folder / 'yolov3-tiny.weights'
    out = tmp_path / 'tiny-pruned'
    run_script('tiny_prune.py', '--cfg', cfg, '--weights', weights, '--percent', '0.1', '--latency-runs', '0',
               '--out', out)
    pcfg, pweights = Path(f'{out}.cfg'), Path(f'{out}.weights')
    pruned = load_model(pcfg, pweights)
    names = (folder / 'coco.names').read_text().splitlines()
    nc = pruned.nc
    (tmp_path / 'names.txt').write_text('\n'.join(names) + '\n')
    (tmp_path / 'pruned.data').write_text(f'classes={nc}\nnames=names.txt\n')
    # -out: write pred.jpg and skip the window darknet otherwise opens (and waits on) after saving
    r = subprocess.run([DARKNET_CLI, 'detector', 'test', 'pruned.data', str(pcfg), str(pweights), str(image),
                        '-thresh', '0.1', '-out', 'pred'], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, 'QT_QPA_PLATFORM': 'offscreen'}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    found = [m.groups() for m in map(DETECTION_LINE.match, r.stdout.splitlines()) if m]
    assert found, r.stdout
    assert all(name in names and 10 <= int(p) <= 100 for name, p in found)
    assert (tmp_path / 'pred.jpg').stat().st_size > 0
    # the same pruned files through libdarknet equal our load of them on the letterboxed image
    x = letterboxed(image, pcfg)
    diff, resaved, _ = darknet_check(pruned, pcfg, pweights, x, tmp_path / 'lib')
    assert diff < TOL
    assert resaved == pweights.read_bytes()
