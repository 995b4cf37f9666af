"""demo.py: the step runner (order, dependencies, failures, output relay) and one whole pipeline run at toy size,
whose report must agree with the files it names."""
import csv
import json

import pytest
import torch

import demo
from models import load_model
from tests.helpers import REPO, counted_cost
from utils.errors import DarkslimError


def test_steps_run_after_what_they_need_and_each_log_keeps_its_output(tmp_path):
    order = tmp_path / 'order.txt'
    append = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + chr(10)); print('did', sys.argv[2])"
    steps = [demo.Step('c', ['-c', append, order, 'c'], after=['a', 'b']),
             demo.Step('a', ['-c', "import time; time.sleep(0.5); " + append, order, 'a']),
             demo.Step('b', ['-c', append, order, 'b'], after=['a'])]
    log = []
    demo.run_steps(steps, 2, tmp_path / 'logs', log)
    assert order.read_text().split() == ['a', 'b', 'c']  # c waits for both, b for a, although listed first
    assert [e['step'] for e in log] == ['a', 'b', 'c']
    for name in 'abc':
        assert (tmp_path / 'logs' / f'{name}.log').read_text() == f'did {name}\n'


def test_relay_keeps_the_last_redraw_of_a_progress_bar(tmp_path, capsys):
    # tqdm redraws with \r; a line ends with the bar's final state. No trailing newline: still relayed.
    code = "import sys; sys.stdout.write('10%\\r50%\\r100%\\nnext line\\n\\rtail')"
    demo.run_steps([demo.Step('bar', ['-c', code])], 1, tmp_path, [])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith('[bar] ')]
    assert printed[-3:] == ['[bar] 100%', '[bar] next line', '[bar] tail']
    assert (tmp_path / 'bar.log').read_text() == '100%\nnext line\ntail\n'


def test_a_failing_step_names_itself_and_its_log_and_stops_the_rest(tmp_path):
    marker = tmp_path / 'never'
    steps = [demo.Step('bad', ['-c', 'import sys; sys.exit(3)']),
             demo.Step('later', ['-c', f"open({str(marker)!r}, 'w')"], after=['bad'])]
    with pytest.raises(DarkslimError, match=r"step bad failed \(exit 3\).*bad\.log"):
        demo.run_steps(steps, 2, tmp_path / 'logs', [])
    assert not marker.exists()


def test_a_step_waiting_on_an_unknown_step_is_an_error(tmp_path):
    with pytest.raises(DarkslimError, match="wait on steps that never run"):
        demo.run_steps([demo.Step('x', ['-c', 'pass'], after=['nope'])], 1, tmp_path, [])


def best_epoch_map50(results_csv):
    """mAP@0.5 of the row with the highest fitness in a train.py results.csv (the epoch best.* holds)."""
    with open(results_csv) as f:
        rows = list(csv.DictReader(f))
    return float(max(rows, key=lambda r: float(r['fitness']))['mAP50'])


def test_toy_pipeline_report_agrees_with_the_files_it_names(tmp_path):
    out = tmp_path / 'demo'
    args = demo.get_args_parser().parse_args(
        ['--out', str(out), '--n-train', '8', '--n-val', '4', '--img-size', '64', '--dense-epochs', '1', '--epochs', '1',
         '--tiny-epochs', '1', '--ft-epochs', '1', '--eval-interval', '1', '--latency-runs', '1', '--jobs', '2'])
    demo.demo(args)
    on_disk = json.loads((out / 'report.json').read_text())
    assert on_disk['pruned'].keys() == {'normal', 'regular', 'regular8', 'shortcut', 'tiny', 'layer'}
    assert len(on_disk['pruned']['layer']['removed_blocks']) == demo.layer_prune_blocks(args.cfg)
    md = (out / 'report.md').read_text()
    # every number checked below is recomputed from the files the report names, by another route than the
    # report's: params and BFLOPs counted from the loaded model's tensors and a forward at 64 x 64 (the report
    # reads the cfg's layer table); mAP@0.5 from the training run's own results.csv (evaluated during training,
    # in memory; the report evaluates the weights file reloaded afterwards)
    for key in ('sparse', 'tiny_sparse'):
        m = on_disk[key]
        assert {'cfg', 'weights', 'params', 'bflops', 'map50', 'latency_ms'} <= m.keys()
        params, bflops = counted_cost(load_model(REPO / m['cfg'], REPO / m['weights']), 64, 64)
        assert m['params'] == params and m['bflops'] == pytest.approx(bflops, abs=5e-5)
        assert m['map50'] == pytest.approx(best_epoch_map50((REPO / m['weights']).parent / 'results.csv'), abs=1e-4)
        assert f"| {params:,} |" in md
        assert (REPO / m['gamma_hist_png']).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        # sparse training ran with --ema: the checkpoint holds the average's state beside the weights it saved
        assert torch.load(REPO / m['weights'], weights_only=True)['ema']['updates'] > 0
    for name, m in on_disk['pruned'].items():
        assert {'cfg', 'weights', 'params', 'bflops', 'map50_pruned', 'map50_finetuned', 'latency_ms'} <= m.keys()
        model = load_model(REPO / m['cfg'], REPO / m['weights'])  # paths are relative to the repository root
        params, bflops = counted_cost(model, 64, 64)
        assert m['params'] == params and m['bflops'] == pytest.approx(bflops, abs=5e-5)
        assert m['map50_finetuned'] == pytest.approx(
            best_epoch_map50((REPO / m['weights']).parent / 'results.csv'), abs=1e-4)
        base = on_disk['tiny_sparse' if name == 'tiny' else 'sparse']
        assert params < base['params']
        assert f"| {name} | {params:,} (" in md
        assert (REPO / m['channels_png']).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert on_disk['pruned']['normal']['percent'] == args.normal_percent
