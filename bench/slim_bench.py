"""Post-training slimming of a real detector: channels chosen by an importance, pruned to a FLOPs target,
repaired by calibration (and distillation), without labels and without sparse training.

    python -m bench.slim_bench --part select [--targets 0.2 0.35 0.5] [--importances gamma l1 act fold]
    python -m bench.slim_bench --part report [--calib 128 64 32]

Needs ../shared/models/yolov3-tiny-coco and ../shared/datasets/coco128 (skips with a message otherwise); 416.

select: hyperparameters chosen on coco128 TRAIN only: a seeded 96 images calibrate, the other 32 (held apart)
        are evaluated with their labels. Rows: target x importance x normalization x calibration steps.
report: each configuration calibrated on coco128 train (--calib N images) and evaluated ONCE on coco128 val
        (128 distinct images): mAP@0.5 and @0.5:0.95 per stage, BFLOPs, params, seconds per stage.
Writes bench/results/slim.json (each part under its key; a part not run keeps its earlier result).
"""
import argparse
import dataclasses
import itertools
import json
import os
import tempfile
import time

import torch

import calibrate
import pruning
from bench.common import REPO, RESULTS, load_average, print_table, write_result
from importance import IMPORTANCES
from models import load_model, model_info
from utils.datasets import list_images
from utils.errors import DarkslimError, cli_main
from utils.evaluate import evaluate

SHARED = os.path.join(os.path.dirname(REPO), 'shared')
MODEL_DIR = os.path.join(SHARED, 'models', 'yolov3-tiny-coco')
COCO128 = os.path.join(SHARED, 'datasets', 'coco128')
SIZE = 416
HELD_OUT = 32      # select: coco128 train images held apart for evaluation; the rest calibrate
STAGES = {'beta': (), 'mean': ('mean',), 'mean+bn': ('mean', 'bn'), 'mean+refit+bn': ('mean', 'refit', 'bn')}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--part', default='select', choices=('select', 'report'))
    p.add_argument('--targets', type=float, nargs='+', default=[0.2, 0.35, 0.5])
    p.add_argument('--importances', nargs='+', default=['gamma', 'l1', 'act', 'fold'])
    p.add_argument('--normalize', nargs='+', default=['default'], help="'default' (the importance's), none, mean, max")
    p.add_argument('--stages', nargs='+', default=['mean+refit+bn'], choices=list(STAGES),
                   help='calibration steps (the default was chosen on the select split: slim.json select_refit)')
    p.add_argument('--calib', type=int, nargs='+', default=[128], help='report: calibration images (train)')
    p.add_argument('--distill', type=int, nargs='+', default=[0], help='distillation iterations after calibration')
    p.add_argument('--distill-loss', nargs='+', default=['head'], help='head, feature, head+feature')
    p.add_argument('--distill-lr', type=float, nargs='+', default=[1e-4])
    p.add_argument('--distill-bn', nargs='+', default=['frozen'], help='frozen, train')
    p.add_argument('--distill-batch', type=int, default=8)
    p.add_argument('--steps', type=int, nargs='+', default=[1], help='iterative steps (pruning.prune steps)')
    p.add_argument('--layer-keep', type=float, nargs='+', default=[0],
                   help='share of every prunable layer kept at least (0: no floor; tiny_prune --layer-keep)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--key', help='store under this key of slim.json (default: the part)')
    p.add_argument('--markdown', metavar='KEY', nargs='+',
                   help='print the rows stored under these keys of slim.json as a README table, and exit')
    return p


def write_data(folder, train, valid):
    """A .data file over two image lists (paths written to list files)."""
    os.makedirs(folder, exist_ok=True)
    for name, files in (('train', train), ('valid', valid)):
        with open(os.path.join(folder, f'{name}.txt'), 'w') as f:
            f.write('\n'.join(files) + '\n')
    path = os.path.join(folder, 'coco.data')
    with open(path, 'w') as f:
        f.write(f"classes=80\ntrain={folder}/train.txt\nvalid={folder}/valid.txt\nnames={MODEL_DIR}/coco.names\n")
    return path


