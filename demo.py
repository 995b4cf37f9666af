"""The whole network-slimming pipeline on the embedded shapes data (what `make demo` runs).

    python demo.py [--out runs/demo] [--epochs 20] [--dense-epochs 0] [--ft-epochs 4] [--img-size 192] [--seed 0]

1. generate the shapes dataset (data/make_shapes.py) into OUT/shapes
2. sparse-train cfg/yolov3-demo.cfg (-sr --prune 1) and cfg/yolov3-tiny-demo.cfg (-sr --prune 2), --s 0.01,
   from scratch (or with --dense-epochs N from N epochs of plain training first), evaluating and saving the
   exponential moving average of the weights (train.py --ema; --no-ema to turn it off)
3. prune: normal (--percent 0.6), regular (power of two), regular --round-to 8, shortcut (0.5) and layer
   (remove a quarter of the residual blocks) on the YOLOv3-style model; tiny (0.5) on the tiny-style model;
   --min-keep 2 for a layer the cut would empty
4. fine-tune each pruned model briefly (--lr0 0.005)
5. measure mAP@0.5 and CPU latency once all training stopped; print and save OUT/report.md and OUT/report.json;
   channel charts (OUT/pruned/*-channels.png) and gamma histograms (OUT/sparse*/gamma_hist_epoch*.png) lie
   beside them

Every step runs the real command line (train.py, *_prune.py) as a user would. Steps whose inputs are ready run
--jobs at a time (default 2, one thread each: on a 2-core CPU two one-thread trainings get ~1.25x the work done
of one two-thread training); each output line is prefixed with its step's name and the whole output is kept in
OUT/logs/STEP.log.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
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
    p.add_argument('--dense-epochs', type=int, default=0,
                   help='plain training epochs before sparse training (default 0: sparse-train from scratch)')
    p.add_argument('--epochs', type=int, default=20, help='sparse-training epochs (YOLOv3-style model)')
    p.add_argument('--tiny-epochs', type=int, default=20, help='sparse-training epochs (tiny-style model)')
    p.add_argument('--no-ema', action='store_true',
                   help='sparse training without --ema (the moving average of the weights, evaluated and saved: '
                        'in 20 epochs from scratch it is the steadier model)')
    p.add_argument('--eval-interval', type=int, default=4, help='sparse training: evaluate every N epochs')
    p.add_argument('--ft-epochs', type=int, default=4, help='fine-tuning epochs per pruned model')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--lr0', type=float, default=0.01, help='sparse training learning rate')
    p.add_argument('--ft-lr0', type=float, default=0.005, help='fine-tuning learning rate')
    p.add_argument('--s', type=float, default=0.01, help='L1 sparsity rate on BN gamma')
    p.add_argument('--percent', type=float, default=0.5, help='share of channels pruned (regular, shortcut)')
    p.add_argument('--normal-percent', type=float, default=0.6, help='share of channels pruned (normal)')
    p.add_argument('--tiny-percent', type=float, default=0.5, help='share of channels pruned (tiny)')
    p.add_argument('--min-keep', type=int, default=2,
                   help='a layer the cut would empty keeps its K highest-|gamma| channels')
    p.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1),
                   help='steps run at once (each with cpu_count / jobs threads)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--latency-runs', type=int, default=30, help='timed batch-1 passes per model (1 thread, fused)')
    return p


class Step:
    """One command line of the pipeline; it starts once every step named in `after` succeeded."""

    def __init__(self, name, cmd, after=()):
        self.name, self.cmd, self.after = name, [str(c) for c in cmd], tuple(after)


def _relay(stream, prefix, log_path, lock):
    """Copy a child's output to our stdout as '[name] line' and to its log file. tqdm redraws a bar with \r;
    of each line only the last redraw is kept, so two children's bars do not garble each other."""
    def emit(line):
        parts = line.decode(errors='replace').split('\r')
        text = next((t for t in reversed(parts) if t.strip()), '')
        log_file.write(text + '\n')
        with lock:
            print(prefix + text, flush=True)

    buf = b''
    with open(log_path, 'w') as log_file:
        for chunk in iter(lambda: stream.read1(65536), b''):
            *lines, buf = (buf + chunk).split(b'\n')
            for line in lines:
                emit(line)
        if buf:
            emit(buf)


