"""bench/bn_refresh_bench.py at toy size: a checkpoint with stale BatchNorm statistics, evaluated as stored and
after re-estimating them on the train split (the whole code path: load, refresh, evaluate, table, JSON)."""
import json

import torch

from bench import bn_refresh_bench
from data.make_shapes import make_shapes
from models import Darknet, save_checkpoint
from tests.helpers import mini_tiny, randomize_, write


def test_the_bench_runs_and_counts_the_refresh_images(tmp_path):
    data = make_shapes(tmp_path / 'shapes', n_train=6, n_val=3, img_size=64, seed=0)
    model = randomize_(Darknet(write(tmp_path, 't.cfg', mini_tiny(nc=5, width=64, height=64))), seed=1)
    with torch.no_grad():                              # statistics no input produces: what -sr leaves behind
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.mul_(40)
    ckpt = save_checkpoint(tmp_path / 'stale.pt', model)
    args = bn_refresh_bench.get_args_parser().parse_args([
        '--data', str(data), '--model', f'toy={ckpt}', '--images', '4', '0', '--img-size', '64', '--threads', '1',
        '--results-dir', str(tmp_path)])
    bn_refresh_bench.main(args)
    out = json.loads((tmp_path / 'bn-refresh.json').read_text())
    assert [r['images'] for r in out['rows']] == [None, 4, 6]          # 0 = the whole train split (6 images)
    assert all(0 <= r['mAP50'] <= 1 for r in out['rows']) and out['split'] == 'valid'
    assert out['git_commit'] and out['machine']