def splits(folder):
    """{'select': .data (train: coco128 train less HELD_OUT seeded images, valid: those), 'report': .data
    (train, val)}."""
    train = list_images(os.path.join(COCO128, 'images', 'train2017'))
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=g).tolist()
    n_calib = len(train) - HELD_OUT
    calib, held = sorted(train[j] for j in order[:n_calib]), sorted(train[j] for j in order[n_calib:])
    val = list_images(os.path.join(COCO128, 'images', 'val2017'))
    return {'select': write_data(os.path.join(folder, 'select'), calib, held),
            'report': write_data(os.path.join(folder, 'report'), train, val)}


def one(model, data, cfg):
    """One configuration (a dict: target, importance, normalize, steps, calib, distill, loss, lr, bn, batch, k,
    layer_keep):
    plan, surgery, calibration, distillation through pruning.prune; mAP of the stages on the .data's valid."""
    t0 = time.perf_counter()
    images = calibrate.calibration_images(data, cfg['calib'], SIZE, verbose=False)
    files = calibrate.calibration_files(data, cfg['calib'])
    t_img = time.perf_counter() - t0
    opts = pruning.PruneOptions(target_flops=cfg['target'], min_keep=8, importance=cfg['importance'],
                                layer_keep=cfg.get('layer_keep'),
                                calib_steps=STAGES[cfg['stage']], img_hw=(SIZE, SIZE), steps=cfg['k'],
                                distill_iters=cfg['distill'], distill={'loss': cfg['loss'], 'lr': cfg['lr'],
                                                                        'bn': cfg['bn'], 'batch': cfg['batch']})
    if cfg['normalize'] != 'default':
        opts.importance = dataclasses.replace(IMPORTANCES[cfg['importance']], normalize=cfg['normalize'])
    t0 = time.perf_counter()
    result = pruning.prune(model, 'tiny', opts, images, files)
    total = time.perf_counter() - t0
    maps = {}
    for name, net in list(result.stages.items()) + [(result.final_stage, result.nets['compact'])]:
        if cfg['quick'] and name not in (result.final_stage, 'mean', 'bn'):
            continue                                    # select: only the stages compared (mean, bn, final)
        r = evaluate(net, data, img_size=SIZE, batch_size=8, verbose=False)
        maps[name] = {'mAP50': round(r['mAP50'], 4), 'mAP50_95': round(r['mAP50_95'], 4)}
    params, bflops = model_info(result.nets['compact'].defs, SIZE, SIZE)
    seconds = {'images': round(t_img, 1), 'prune_total': round(total, 1),
               **(result.calibration or {}).get('seconds', {})}
    final = maps[result.final_stage]
    return {**cfg, 'params': params, 'bflops': round(bflops, 3), 'mAP50': final['mAP50'],
            'mAP50_95': final['mAP50_95'], 'stages': maps, 'seconds': seconds}


def configs(args, n_select):
    """Every combination of the options' lists, as the dicts `one` runs (select: calibrated on n_select)."""
    n_calibs = [n_select] if args.part == 'select' else args.calib
    grid = itertools.product(n_calibs, args.targets, args.importances, args.normalize, args.stages, args.distill,
                             args.distill_loss, args.distill_lr, args.distill_bn, args.steps, args.layer_keep)
    for n, target, imp, norm, stage, iters, loss, lr, bn, k, floor in grid:
        yield {'target': target, 'importance': imp, 'normalize': norm, 'stage': stage, 'calib': n,
               'distill': iters, 'loss': loss, 'lr': lr, 'bn': bn, 'batch': args.distill_batch, 'k': k,
               'layer_keep': floor or None, 'quick': args.part == 'select'}


