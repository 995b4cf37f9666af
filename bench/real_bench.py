"""Slimming a real detector on real images: the official COCO yolov3-tiny on coco128, end to end.

    python -m bench.real_bench [--part A|A-latency|B|all] [--epochs E] [--ft-epochs F] [--calib 128] [--threads 2]

Needs ../shared/models/yolov3-tiny-coco (the official cfg + weights) and ../shared/datasets/coco128; skips with
a message without them. Everything at 416; mAP on coco128 val (128 images), calibration, sparse training and
fine-tuning on coco128 train (128 images).

A. Prune without sparse training: tiny at --percent 0.05, 0.1, 0.2, 0.3 (on a cfg without shortcuts, normal
   has the same layer set and plan: checked, not recomputed): params, BFLOPs, mAP@0.5 and @0.5:0.95 with the
   beta fold and with each calibrated step (mean fold; mean fold + least-squares refit; + BN recalibration);
   CPU latency of each percent's shape (--part A-latency times them alone, alternately, on a quiet machine).
B. The full pipeline: (i) dense fine-tune baseline for E epochs, (ii) sparse training -sr --prune 2 for the same
   E epochs and lr at --s, (iii) tiny prune at 0.3 and 0.5 with and without calibration, (iv) F fine-tuning
   epochs of each; mAP, params, BFLOPs and CPU latency (batch 1, fused, 1 thread, all models timed
   alternately at the end) in one table; every written cfg + weights is loaded in OpenCV and compared with our
   forward on a real image. With --sr-local SHARE (and --sr-local-start) the sparse training of (ii) uses local
   s decay (train.py --sr-local); --b-key stores such a run beside B (B_local, B_local2 in real.json), with
   its gamma histogram as bench/results/real-<key>-gamma-hist.png.
Prints tables and writes bench/results/real.json (A and B as run; a part not run keeps its earlier result).
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

import calibrate
import prune_utils
from bench.common import REPO, RESULTS, load_average, print_table, write_result
from models import load_model, model_info
from training import TrainConfig, fit
from utils.darknet_weights import save_weights
from utils.errors import cli_main
from utils.evaluate import evaluate
from utils.latency import latencies
from utils.parse_config import write_cfg
from utils.sparsity import sparsity_stats

SHARED = os.path.join(os.path.dirname(REPO), 'shared')
MODEL_DIR = os.path.join(SHARED, 'models', 'yolov3-tiny-coco')
COCO128 = os.path.join(SHARED, 'datasets', 'coco128')
SIZE = 416
A_PERCENTS = (0.05, 0.1, 0.2, 0.3)
B_PERCENTS = (0.3, 0.5)
STEPS = {'beta': (), 'mean': ('mean',), 'mean+refit': ('mean', 'refit'), 'mean+refit+bn': ('mean', 'refit', 'bn')}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--part', default='all', choices=('A', 'A-latency', 'B', 'all'),
                   help='A-latency: only the CPU latency of part A\'s pruned shapes (the surgery variants of one '
                        'percent share their shapes), merged into an earlier part A result')
    p.add_argument('--calib', type=int, default=128, help='calibration images (coco128 train)')
    p.add_argument('--epochs', type=int, default=10, help='E: dense baseline and sparse-training epochs')
    p.add_argument('--ft-epochs', type=int, default=5, help='F: fine-tuning epochs of each pruned model')
    p.add_argument('--lr0', type=float, default=0.002, help='learning rate of every training run')
    p.add_argument('--s', type=float, default=0.1, help='sparsity rate of (ii)')
    p.add_argument('--sr-local', type=float,
                   help='part B: local s decay of (ii): only this share of the prunable channels (smallest |gamma|) '
                        'keeps the rate --s (train.py --sr-local)')
    p.add_argument('--sr-local-start', type=float, default=0.0,
                   help='part B: the local s decay starts at this fraction of the epochs (default 0: at once)')
    p.add_argument('--b-key', default='B',
                   help='part B: the key of real.json it is stored under (to keep a run of another recipe beside B)')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--latency-runs', type=int, default=15)
    p.add_argument('--work-dir', help='keep the trained models here (default: a temporary folder)')
    p.add_argument('--a-steps', default=','.join(STEPS), help='part A: which surgery variants to run')
    p.add_argument('--b-steps', default='mean,refit,bn', help='part B: the calibration steps of the calibrated rows')
    p.add_argument('--b-percents', type=float, nargs='+', default=list(B_PERCENTS), help='part B: prune percents')
    p.add_argument('--min-keep', type=int, default=8,
                   help='part B: channels kept in a layer the cut would empty (sparse training can silence a layer)')
    p.add_argument('--reuse', action='store_true',
                   help='with --work-dir: reuse trainings whose last.pt is already there (continue a cut run)')
    return p


def write_data(folder):
    """A .data file for coco128 (train2017 = calibration/training, val2017 = evaluation)."""
    path = os.path.join(folder, 'coco128.data')
    with open(path, 'w') as f:
        f.write(f"classes=80\ntrain={COCO128}/images/train2017\nvalid={COCO128}/images/val2017\n"
                f"names={COCO128}/coco.names\n")
    return path


def maps(model, data):
    r = evaluate(model, data, img_size=SIZE, batch_size=16, verbose=False)
    return {'mAP50': round(r['mAP50'], 4), 'mAP50_95': round(r['mAP50_95'], 4)}


def surgery(model, plan, images, steps):
    """(compact model, seconds, calibration report) for one variant of the surgery."""
    t = time.perf_counter()
    if not steps:
        return prune_utils.compact_model(model, plan), time.perf_counter() - t, None
    compact, report = calibrate.calibrated_compact(model, plan, images, steps=steps)
    return compact, time.perf_counter() - t, report


def part_a(model, data, images, variants):
    """Rows {percent, variant, params, bflops, mAP50, mAP50_95, seconds} of the prune without sparse training.
    'mean+refit+bn' re-estimates the BN statistics of the 'mean+refit' model (the refit is not run twice)."""
    rows = []
    for percent in A_PERCENTS:
        ls = prune_utils.get_layer_set(model.module_defs, 'tiny')
        plan = prune_utils.make_plan(model, ls, 'tiny', percent=percent)
        normal = prune_utils.make_plan(model, prune_utils.get_layer_set(model.module_defs, 'normal'), 'normal',
                                       percent=percent)
        same = plan.keep.keys() == normal.keep.keys() and all(np.array_equal(plan.keep[i], normal.keep[i])
                                                               for i in plan.keep)
        refit = None
        for name in variants:
            if name == 'mean+refit+bn' and refit is not None:
                t = time.perf_counter()
                compact = refit
                calibrate.recalibrate_bn(compact, images)
                sec = time.perf_counter() - t
            else:
                compact, sec, _ = surgery(model, plan, images, STEPS[name])
            if name == 'mean+refit':
                refit = compact
            params, bflops = model_info(compact.defs, SIZE, SIZE)
            row = {'percent': percent, 'variant': name, 'params': params, 'bflops': round(bflops, 3),
                   'threshold': plan.threshold, 'seconds': round(sec, 1), 'normal_plan_identical': same,
                   **maps(compact, data)}
            print(f"A: percent {percent} {name}: mAP@0.5 {row['mAP50']:.4f}  ({sec:.0f} s)", flush=True)
            rows.append(row)
    return rows


def part_a_latency(model, args):
    """{percent: latency ms} of the original and of each part A percent's pruned shape (beta fold: calibration
    changes weights, not shapes), batch 1, fused, timed alternately."""
    ls = prune_utils.get_layer_set(model.module_defs, 'tiny')
    nets = [model] + [prune_utils.compact_model(model, prune_utils.make_plan(model, ls, 'tiny', percent=p))
                      for p in A_PERCENTS]
    lat, _ = latencies(nets, (SIZE, SIZE), args.latency_runs, warmup=2)
    return {'original': round(lat[0] * 1e3, 2),
            **{str(p): round(t * 1e3, 2) for p, t in zip(A_PERCENTS, lat[1:])}}


def train_run(work, name, cfg, data, weights, args, **extra):
    """One training run through the training library; returns (summary, out_dir)."""
    out = os.path.join(work, name)
    if args.reuse and os.path.isfile(os.path.join(out, 'last.pt')):     # a kept --work-dir run: not retrained
        print(f"reusing {out}/last.pt", flush=True)
        return {'wall_seconds': None, 'reused': True}, out
    config = TrainConfig(cfg=cfg, data=data, weights=weights, epochs=extra.pop('epochs', args.epochs),
                         batch_size=args.batch_size, img_size=SIZE, lr0=args.lr0, warmup_epochs=0.5, workers=0,
                         out_dir=out, eval_interval=extra.pop('eval_interval', 1000), cache=True, **extra)
    t = time.perf_counter()
    summary = fit(config)
    summary['wall_seconds'] = round(time.perf_counter() - t, 1)
    return summary, out


def opencv_max_diff(model, cfg, weights, x):
    """Largest difference of box centres (in input fractions) and objectness between our forward and OpenCV's
    Darknet importer, on input x [1, 3, H, W] (both read the same cfg + weights files)."""
    import cv2
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.setInput(x.numpy())
    names = net.getUnconnectedOutLayersNames()
    outs = [o for _, o in sorted(zip(names, net.forward(names)), key=lambda t: int(t[0].split('_')[-1]))]
    with torch.no_grad():
        inf, raw = model.eval()(x)
    h, w = x.shape[-2:]
    worst, start = 0.0, 0
    for r, o in zip(raw, outs):
        _, na, ny, nx, no = r.shape
        ours = inf[0, start:start + na * ny * nx].view(na, ny, nx, no)[..., [0, 1, 4]] / torch.tensor([w, h, 1])
        start += na * ny * nx
        theirs = torch.from_numpy(o).view(ny, nx, na, no).permute(2, 0, 1, 3)[..., [0, 1, 4]]
        worst = max(worst, float((ours - theirs).abs().max()))
    return worst


def real_image():
    """The first coco128 val image, letterboxed to SIZE (the tensor both runtimes get)."""
    from utils.datasets import LoadImagesAndLabels
    ds = LoadImagesAndLabels(os.path.join(COCO128, 'images', 'val2017'), SIZE, 1, augment=False, nc=80)
    return ds[0][0].unsqueeze(0)


def prune_and_tune(sparse, ls, data, images, args, work, percent, steps):
    """One B row: prune the sparse model at `percent` (`steps` of calibration), write it, fine-tune it."""
    name = f"tiny-{percent:g}-{'+'.join(steps) or 'beta'}"
    plan = prune_utils.make_plan(sparse, ls, 'tiny', percent=percent, min_keep=args.min_keep)
    compact, sec, _ = surgery(sparse, plan, images, steps)
    cfg, weights = os.path.join(work, name + '.cfg'), os.path.join(work, name + '.weights')
    write_cfg(cfg, compact.defs)
    save_weights(compact, weights)
    pruned_maps = maps(compact, data)
    summary, out = train_run(work, name + '-ft', cfg, data, weights, args, epochs=args.ft_epochs)
    tuned = load_model(cfg, os.path.join(out, 'last.weights'))
    params, bflops = model_info(tuned.defs, SIZE, SIZE)
    row = {'name': name, 'percent': percent, 'calibration': list(steps), 'topped_up': plan.topped_up,
           'params': params,
           'bflops': round(bflops, 3), 'pruned': pruned_maps, 'finetuned': maps(tuned, data),
           'surgery_seconds': round(sec, 1), 'finetune_seconds': summary['wall_seconds'],
           'opencv_max_diff': opencv_max_diff(tuned, cfg, os.path.join(out, 'last.weights'), real_image())}
    print(f"B: {name}: mAP@0.5 pruned {pruned_maps['mAP50']:.4f} -> fine-tuned {row['finetuned']['mAP50']:.4f}",
          flush=True)
    return row, tuned


def part_b(model, cfg, weights, data, images, args, work):
    """(i) dense baseline, (ii) sparse training, (iii)+(iv) prunes with and without calibration, fine-tuned."""
    from utils.sparsity import gamma_histogram_png
    dense_sum, dense_dir = train_run(work, 'dense', cfg, data, weights, args)
    sparse_sum, sparse_dir = train_run(work, 'sparse', cfg, data, weights, args, sr=True, s=args.s, prune=2,
                                       sr_local=args.sr_local, sr_local_start=args.sr_local_start)
    dense = load_model(None, os.path.join(dense_dir, 'last.pt'))
    sparse = load_model(None, os.path.join(sparse_dir, 'last.pt'))
    ls = prune_utils.get_layer_set(sparse.module_defs, 'tiny')
    name = 'real-sparse' if args.b_key == 'B' else f"real-{args.b_key}"       # B_local: real-B_local-gamma-hist
    hist = os.path.join(RESULTS, f"{name}-gamma-hist.png")
    gamma_histogram_png(sparse, ls, hist, title=f"yolov3-tiny COCO, -sr --s {args.s:g}, {args.epochs} epochs")
    out = {'epochs': args.epochs, 'ft_epochs': args.ft_epochs, 'lr0': args.lr0, 's': args.s,
           'sr_local': args.sr_local, 'sr_local_start': args.sr_local_start if args.sr_local else None,
           'min_keep': args.min_keep, 'batch_size': args.batch_size, 'original': maps(model, data),
           'dense': maps(dense, data),
           'sparse': maps(sparse, data), 'sparse_gamma': sparsity_stats(sparse, ls),
           'gamma_hist_png': os.path.relpath(hist, REPO),
           'seconds': {'dense': dense_sum['wall_seconds'], 'sparse': sparse_sum['wall_seconds']}, 'rows': []}
    nets = {'original': model, 'dense': dense, 'sparse': sparse}
    for percent in args.b_percents:
        for steps in ((), tuple(args.b_steps)):
            row, tuned = prune_and_tune(sparse, ls, data, images, args, work, percent, steps)
            out['rows'].append(row)
            nets[row['name']] = tuned
    lat, _ = latencies(list(nets.values()), (SIZE, SIZE), args.latency_runs, warmup=2)
    out['latency_ms'] = {k: round(t * 1e3, 2) for k, t in zip(nets, lat)}
    params0, bflops0 = model_info(model.defs, SIZE, SIZE)
    out['params_original'], out['bflops_original'] = params0, round(bflops0, 3)
    return out


def table_a(rows, lat=None):
    lat = lat or {}
    table = [['percent', 'surgery', 'params', 'BFLOPs', 'mAP@0.5', 'mAP@0.5:0.95', 'seconds', 'latency ms']]
    table += [[r['percent'], r['variant'], f"{r['params']:,}", r['bflops'], f"{r['mAP50']:.4f}",
               f"{r['mAP50_95']:.4f}", r['seconds'], lat.get(str(r['percent']), '')] for r in rows]
    print_table(table, ' A: prune without sparse training (yolov3-tiny COCO, tiny mode) ')


def table_b(b):
    lat = b['latency_ms']
    table = [['model', 'params', 'BFLOPs', 'mAP@0.5 pruned -> fine-tuned', 'latency ms', 'speedup vs dense']]
    for key in ('original', 'dense', 'sparse'):
        table.append([key, f"{b['params_original']:,}", b['bflops_original'], f"{b[key]['mAP50']:.4f}", lat[key],
                      '1.00x' if key == 'dense' else f"{lat['dense'] / lat[key]:.2f}x"])
    for r in b['rows']:
        table.append([r['name'], f"{r['params']:,} ({r['params'] / b['params_original']:.0%})", r['bflops'],
                      f"{r['pruned']['mAP50']:.4f} -> {r['finetuned']['mAP50']:.4f}", lat[r['name']],
                      f"{lat['dense'] / lat[r['name']]:.2f}x"])
    local = f", local s decay {b['sr_local']:g}" if b.get('sr_local') else ''
    print_table(table, f" B: E={b['epochs']}, F={b['ft_epochs']}, lr0 {b['lr0']}, s {b['s']}{local} ")


def main(args):
    if not (os.path.isdir(MODEL_DIR) and os.path.isdir(COCO128)):
        print(f"skipped: {MODEL_DIR} or {COCO128} absent (the real-model benchmark needs ../shared)")
        return 0
    torch.set_num_threads(args.threads)
    args.b_steps = tuple(args.b_steps.split(','))
    load = load_average()
    cfg, weights = os.path.join(MODEL_DIR, 'yolov3-tiny.cfg'), os.path.join(MODEL_DIR, 'yolov3-tiny.weights')
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        os.makedirs(work, exist_ok=True)
        data = write_data(work)
        model = load_model(cfg, weights)
        # the latency-only part needs no calibration images
        images = [] if args.part == 'A-latency' else calibrate.calibration_images(data, args.calib, SIZE)
        result = {'calib_images': len(images), 'img_size': SIZE, 'threads': args.threads}
        t = time.perf_counter()
        if args.part == 'A-latency':
            result['A_latency_ms'] = part_a_latency(model, args)
        if args.part in ('A', 'all'):
            result['A'] = {'original': maps(model, data), 'rows': part_a(model, data, images,
                                                                         args.a_steps.split(','))}
            result['A']['seconds'] = round(time.perf_counter() - t, 1)
        if args.part in ('B', 'all'):
            t = time.perf_counter()
            result[args.b_key] = part_b(model, cfg, weights, data, images, args, work)
            result[args.b_key]['seconds_total'] = round(time.perf_counter() - t, 1)
    previous = {}
    if os.path.isfile(os.path.join(RESULTS, 'real.json')):      # read at the end: parts may run side by side
        with open(os.path.join(RESULTS, 'real.json')) as f:
            previous = json.load(f)
    b_keys = sorted({'B', args.b_key} | {k for k in previous if k.startswith('B') and not k.endswith('_from')})
    for part in ['A', 'A_latency_ms'] + b_keys:
        if part not in result and previous.get(part):
            result[part] = previous[part]
            result[f"{part}_from"] = {k: previous.get(k) for k in ('date', 'git_commit', 'calib_images', 'threads')}
    if result.get('A'):
        table_a(result['A']['rows'], result.get('A_latency_ms'))
    for key in b_keys:
        if result.get(key):
            table_b(result[key])
    write_result('real', result, load)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
