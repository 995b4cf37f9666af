"""Which sparsity schedule to sparse-train with, measured on BCCD val: the rate decaying linearly from --s to
--s * --s-final over the epochs, the same mean rate held constant, and that constant rate with --sr-local (from
half-way on, only the smallest-|gamma| half of the channels, ranked over all layers, keeps it; the others get 1 %
of it). Each schedule trains E epochs of -sr --prune 2 from the same dense
model; each sparse model is then pruned (tiny, calibrated, --layer-keep) at the smallest --percent removing
>= 50 % and >= 70 % of its parameters, before any fine-tuning. The schedule whose prunes keep the most val
mAP@0.5 (mean over the shares) is the one bench/custom_bench.py uses.

    python -m bench.schedule_bench [--epochs E] [--work-dir DIR [--reuse]]

Needs ../shared/datasets/bccd and ../shared/models/yolov3-tiny-coco (skips with a message otherwise). Training
and calibration on BCCD `train`, every number on `val` (this bench makes a choice: `test` is never read). The
dense model and the linear schedule are custom_bench's own runs (`dense`, `sparse`, same options): with the
same --work-dir and --reuse the two benches share them. Writes bench/results/schedule.json.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

import calibrate
from bench import custom_bench
from bench.common import RESULTS, load_average, print_table, write_result
from models import load_model, model_info
from prune_utils import get_layer_set
from utils.errors import cli_main
from utils.evaluate import evaluate
from utils.sparsity import SMALL_GAMMA, sparsity_stats

SPARSE_MODE = 2                                     # -sr --prune 2: the tiny strategy's layer set


def get_args_parser():
    p = custom_bench.add_bccd_args(argparse.ArgumentParser(description=__doc__,
                                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument('--sr-local', type=float, default=0.5, help='--sr-local of the local schedule')
    p.add_argument('--results-dir', default=RESULTS, help='where schedule.json goes')
    return p


def schedules(args):
    """[(run name, description, train.py options)]: the constant rate is the linear one's mean, so the linear
    and constant runs apply the same total L1 rate (the local run less: it spares the larger channels)."""
    mean = args.s * (1 + args.s_final) / 2
    sr = {'sr': True, 'prune': SPARSE_MODE}
    return [('sparse', f"linear: --s {args.s:g} --s-final {args.s_final:g}", {**sr, 's': args.s,
                                                                            's_final': args.s_final}),
            ('sched-const', f"constant: --s {mean:g}", {**sr, 's': mean}),
            ('sched-local', f"local: --s {mean:g} --sr-local {args.sr_local:g}", {**sr, 's': mean,
                                                                                 'sr_local': args.sr_local})]


def val_map(model, data, size):
    return round(evaluate(model, data, img_size=size, batch_size=16, verbose=False)['mAP50'], 4)


def measure(model, data, images, args, stem):
    """One sparse model on val: its mAP, |gamma| sparsity and each prune's size and mAP -> a dict."""
    st = sparsity_stats(model, get_layer_set(model.module_defs, SPARSE_MODE))
    row = {'val_mAP50': val_map(model, data, args.img_size), 'gamma_small_share': round(st['small_share'], 4),
           'gamma_median': round(st['p50'], 4), 'prunes': []}
    for share in args.params:
        cfg, weights, info = custom_bench.prune_sparse(model, share, images, args, f"{stem}-{share:g}")
        pruned = load_model(cfg, weights)
        params, bflops = model_info(pruned.defs, args.img_size, args.img_size)
        row['prunes'].append({'share': share, 'percent': info['percent'], 'params': params,
                              'bflops': round(bflops, 3), 'val_mAP50': val_map(pruned, data, args.img_size)})
    return row


def run(work, args):
    """Convert, the dense model, each schedule's run, measured -> rows."""
    os.makedirs(work, exist_ok=True)
    data = custom_bench.convert(work, args.voc)
    dense, _, _ = custom_bench.train_dense(work, args, data)
    images = calibrate.calibration_images(data, args.calib, args.img_size)
    rows = []
    for name, made, extra in schedules(args):
        pt, _, seconds = custom_bench.train(work, name, args, None, dense, data, args.epochs, args.lr0, **extra)
        rows.append({'name': name, 'made': made, 'train_seconds': seconds,
                     **measure(load_model(None, pt), data, images, args, os.path.join(work, f"schedule-{name}"))})
        print(f"{made}: {rows[-1]}", flush=True)
    return rows


def main(args):
    if custom_bench.skipped('schedule_bench', args):
        return 0
    torch.set_num_threads(args.threads)
    load = load_average()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.work_dir or tmp, args)
    table = [['schedule', 'val mAP@0.5', f"|γ| < {SMALL_GAMMA}", 'median |γ|']
             + [f"val mAP@0.5, -{s:.0%} params" for s in args.params]]
    table += [[r['made'], r['val_mAP50'], f"{r['gamma_small_share']:.1%}", r['gamma_median']]
              + [p['val_mAP50'] for p in r['prunes']] for r in rows]
    best = max(rows, key=lambda r: sum(p['val_mAP50'] for p in r['prunes']))
    print_table(table, title='BCCD val: sparse models and their prunes before fine-tuning')
    print(f"best (mean val mAP@0.5 of the prunes): {best['made']}")
    options = vars(args)                          # with reuse: whether finished trainings were taken from work_dir
    write_result('schedule', {'options': options, 'split': 'val (train: training and calibration)',
                              'best': best['name'], 'total_seconds': round(time.perf_counter() - t0, 1),
                              'rows': rows}, load, folder=args.results_dir)
    return 0


if __name__ == '__main__':
    sys.exit(cli_main(main, get_args_parser().parse_args()))
