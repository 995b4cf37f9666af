"""BatchNorm statistics after sparsity training: val mAP of a checkpoint with the running statistics it trained
with, and after re-estimating them on N train images (what train.py -sr does at every epoch end, --bn-refresh N).

    python -m bench.bn_refresh_bench --data D.data --model NAME=CKPT.pt [--model ...] [--images 8 16 64 0]

Each model is evaluated on the .data file's valid split at --img-size: once as stored, then once per N (0: every
train image), each refresh starting again from the stored statistics. The images are train.py's: the first N of
a seeded shuffle of the train split, letterboxed without augmentation, in batches of --batch-size. A checkpoint
written by a train.py that already refreshed shows no difference; the point is a run saved without it (e.g.
--bn-refresh 0). Writes bench/results/bn-refresh.json.
"""
import argparse
import copy
import sys
import time

import torch

import calibrate
from bench.common import RESULTS, load_average, print_table, write_result
from models import load_model
from utils.datasets import list_images, parse_data_cfg
from utils.errors import cli_main
from utils.evaluate import evaluate


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', required=True, help='a .data file: train images for the refresh, valid for mAP')
    p.add_argument('--model', action='append', required=True, metavar='NAME=CKPT',
                   help='a train.py checkpoint (.pt with its cfg), named for the table; repeatable')
    p.add_argument('--images', type=int, nargs='+', default=[8, 16, 64, 0],
                   help='refresh image counts N (0: the whole train split)')
    p.add_argument('--img-size', type=int, default=416)
    p.add_argument('--batch-size', type=int, default=16, help='refresh batch (train.py uses its --batch-size)')
    p.add_argument('--seed', type=int, default=0, help="the refresh images' shuffle (train.py: its --seed)")
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--note', default='', help='stored with the results: where the checkpoints came from')
    p.add_argument('--results-dir', default=RESULTS, help='where bn-refresh.json goes')
    return p


def val_map(model, data, img_size):
    res = evaluate(model, data, img_size=img_size, batch_size=16, verbose=False)
    return round(res['mAP50'], 4), round(res['mAP50_95'], 4)


def refreshed(model, images, batch):
    """A copy of `model` with every BN's running statistics re-estimated on `images` -> (model, seconds)."""
    out = copy.deepcopy(model)
    t = time.perf_counter()
    calibrate.recalibrate_bn(out, images, batch=batch)
    return out, time.perf_counter() - t


def main(args):
    torch.set_num_threads(args.threads)
    load_start = load_average()
    total = len(list_images(parse_data_cfg(args.data)['train']))
    counts = [min(n or total, total) for n in args.images]
    images = {n: calibrate.calibration_images(args.data, n, args.img_size, seed=args.seed, verbose=False)
              for n in sorted(set(counts))}                  # decoded once, shared by every model
    rows, table = [], [['model', 'BN statistics', 'val mAP@0.5', 'mAP@.5:.95', 'refresh s']]
    for spec in args.model:
        name, _, ckpt = spec.partition('=')
        model = load_model(None, ckpt)
        m50, m5095 = val_map(model, args.data, args.img_size)
        rows.append({'model': name, 'checkpoint': ckpt, 'images': None, 'mAP50': m50, 'mAP50_95': m5095})
        table.append([name, 'as trained', m50, m5095, ''])
        for n in counts:
            net, seconds = refreshed(model, images[n], args.batch_size)
            m50, m5095 = val_map(net, args.data, args.img_size)
            rows.append({'model': name, 'checkpoint': ckpt, 'images': n, 'mAP50': m50, 'mAP50_95': m5095,
                         'refresh_seconds': round(seconds, 2)})
            table.append([name, f"re-estimated on {n} train images", m50, m5095, f"{seconds:.1f}"])
            print(f"{name}: {n} images -> val mAP@0.5 {m50}", flush=True)
    print_table(table, 'val split: BN running statistics as trained vs re-estimated')
    write_result('bn-refresh', {'data': args.data, 'img_size': args.img_size, 'batch_size': args.batch_size,
                                'seed': args.seed, 'split': 'valid', 'note': args.note, 'rows': rows}, load_start,
                 folder=args.results_dir)


if __name__ == '__main__':
    sys.exit(cli_main(main, get_args_parser().parse_args()))