def run_steps(steps, jobs, log_dir, log):
    """Run `steps` (in priority order) with up to `jobs` at once, each after the steps it needs; every child gets
    cpu_count // jobs threads. DarkslimError naming the step and its log when one fails (the others stop)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)}
    os.makedirs(log_dir, exist_ok=True)
    pending, running, done, lock = list(steps), {}, set(), threading.Lock()
    try:
        while pending or running:
            for step in list(pending):
                if len(running) < jobs and all(a in done for a in step.after):
                    pending.remove(step)
                    with lock:
                        print(f"\n[{step.name}] $ {' '.join(rel(c) if os.path.isabs(c) else c for c in step.cmd)}",
                              flush=True)
                    proc = subprocess.Popen([sys.executable] + step.cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT)
                    log_path = os.path.join(log_dir, step.name + '.log')
                    relay = threading.Thread(target=_relay, args=(proc.stdout, f"[{step.name}] ", log_path, lock),
                                             daemon=True)
                    relay.start()
                    running[step.name] = (step, proc, relay, time.perf_counter(), log_path)
            if not running and pending:
                raise DarkslimError(f"steps {[s.name for s in pending]} wait on steps that never run")
            time.sleep(0.2)
            for name, (step, proc, relay, t, log_path) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                relay.join()
                del running[name]
                log.append({'step': name, 'cmd': step.cmd, 'seconds': round(time.perf_counter() - t, 1)})
                if rc:
                    raise DarkslimError(f"step {name} failed (exit {rc}): {' '.join(step.cmd)}; its output is in "
                                        f"{rel(log_path)}")
                done.add(name)
    finally:
        for step, proc, relay, t, log_path in running.values():
            proc.terminate()
            proc.wait()


def rel(path):
    return os.path.relpath(path, REPO)


def describe(cfg, weights, data, img_size):
    """(model, {cfg, weights, params, BFLOPs, mAP@0.5 by test.test}) of a cfg + weights."""
    from utils.evaluate import evaluate
    from models import load_model, model_info
    model = load_model(cfg, weights)
    params, bflops = model_info(model.defs, img_size, img_size)
    r = evaluate(model, data, img_size=img_size, batch_size=16, verbose=False)
    print(f"  {rel(weights)}: {params:,} params, {bflops:.3f} BFLOPs, mAP@0.5 {r['mAP50']:.3f}", flush=True)
    return model, {'cfg': rel(cfg), 'weights': rel(weights), 'params': params, 'bflops': round(bflops, 4),
                   'map50': round(r['mAP50'], 4), 'map50_95': round(r['mAP50_95'], 4)}


def measure_latency(models, img_size, runs):
    """Median batch-1 CPU ms of each model (fused, one thread: stable on a 2-core machine), timed alternately so
    machine drift hits all alike; None each when runs < 1."""
    import torch

    from utils.latency import latencies
    if runs < 1:
        return [None] * len(models)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds, _ = latencies(models, (img_size, img_size), runs)
    finally:
        torch.set_num_threads(threads)
    return [round(t * 1e3, 2) for t in seconds]


def train_cmd(args, cfg, data, out_dir, epochs, lr0, extra):
    return (['train.py', '--cfg', cfg, '--data', data, '--epochs', epochs, '--img-size', args.img_size,
             '--batch-size', args.batch_size, '--lr0', lr0, '--seed', args.seed, '--workers', args.workers,
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


def layer_prune_blocks(cfg):
    """How many residual blocks the demo's layer prune removes: a quarter of the cfg's [shortcut] layers."""
    from utils.parse_config import parse_cfg
    return max(1, sum(d['type'] == 'shortcut' for d in parse_cfg(os.path.join(REPO, cfg))) // 4)


def training_steps(args, data, out):
    """Dense training (when --dense-epochs > 0), then sparse training from its last weights, for both models;
    returns (steps, {report key: (cfg, sparse out dir, sparse epochs)})."""
    plan = {'sparse': (args.cfg, 'sparse', args.epochs, '1'), 'tiny_sparse': (args.tiny_cfg, 'tiny-sparse',
                                                                             args.tiny_epochs, '2')}
    steps, dirs = [], {}
    for key, (cfg, name, epochs, mode) in plan.items():
        sparse_dir = os.path.join(out, name)
        dirs[key] = (cfg, sparse_dir, epochs)
        extra, after = ['-sr', '--s', args.s, '--prune', mode, '--eval-interval', args.eval_interval], []
        extra += [] if args.no_ema else ['--ema']
        if args.dense_epochs > 0:
            dense_dir = os.path.join(out, name.replace('sparse', 'dense'))
            steps.append(Step(f"{key}-dense", train_cmd(args, cfg, data, dense_dir, args.dense_epochs, args.lr0,
                                                        ['--notest'])))
            extra += ['--weights', os.path.join(dense_dir, 'last.pt')]
            after = [f"{key}-dense"]
        steps.append(Step(key, train_cmd(args, cfg, data, sparse_dir, epochs, args.lr0, extra), after=after))
    return steps, dirs


def prune_steps(args, data, out, sparse_dirs):
    """A prune step and a fine-tuning step per strategy; returns (steps, {name: (prefix, fine-tune dir)})."""
    steps, outputs = [], {}
    strategies = STRATEGIES + [('layer', 'layer_prune.py', ['--shortcuts', layer_prune_blocks(args.cfg)], 'sparse')]
    for name, script, extra, src in strategies:
        cfg, out_dir, _ = sparse_dirs[src]
        prefix = os.path.join(out, 'pruned', name)
        ft_dir = os.path.join(out, 'finetune', name)
        outputs[name] = (prefix, ft_dir)
        cmd = [script, '--cfg', cfg, '--weights', os.path.join(out_dir, 'best.pt'), '--data', data,
               '--img-size', args.img_size, '--latency-runs', 0, '--out', prefix] + extra
        if name != 'layer':
            percent = {'tiny': args.tiny_percent, 'normal': args.normal_percent}.get(name, args.percent)
            cmd += ['--percent', percent, '--min-keep', args.min_keep]
        steps.append(Step(f"prune-{name}", cmd, after=[src]))
        steps.append(Step(f"finetune-{name}", train_cmd(args, prefix + '.cfg', data, ft_dir, args.ft_epochs,
                                                        args.ft_lr0, ['--weights', prefix + '.weights']),
                          after=[f"prune-{name}"]))
    return steps, outputs


def measure_all(args, data, sparse_dirs, outputs):
    """mAP of the sparse and fine-tuned models, then their latency together (after all training stopped, so
    that no training competes with the timing)."""
    print("\nmeasuring mAP@0.5 and CPU latency of the sparse and fine-tuned models", flush=True)
    report = {'data': rel(data), 'pruned': {}}
    nets = {}
    for key, (cfg, out_dir, _) in sparse_dirs.items():
        nets[key], report[key] = describe(os.path.join(REPO, cfg), os.path.join(out_dir, 'best.pt'), data,
                                          args.img_size)
    for name, (prefix, ft_dir) in outputs.items():
        with open(prefix + '.json') as f:
            pr = json.load(f)
        nets[name], tuned = describe(prefix + '.cfg', os.path.join(ft_dir, 'best.weights'), data, args.img_size)
        report['pruned'][name] = {'cfg': rel(prefix + '.cfg'), 'weights': tuned['weights'],
                                  'pruned_weights': rel(prefix + '.weights'), 'params': tuned['params'],
                                  'bflops': tuned['bflops'], 'percent': pr['plan'].get('percent'),
                                  'map50_pruned': round(pr['map']['compact']['mAP50'], 4),
                                  'map50_finetuned': tuned['map50'], 'channels_png': rel(prefix + '-channels.png')}
        if name == 'layer':
            report['pruned'][name]['removed_blocks'] = [b['shortcut'] for b in pr['plan']['removed']]
    print(f"timing batch-1 CPU latency ({args.latency_runs} passes per model, one thread)", flush=True)
    for key, ms in zip(nets, measure_latency(list(nets.values()), args.img_size, args.latency_runs)):
        (report[key] if key in sparse_dirs else report['pruned'][key])['latency_ms'] = ms
    return report


def write_report(args, out, report, sparse_dirs):
    """OUT/report.md and OUT/report.json, with the last epoch's gamma histograms copied beside them."""
    from utils.io import write_bytes_atomic, write_text_atomic
    table = report_tables(report)
    for key, (_, out_dir, epochs) in sparse_dirs.items():
        with open(os.path.join(out_dir, f"gamma_hist_epoch{epochs - 1}.png"), 'rb') as f:
            report[key]['gamma_hist_png'] = rel(os.path.join(out, f"{key}-gamma-hist.png"))
            write_bytes_atomic(os.path.join(REPO, report[key]['gamma_hist_png']), f.read())
    charts = ', '.join(f"`{m['channels_png']}`" for m in report['pruned'].values())
    dense = f"dense training {args.dense_epochs} epochs, then " if args.dense_epochs > 0 else ''
    ema = '' if args.no_ema else ' (EMA weights)'
    md = (f"# darkslim demo report\n\nData: `{report['data']}` (val split), input {args.img_size}x{args.img_size}, "
          f"seed {args.seed}, {dense}sparse training {args.epochs} (tiny {args.tiny_epochs}) epochs at --s "
          f"{args.s:g}{ema}, fine-tuning {args.ft_epochs} epochs; CPU latency at batch 1 (fused, 1 thread, median of "
          f"{args.latency_runs}). Total time {report['seconds']:.0f} s.\n\n{table}\n\n"
          f"Gamma histograms after sparse training: `{report['sparse']['gamma_hist_png']}`, "
          f"`{report['tiny_sparse']['gamma_hist_png']}`. Per-layer channel charts: {charts}.\n")
    write_text_atomic(os.path.join(out, 'report.md'), md)
    write_text_atomic(os.path.join(out, 'report.json'), json.dumps(report, indent=1) + '\n')
    print('\n' + table)
    print(f"\nwrote {rel(os.path.join(out, 'report.md'))} and report.json in {report['seconds']:.0f} s")


