"""The whole network-slimming pipeline on the embedded shapes data (what `make demo` runs).

    python demo.py [--out runs/demo] [--epochs 24] [--ft-epochs 4] [--img-size 192]

1. generate the shapes dataset (data/make_shapes.py) into OUT/shapes
2. sparse-train cfg/yolov3-demo.cfg (-sr --prune 1) and cfg/yolov3-tiny-demo.cfg (-sr --prune 2)
3. prune: normal, regular (power of two), regular --round-to 8, shortcut on the YOLOv3-style model;
   tiny on the tiny-style model
4. fine-tune each pruned model briefly
5. print and save OUT/report.md and OUT/report.json; channel charts and gamma histograms lie beside them

Every step runs the real command line (train.py, *_prune.py) as a user would, so its progress shows.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

from utils.errors import DarkslimError, cli_main

REPO = os.path.dirname(os.path.abspath(__file__))

# (report key, script, extra args, source model)
STRATEGIES = [
    ('normal', 'normal_prune.py', [], 'sparse'),
    ('regular', 'regular_prune.py', [], 'sparse'),
    ('regular8', 'regular_prune.py', ['--round-to', '8'], 'sparse'),
    ('shortcut', 'shortcut_prune.py', [], 'sparse'),
    ('tiny', 'tiny_prune.py', [], 'tiny_sparse'),
]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='runs/demo', help='output folder (relative to the repository root)')
    p.add_argument('--cfg', default='cfg/yolov3-demo.cfg', help='YOLOv3-style model with shortcuts')
    p.add_argument('--tiny-cfg', default='cfg/yolov3-tiny-demo.cfg', help='tiny-style model')
    p.add_argument('--n-train', type=int, default=800)
    p.add_argument('--n-val', type=int, default=200)
    p.add_argument('--img-size', type=int, default=192)
    p.add_argument('--epochs', type=int, default=24, help='sparse-training epochs (YOLOv3-style model)')
    p.add_argument('--tiny-epochs', type=int, default=24, help='sparse-training epochs (tiny-style model)')
    p.add_argument('--ft-epochs', type=int, default=4, help='fine-tuning epochs per pruned model')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--lr0', type=float, default=0.01)
    p.add_argument('--s', type=float, default=0.001, help='L1 sparsity rate on BN gamma')
    p.add_argument('--percent', type=float, default=0.5, help='share of channels pruned (shortcut/normal/regular)')
    p.add_argument('--tiny-percent', type=float, default=0.5, help='share of channels pruned (tiny)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--latency-runs', type=int, default=20, help='timed batch-1 passes (1 thread, fused)')
    return p


def run(cmd, log):
    """Run a command from the repository root, streaming its output; DarkslimError when it fails."""
    cmd = [sys.executable] + [str(c) for c in cmd]
    print(f"\n$ {' '.join(os.path.relpath(c, REPO) if os.path.isabs(c) else c for c in cmd[1:])}", flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO)
    log.append({'cmd': cmd[1:], 'seconds': round(time.perf_counter() - t, 1)})
    if r.returncode:
        raise DarkslimError(f"step failed (exit {r.returncode}): {' '.join(cmd[1:])}")


def rel(path):
    return os.path.relpath(path, REPO)


def last_map50(out_dir):
    """mAP@0.5 of the best epoch in train.py's results.csv."""
    with open(os.path.join(out_dir, 'results.csv')) as f:
        rows = list(csv.DictReader(f))
    return max(float(r['mAP50']) for r in rows)


