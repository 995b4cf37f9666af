"""Layer pruning of a normally trained model: residual blocks chosen by their measured damage (`fold`) or by the
mean |gamma| of their last BN (`gamma`, tanluren's criterion), and blocks vs channels at equal BFLOPs.

    python -m bench.layer_bench [--epochs 20] [--calib 64] [--distill 200] [--work-dir DIR [--reuse]]

Everything runs on the embedded shapes data (data/make_shapes.py) and cfg/yolov3-demo.cfg at --img-size 192, on
the CPU; nothing here needs ../shared.

1. data: the shapes dataset (--n-train, --n-val, --seed)
2. dense: the demo YOLOv3 trained --epochs from scratch without sparsity (train.py --ema)
3. for N = 1 .. candidate blocks - 1 (N = 1 when there is one): layer_prune.py --shortcuts N with --importance
   gamma and with fold, calibrated on --calib train images (mean fold of each removed block, BN re-estimated),
   then distilled from the dense model for --distill label-free iterations on the same images; and the dense
   model channel-pruned (shortcut_prune.py, importance act, --min-keep, the same calibration and distillation)
   to at most the BFLOPs of the fold prune
4. mAP@0.5 of every stage on val. No option is chosen on val: the defaults are fixed in advance.
Writes bench/results/layer.json.
"""
import argparse
import json
import os
import tempfile
import time

import torch

import calibrate
import prune_layers
import pruning
from bench.common import REPO, RESULTS, load_average, print_table, write_result
from data.make_shapes import make_shapes
from models import load_model, model_info
from training import TrainConfig, fit
from utils.errors import cli_main
from utils.evaluate import evaluate

CFG = os.path.join(REPO, 'cfg', 'yolov3-demo.cfg')


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cfg', default=CFG, help='a cfg with residual blocks')
    p.add_argument('--img-size', type=int, default=192)
    p.add_argument('--n-train', type=int, default=800)
    p.add_argument('--n-val', type=int, default=200)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--epochs', type=int, default=20, help='dense training epochs')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--calib', type=int, default=64, help='calibration (and distillation) images, train split')
    p.add_argument('--distill', type=int, default=200, help='label-free distillation iterations (0: none)')
    p.add_argument('--min-keep', type=int, default=2, help='channel rows: a layer the cut would empty keeps K')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--work-dir', help='keep the data and the dense model here (default: a temp folder)')
    p.add_argument('--reuse', action='store_true', help='with --work-dir: reuse a finished dense training')
    p.add_argument('--results-dir', default=RESULTS, help='where layer.json goes')
    return p


def dense_model(work, args):
    """The shapes data and the dense model trained on it -> (.data path, model, training seconds or None)."""
    data = os.path.join(work, 'shapes', 'shapes.data')
    if not (args.reuse and os.path.isfile(data)):
        data = make_shapes(os.path.join(work, 'shapes'), args.n_train, args.n_val, args.img_size, args.seed)
    last = os.path.join(work, 'dense', 'last.pt')
    seconds = None
    if not (args.reuse and os.path.isfile(last)):
        t = time.perf_counter()
        fit(TrainConfig(cfg=args.cfg, data=data, epochs=args.epochs, batch_size=args.batch_size,
                        img_size=args.img_size, lr0=0.01, ema=True, workers=0, cache=True, seed=args.seed,
                        out_dir=os.path.join(work, 'dense'), eval_interval=args.epochs))
        seconds = round(time.perf_counter() - t, 1)
    return data, load_model(None, last, img_size=args.img_size).eval(), seconds


def stage_maps(result, data, size):
    """{stage: mAP@0.5 on the .data's valid} of every stage the prune kept and of the final model."""
    nets = list(result.stages.items()) + [(result.final_stage, result.nets['compact'])]
    return {name: round(evaluate(net, data, img_size=size, batch_size=16, verbose=False)['mAP50'], 4)
            for name, net in nets}


def one(model, strategy, options, images, data, args):
    """One prune (calibrated, distilled) -> its row: what was removed, BFLOPs, params, mAP per stage, seconds."""
    t = time.perf_counter()
    result = pruning.prune(model, strategy, options, images)
    seconds = round(time.perf_counter() - t, 1)
    params, bflops = model_info(result.nets['compact'].defs, args.img_size, args.img_size)
    removed = [b.shortcut for b in getattr(result.plan, 'removed', [])]
    return {'strategy': strategy, 'importance': options.importance, 'n_blocks': options.n_blocks,
            'target_flops': options.target_flops, 'removed_shortcuts': removed, 'params': params,
            'bflops': round(bflops, 4), 'mAP50': stage_maps(result, data, args.img_size), 'seconds': seconds}


def rows_for(model, images, data, args):
    """For N = 1 .. candidates - 1 (not all of them: both criteria would remove the same; N = 1 when there is one
    candidate): the N-block prune by gamma and by fold, then channels (act, --min-keep) to at most the fold
    prune's BFLOPs."""
    candidates = prune_layers.find_blocks(model.module_defs, model.in_channels).candidates
    orig = model_info(model.defs, args.img_size, args.img_size)[1]
    common = dict(img_hw=(args.img_size, args.img_size), distill_iters=args.distill)
    rows = []
    for n in range(1, max(2, len(candidates))):
        for imp in ('gamma', 'fold'):
            rows.append(one(model, 'layer', pruning.PruneOptions(n_blocks=n, importance=imp, **common), images,
                            data, args))
            print(json.dumps(rows[-1]), flush=True)
        target = round(1 - rows[-1]['bflops'] / orig, 4)
        rows.append(one(model, 'shortcut', pruning.PruneOptions(target_flops=target, importance='act',
                                                                 min_keep=args.min_keep, **common), images, data, args))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(args):
    torch.set_num_threads(args.threads)
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        data, model, train_s = dense_model(work, args)
        base = evaluate(model, data, img_size=args.img_size, batch_size=16, verbose=False)['mAP50']
        params, bflops = model_info(model.defs, args.img_size, args.img_size)
        print(f"dense: mAP@0.5 {base:.4f} on val, {bflops:.3f} BFLOPs", flush=True)
        images = calibrate.calibration_images(data, args.calib, args.img_size, verbose=False)
        rows = rows_for(model, images, data, args)
    table = [['strategy', 'importance', 'blocks', 'removed', 'BFLOPs', 'params', 'mAP@0.5 per stage', 's']]
    table += [[r['strategy'], r['importance'], r['n_blocks'] or '', ','.join(map(str, r['removed_shortcuts'])),
               r['bflops'], r['params'], ' '.join(f"{k} {v:.3f}" for k, v in r['mAP50'].items()), r['seconds']]
              for r in rows]
    print_table(table, title=f" layer pruning, dense mAP@0.5 {base:.3f} ")
    write_result('layer', {'args': vars(args), 'split': 'calibrate/distill on shapes train, evaluate on val',
                           'dense': {'mAP50': round(base, 4), 'bflops': round(bflops, 4), 'params': params,
                                     'train_seconds': train_s}, 'rows': rows}, load, folder=args.results_dir)
    return rows


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
