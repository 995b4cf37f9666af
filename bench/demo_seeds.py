"""Does the demo's sparse-training quality hold beyond one seed? `make demo`'s sparse training, seed by seed.

    python -m bench.demo_seeds [--seeds 1 2] [--no-ema] [--out runs/demo-seeds] [-- more demo.py options]

For each seed: the shapes dataset of that seed (as `demo.py --seed N` makes it) and the demo's two sparse-training
steps exactly as demo.py builds them (demo.training_steps with demo.py's default options), all steps --jobs at a
time. Then, of each run, the epoch the demo goes on with (best fitness: its best.pt, which the prunes read), its
mAP@0.5 and its |gamma| statistics. The prunes and fine-tuning of the demo are not run (seed 0's whole demo is
runs/demo/report.json). Targets: the sparse YOLOv3-style model >= 0.80 mAP@0.5, the tiny-style one >= 0.85.
Prints a table and writes bench/results/demo-seeds.json.
"""
import argparse
import csv
import os
import time

import demo
from bench.common import load_average, print_table, write_result
from utils.errors import cli_main

TARGETS = {'sparse': 0.80, 'tiny_sparse': 0.85}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', type=int, nargs='+', default=[1, 2])
    p.add_argument('--no-ema', action='store_true', help="demo.py --no-ema: sparse training without --ema")
    p.add_argument('--out', default='runs/demo-seeds', help='output folder (relative to the repository root)')
    p.add_argument('demo_args', nargs=argparse.REMAINDER,
                   help='after --: demo.py options to change (e.g. -- --epochs 24); default: none, as make demo')
    return p


def seed_steps(seed, args):
    """(demo args, the seed's training steps renamed 's<seed>-<step>', {report key: (cfg, out dir, epochs)})."""
    dargs = demo.get_args_parser().parse_args(['--out', os.path.join(args.out, f"seed{seed}"), '--seed', str(seed)]
                                              + (['--no-ema'] if args.no_ema else [])
                                              + [a for a in args.demo_args if a != '--'])
    out = os.path.join(demo.REPO, dargs.out)
    os.makedirs(out, exist_ok=True)
    steps, dirs = demo.training_steps(dargs, demo.shapes_data(dargs, out), out)
    renamed = [demo.Step(f"s{seed}-{s.name}", s.cmd, after=[f"s{seed}-{a}" for a in s.after]) for s in steps]
    return dargs, renamed, dirs


def best_row(results_csv):
    """The results.csv row of the best fitness (the epoch of best.pt) and the last row (its gamma statistics)."""
    with open(results_csv) as f:
        rows = [r for r in csv.DictReader(f)]
    scored = [r for r in rows if r['fitness'] not in ('', 'nan')]
    return max(scored, key=lambda r: float(r['fitness'])), rows[-1]


def main(args):
    load = load_average()
    plans, steps = [], []
    for seed in args.seeds:
        dargs, more, dirs = seed_steps(seed, args)
        plans.append((seed, dirs))
        steps += more
    t, log = time.perf_counter(), []
    demo.run_steps(steps, dargs.jobs, os.path.join(demo.REPO, args.out, 'logs'), log)
    rows = []
    for seed, dirs in plans:
        for key, (cfg, out_dir, epochs) in dirs.items():
            best, last = best_row(os.path.join(out_dir, 'results.csv'))
            rows.append({'seed': seed, 'model': key, 'cfg': cfg, 'epochs': epochs, 'best_epoch': int(best['epoch']),
                         'map50': round(float(best['mAP50']), 4), 'map50_95': round(float(best['mAP50_95']), 4),
                         'target': TARGETS[key], 'met': float(best['mAP50']) >= TARGETS[key],
                         'gamma_small_share': round(float(last['gamma_small_share']), 4)})
    table = [['seed', 'model', 'best epoch', 'mAP@0.5', 'target', 'met', '|gamma| < 0.01']]
    table += [[r['seed'], f"{r['model']} ({os.path.basename(r['cfg'])})", r['best_epoch'], f"{r['map50']:.4f}",
               r['target'], 'yes' if r['met'] else 'NO', f"{r['gamma_small_share']:.1%}"] for r in rows]
    print_table(table, ' demo sparse training by seed ')
    write_result('demo-seeds', {'ema': not args.no_ema, 'demo_args': args.demo_args, 'jobs': dargs.jobs,
                                'rows': rows, 'steps': log, 'seconds': round(time.perf_counter() - t, 1)}, load)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
