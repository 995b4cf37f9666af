"""bench/custom_bench.py at toy size: a generated VOC dataset and a small random detector go through the bench's
whole code path (convert, transfer, sparse training with and without a teacher, prunes by parameter share,
post-training prune, fine-tuning, test-split evaluation, darknet/OpenCV checks, the side-by-side picture)."""
import json

import cv2
import numpy as np
import torch

import prune_utils
from bench import custom_bench
from models import Darknet, load_model
from tests.helpers import counted_cost, mini_tiny, randomize_, voc_root, write
from utils.darknet_weights import save_weights
from utils.parse_config import write_cfg


def test_the_bench_runs_end_to_end_at_toy_size(tmp_path):
    voc = voc_root(tmp_path / 'voc')
    base_cfg = write(tmp_path, 'base.cfg', mini_tiny(nc=4))           # a 4-class "COCO" model -> 2 classes
    base = randomize_(Darknet(str(base_cfg)))
    save_weights(base, tmp_path / 'base.weights')
    picture = tmp_path / 'side.png'
    argv = [
        '--voc', str(voc), '--base-cfg', str(base_cfg), '--base-weights', str(tmp_path / 'base.weights'),
        '--img-size', '96', '--epochs', '1', '--ft-epochs', '1', '--batch-size', '2', '--calib', '2',
        '--min-keep', '1', '--latency-runs', '1', '--threads', '1', '--work-dir', str(tmp_path / 'work'),
        '--results-dir', str(tmp_path), '--picture', str(picture)]
    args = custom_bench.get_args_parser().parse_args(argv)
    n = torch.get_num_threads()
    try:
        assert custom_bench.main(args) == 0
    finally:
        torch.set_num_threads(n)
    rows = {r['name']: r for r in json.loads((tmp_path / 'custom.json').read_text())['rows']}
    work = tmp_path / 'work'
    params = {k: sum(p.numel() for p in load_model(str(work / r['cfg']), str(work / r['weights'])).parameters())
              for k, r in rows.items()}
    for share in (0.5, 0.7):
        for name in (f"sparse-{share:g}", f"sparse-kd-{share:g}", f"sparse-{share:g}-ft", f"sparse-{share:g}-ft-kd",
                     f"sparse-kd-{share:g}-ft-kd", f"post-{share:g}-ft-kd", f"post-p{share:g}-ft",
                     f"post-p{share:g}-ft-kd"):
            assert params[name] == rows[name]['params']                  # counted from the written files
        for name in (f"sparse-{share:g}", f"post-p{share:g}"):
            assert params[name] <= (1 - share) * params['dense']
    assert rows['dense']['params'] == params['dense']
    for r in rows.values():                                              # every model read the test split once
        assert 0 <= r['test']['mAP50'] <= 1 and r['latency_ms'] > 0
        if r['name'].endswith(('-ft', '-ft-kd')):
            assert r['darknet']['opencv_max_diff'] < 2e-3
            dk, ab = r['darknet']['darknet'], r['darknet']['alexeyab']   # each one that could run here
            if isinstance(ab, dict):
                assert ab['yolo_max_diff'] < 1e-3
            if isinstance(dk, dict):      # the 2018 darknet adds BN eps 1e-6 outside the root: 1e-3 needs var >= 0.5
                assert dk['yolo_max_diff'] < 1e-2
    img = cv2.imread(str(picture))
    assert img.shape[1] == 2 * 96                                        # dense | pruned, the test image's width

    # again with --reuse: every training and every prune is taken from the work folder, not made again
    prunes = lambda: {p.name: p.stat().st_mtime_ns for p in work.glob('*0.[57].weights')}    # noqa: E731
    written = prunes()                                                   # the 8 prunes
    again = custom_bench.get_args_parser().parse_args(
        argv + ['--reuse', '--latency-runs', '0', '--picture', '', '--results-dir', str(tmp_path / 'again')])
    try:
        assert custom_bench.main(again) == 0
    finally:
        torch.set_num_threads(n)
    assert len(written) == 2 * 4 and prunes() == written
    rerun = {r['name']: r for r in json.loads((tmp_path / 'again' / 'custom.json').read_text())['rows']}
    assert {k: r['params'] for k, r in rerun.items()} == {k: r['params'] for k, r in rows.items()}


def test_the_post_training_plan_scored_once_is_the_plan_a_prune_makes(tmp_path):
    """Two routes to one plan: the bench scores act once and cuts it (by parameter share or BFLOPs target);
    prune_utils.make_plan scores it itself from the percent or target. The plan meets its aim counted from the
    compact model's own tensors, and its JSON (what the surgery replays) gives the same masks back."""
    model = randomize_(Darknet(str(write(tmp_path, 't.cfg', mini_tiny(nc=2)))), seed=3).eval()
    images = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    args = custom_bench.get_args_parser().parse_args(['--img-size', '96', '--min-keep', '1', '--layer-keep', '0.1'])
    layer_set = prune_utils.get_layer_set(model.module_defs, 'tiny')
    params, bflops = counted_cost(model, 96, 96)
    for aim in ({'share': 0.5}, {'target_flops': 0.3}):
        plan, percent = custom_bench.post_training_plan(model, images, args, **aim)
        ref = prune_utils.make_plan(model, layer_set, 'tiny', percent=percent, importance='act', images=images,
                                    target_flops=aim.get('target_flops'), min_keep=1, layer_keep=0.1,
                                    img_hw=(96, 96))
        assert sorted(plan.keep) == sorted(ref.keep)
        assert all(np.array_equal(plan.keep[i], ref.keep[i]) for i in ref.keep)
        replayed = prune_utils.plan_from_json(plan.to_json(), layer_set)
        assert all(np.array_equal(plan.keep[i], replayed.keep[i]) for i in plan.keep)
        cfg = tmp_path / 'compact.cfg'
        write_cfg(str(cfg), prune_utils.compact_defs(model, plan))
        p, b = counted_cost(Darknet(str(cfg)), 96, 96)
        assert (p <= 0.5 * params) if 'share' in aim else (b <= 0.7 * bflops)
