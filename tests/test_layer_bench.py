"""bench/layer_bench.py at toy size: generated shapes, a small residual detector trained one epoch, and every
prune row the bench makes, checked against what it claims (the gamma rows remove the blocks of lowest mean
|gamma|, the channel rows reach the fold rows' BFLOPs)."""
import json

import torch

import prune_layers
from bench import layer_bench
from data.make_shapes import CLASSES
from models import load_model
from tests.helpers import mini_yolov3, write


def test_the_bench_compares_gamma_fold_and_channels_at_equal_bflops(tmp_path):
    cfg = write(tmp_path, 'res.cfg', mini_yolov3(nc=len(CLASSES), width=64, height=64))
    args = layer_bench.get_args_parser().parse_args([
        '--cfg', str(cfg), '--img-size', '64', '--n-train', '12', '--n-val', '6', '--epochs', '1',
        '--batch-size', '4', '--calib', '4', '--distill', '2', '--threads', '1', '--work-dir', str(tmp_path / 'w'),
        '--results-dir', str(tmp_path)])
    n = torch.get_num_threads()
    try:
        layer_bench.main(args)
    finally:
        torch.set_num_threads(n)
    out = json.loads((tmp_path / 'layer.json').read_text())
    dense = load_model(None, str(tmp_path / 'w' / 'dense' / 'last.pt'))
    blocks = prune_layers.find_blocks(dense.module_defs, dense.in_channels).candidates
    mean_gamma = {b.shortcut: dense.module_list[b.last][1].weight.detach().abs().mean().item() for b in blocks}
    by_gamma = sorted(mean_gamma, key=mean_gamma.get)
    rows = out['rows']
    assert [r['n_blocks'] for r in rows if r['strategy'] == 'layer'] == [n for n in range(1, len(blocks)) for _ in 'gf']
    for r in rows:
        if r['importance'] == 'gamma':
            assert sorted(r['removed_shortcuts']) == sorted(by_gamma[:r['n_blocks']])
        assert all(0 <= v <= 1 for v in r['mAP50'].values()) and 'distill' in r['mAP50']
    for fold_row, ch_row in zip(rows[1::3], rows[2::3]):
        assert fold_row['importance'] == 'fold' and ch_row['strategy'] == 'shortcut'
        assert ch_row['bflops'] <= fold_row['bflops'] + 1e-4 and ch_row['removed_shortcuts'] == []
    assert all(r['bflops'] < out['dense']['bflops'] for r in rows) and out['dense']['train_seconds'] > 0