def shapes_data(args, out):
    """OUT/shapes/shapes.data: the shapes dataset of --seed, generated unless it is there already."""
    from data.make_shapes import make_shapes
    shapes = os.path.join(out, 'shapes')
    data = os.path.join(shapes, 'shapes.data')
    if not os.path.isfile(data):
        print(f"generating the shapes dataset into {rel(shapes)}", flush=True)
        make_shapes(shapes, args.n_train, args.n_val, args.img_size, args.seed)
    return data


def demo(args):
    """The whole pipeline (see the module docstring); returns the report dict."""
    t0 = time.perf_counter()
    if args.jobs < 1:
        raise DarkslimError(f"--jobs {args.jobs}; expected >= 1")
    out = os.path.join(REPO, args.out)
    os.makedirs(out, exist_ok=True)
    data = shapes_data(args, out)
    steps, sparse_dirs = training_steps(args, data, out)
    more, outputs = prune_steps(args, data, out, sparse_dirs)
    steps += more
    print(f"running {len(steps)} steps, {args.jobs} at a time; each step's output is prefixed with its name and "
          f"kept in {rel(os.path.join(out, 'logs'))}/", flush=True)
    log = []
    run_steps(steps, args.jobs, os.path.join(out, 'logs'), log)
    report = measure_all(args, data, sparse_dirs, outputs)
    report['seconds'] = round(time.perf_counter() - t0, 1)
    report['steps'] = log
    write_report(args, out, report, sparse_dirs)
    return report


def main(args):
    demo(args)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