def describe(cfg, weights, data, img_size, latency_runs):
    """params, BFLOPs, mAP@0.5 (test.test) and fused CPU latency of a cfg + weights."""
    import torch

    import test as evaluation
    from models import load_model, model_info
    from prune_utils import cpu_latency
    model = load_model(cfg, weights)
    params, bflops = model_info(model.defs, img_size, img_size)
    r = evaluation.test(model, data, img_size=img_size, batch_size=16, verbose=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: stable medians on a shared 2-core machine
    try:
        lat = cpu_latency(model, (img_size, img_size), latency_runs)
    finally:
        torch.set_num_threads(threads)
    return {'cfg': rel(cfg), 'weights': rel(weights), 'params': params, 'bflops': round(bflops, 4),
            'map50': round(r['mAP50'], 4), 'map50_95': round(r['mAP50_95'], 4),
            'latency_ms': round(lat * 1e3, 2) if lat else None}


def train_cmd(args, cfg, data, out_dir, epochs, extra):
    return (['train.py', '--cfg', cfg, '--data', data, '--epochs', epochs, '--img-size', args.img_size,
             '--batch-size', args.batch_size, '--lr0', args.lr0, '--seed', args.seed, '--workers', args.workers,
             '--out-dir', out_dir, '--cache'] + extra)


def report_tables(report):
    """Markdown table: model | params | BFLOPs | mAP@0.5 sparse -> pruned -> fine-tuned | latency | speedup."""
    lines = ['| model | params | BFLOPs | mAP@0.5 sparse → pruned → fine-tuned | CPU latency (ms) | speedup |',
             '|---|---|---|---|---|---|']
    for key in ('sparse', 'tiny_sparse'):
        m = report[key]
        lines.append(f"| {key} ({os.path.basename(m['cfg'])}) | {m['params']:,} | {m['bflops']:.3f} | "
                     f"{m['map50']:.3f} | {m['latency_ms']} | 1.00x |")
    for name, m in report['pruned'].items():
        base = report['tiny_sparse' if name == 'tiny' else 'sparse']
        speed = f"{base['latency_ms'] / m['latency_ms']:.2f}x" if m['latency_ms'] else 'n/a'
        lines.append(f"| {name} | {m['params']:,} ({m['params'] / base['params']:.0%}) | {m['bflops']:.3f} | "
                     f"{base['map50']:.3f} → {m['map50_pruned']:.3f} → {m['map50_finetuned']:.3f} | "
                     f"{m['latency_ms']} | {speed} |")
    return '\n'.join(lines)


def demo(args):
    t0 = time.perf_counter()
    out = os.path.join(REPO, args.out)
    os.makedirs(out, exist_ok=True)
    log = []
    from data.make_shapes import make_shapes
    shapes = os.path.join(out, 'shapes')
    data = os.path.join(shapes, 'shapes.data')
    if not os.path.isfile(data):
        print(f"generating the shapes dataset into {rel(shapes)}", flush=True)
        make_shapes(shapes, args.n_train, args.n_val, args.img_size, args.seed)

    report = {'data': rel(data), 'pruned': {}}
    sparse_dirs = {'sparse': (args.cfg, os.path.join(out, 'sparse'), args.epochs, '1'),
                   'tiny_sparse': (args.tiny_cfg, os.path.join(out, 'tiny-sparse'), args.tiny_epochs, '2')}
    for key, (cfg, out_dir, epochs, mode) in sparse_dirs.items():
        run(train_cmd(args, cfg, data, out_dir, epochs, ['-sr', '--s', args.s, '--prune', mode]), log)
        report[key] = describe(os.path.join(REPO, cfg), os.path.join(out_dir, 'best.pt'), data, args.img_size,
                               args.latency_runs)

    for name, script, extra, src in STRATEGIES:
        cfg, out_dir, _, _ = sparse_dirs[src]
        prefix = os.path.join(out, 'pruned', name)
        percent = args.tiny_percent if name == 'tiny' else args.percent
        run([script, '--cfg', cfg, '--weights', os.path.join(out_dir, 'best.pt'), '--data', data,
             '--percent', percent, '--img-size', args.img_size, '--latency-runs', 0, '--out', prefix] + extra, log)
        pruned = describe(prefix + '.cfg', prefix + '.weights', data, args.img_size, args.latency_runs)
        ft_dir = os.path.join(out, 'finetune', name)
        run(train_cmd(args, prefix + '.cfg', data, ft_dir, args.ft_epochs, ['--weights', prefix + '.weights']), log)
        tuned = describe(prefix + '.cfg', os.path.join(ft_dir, 'best.weights'), data, args.img_size,
                         args.latency_runs)
        report['pruned'][name] = {'cfg': rel(prefix + '.cfg'), 'weights': rel(os.path.join(ft_dir, 'best.weights')),
                                  'pruned_weights': rel(prefix + '.weights'), 'params': pruned['params'],
                                  'bflops': pruned['bflops'], 'map50_pruned': pruned['map50'],
                                  'map50_finetuned': tuned['map50'], 'latency_ms': tuned['latency_ms'],
                                  'channels_png': rel(prefix + '-channels.png')}

    report['seconds'] = round(time.perf_counter() - t0, 1)
    report['steps'] = log
    table = report_tables(report)
    from utils.io import write_text_atomic
    hist = sorted(f for d in ('sparse', 'tiny-sparse') if os.path.isdir(os.path.join(out, d))
                  for f in [os.path.join(args.out, d, x) for x in os.listdir(os.path.join(out, d))]
                  if f.endswith('.png'))
    md = (f"# darkslim demo report\n\nData: `{report['data']}` (val split), input {args.img_size}x{args.img_size}, "
          f"CPU latency at batch 1 (fused, 1 thread, median of {args.latency_runs}). Total time {report['seconds']:.0f} s.\n\n"
          f"{table}\n\nChannel charts: `{args.out}/pruned/*-channels.png`. "
          f"Gamma histograms: {', '.join(f'`{h}`' for h in hist[-2:]) or 'none'}.\n")
    write_text_atomic(os.path.join(out, 'report.md'), md)
    write_text_atomic(os.path.join(out, 'report.json'), json.dumps(report, indent=1) + '\n')
    print('\n' + table)
    print(f"\nwrote {rel(os.path.join(out, 'report.md'))} and report.json in {report['seconds']:.0f} s")
    return report


def main(args):
    demo(args)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