def markdown(keys):
    """The stored rows of `keys` as a markdown table: mAP@0.5 of every stage that was evaluated."""
    stored = json.load(open(os.path.join(RESULTS, 'slim.json')))
    lines = ['| BFLOPs removed (target) | importance | layer-keep | calib images | β fold | mean | +refit | +bn | '
             'distill (iters) | mAP@0.5:0.95 (final) | prune s |', '|---|---|---|---|---|---|---|---|---|---|---|']
    missing = [k for k in keys if not isinstance(stored.get(k), dict) or 'rows' not in stored[k]]
    if missing:
        raise DarkslimError(f"slim.json has no rows under {', '.join(missing)}; expected keys among "
                         f"{', '.join(k for k, v in stored.items() if isinstance(v, dict) and 'rows' in v)}")
    for key in keys:
        for r in stored[key]['rows']:
            st = r.get('stages', {})
            cell = lambda name: f"{st[name]['mAP50']:.3f}" if name in st else ''     # noqa: E731
            dist = f"{cell('distill')} ({r['distill']})" if r['distill'] else ''
            removed = 1 - r['bflops'] / stored[key]['original']['bflops']
            lines.append(f"| {removed:.1%} ({r['target']}) | {r['importance']} | {r.get('layer_keep') or ''} | "
                         f"{r['calib']} | {cell('beta_fold')} | {cell('mean')} | {cell('refit')} | {cell('bn')} | "
                         f"{dist} | {r['mAP50_95']:.3f} | {r['seconds'].get('prune_total', '')} |")
    print('\n'.join(lines))


def main(args):
    if args.markdown:
        return markdown(args.markdown)
    if any(args.layer_keep) and max(args.steps) > 1:
        raise DarkslimError("slim_bench: --layer-keep is for one-step prunes; run --steps K > 1 without it")
    if not (os.path.isdir(MODEL_DIR) and os.path.isdir(COCO128)):
        print(f"skipped: needs {MODEL_DIR} and {COCO128}")
        return None
    torch.set_num_threads(args.threads)
    load = load_average()
    model = load_model(os.path.join(MODEL_DIR, 'yolov3-tiny.cfg'), os.path.join(MODEL_DIR, 'yolov3-tiny.weights'),
                       img_size=SIZE).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = splits(tmp)[args.part]
        base = evaluate(model, data, img_size=SIZE, batch_size=8, verbose=False)
        print(f"original: mAP@0.5 {base['mAP50']:.4f} on {args.part} split ({base['images']} images)")
        n_select = len(list_images(os.path.join(COCO128, 'images', 'train2017'))) - HELD_OUT
        for cfg in configs(args, n_select):
            rows.append(one(model, data, cfg))
            print(json.dumps(rows[-1]), flush=True)
    cols = ['target', 'importance', 'normalize', 'stage', 'calib', 'distill', 'loss', 'lr', 'bn', 'k', 'layer_keep',
            'bflops', 'mAP50', 'mAP50_95']
    table = [cols] + [[r[c] for c in cols] for r in rows]
    print_table(table, title=f" slim {args.part} ")
    key = args.key or args.part
    path = os.path.join(RESULTS, 'slim.json')
    old = json.load(open(path)) if os.path.isfile(path) else {}
    parts = {k: v for k, v in old.items() if isinstance(v, dict) and 'rows' in v}
    split = (f"coco128 train: {HELD_OUT} held apart to evaluate, the rest calibrate" if args.part == 'select'
             else 'calibrate on coco128 train, evaluate on coco128 val')
    parts[key] = {'original': {'mAP50': round(base['mAP50'], 4), 'mAP50_95': round(base['mAP50_95'], 4),
                               'bflops': round(model_info(model.defs, SIZE, SIZE)[1], 3)},
                  'split': split, 'rows': parts.get(key, {}).get('rows', []) + rows}
    write_result('slim', {'threads': args.threads, 'img_size': SIZE, **parts}, load)
    return rows


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
