"""bench/schedule_bench.py at toy size: a generated VOC dataset and a small random detector go through the
bench's whole code path (convert, transfer, the three sparsity schedules, prunes by parameter share, val mAP,
the choice, the JSON)."""
import json

import pytest
import torch

from bench import schedule_bench
from models import Darknet, load_model
from tests.helpers import mini_tiny, randomize_, voc_root, write
from utils.darknet_weights import save_weights


def test_the_bench_runs_the_three_schedules_at_equal_mean_rate(tmp_path):
    voc = voc_root(tmp_path / 'voc')
    base_cfg = write(tmp_path, 'base.cfg', mini_tiny(nc=4))
    save_weights(randomize_(Darknet(str(base_cfg))), tmp_path / 'base.weights')
    args = schedule_bench.get_args_parser().parse_args([
        '--voc', str(voc), '--base-cfg', str(base_cfg), '--base-weights', str(tmp_path / 'base.weights'),
        '--img-size', '96', '--epochs', '1', '--batch-size', '2', '--calib', '2', '--min-keep', '1',
        '--s', '0.4', '--s-final', '0.5', '--threads', '1', '--work-dir', str(tmp_path / 'work'),
        '--results-dir', str(tmp_path)])
    n = torch.get_num_threads()
    try:
        assert schedule_bench.main(args) == 0
    finally:
        torch.set_num_threads(n)
    out = json.loads((tmp_path / 'schedule.json').read_text())
    work = tmp_path / 'work'
    stored = {r['name']: torch.load(work / r['name'] / 'last.pt', weights_only=True)['args'] for r in out['rows']}
    assert (stored['sparse']['s'], stored['sparse']['s_final']) == (0.4, 0.5)
    assert stored['sched-const']['s'] == stored['sched-local']['s'] == pytest.approx(0.3)   # (0.4 + 0.2) / 2
    assert stored['sched-const']['s_final'] is None and stored['sched-local']['sr_local'] == 0.5
    dense = sum(p.numel() for p in load_model(None, str(work / 'dense' / 'last.pt')).parameters())
    for r in out['rows']:
        assert [p['share'] for p in r['prunes']] == [0.5, 0.7] and 0 <= r['val_mAP50'] <= 1
        for p in r['prunes']:                              # counted from the written prune
            pruned = load_model(str(work / f"schedule-{r['name']}-{p['share']:g}.cfg"))
            assert p['params'] == sum(q.numel() for q in pruned.parameters()) <= (1 - p['share']) * dense
    assert out['best'] in stored and out['split'].startswith('val')
