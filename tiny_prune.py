"""Prune every prunable conv of a cfg without shortcuts (the yolov3-tiny family; --prune 2).

    python tiny_prune.py --cfg C --weights W [--data D] (--percent P | --threshold T) [--min-keep K]
                   [--img-size S] [--device cpu] [--out PREFIX]

With no arguments it prunes weights/last.pt (train.py's default output) with the cfg stored in it.
Writes PREFIX.cfg, PREFIX.weights, PREFIX.pt, PREFIX.json and PREFIX-channels.png; see prune_utils.py.
"""
import argparse
import time

import prune_utils
from models import load_model
from utils.errors import cli_main

STRATEGY = 'tiny'


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return prune_utils.add_prune_args(p, STRATEGY)


def main(args):
    t0 = time.perf_counter()
    cfg, weights, prefix = prune_utils.resolve_inputs(args, STRATEGY)
    model = load_model(cfg, weights, img_size=args.img_size)
    layer_set = prune_utils.get_layer_set(model.module_defs, STRATEGY)
    plan = prune_utils.make_plan(model, layer_set, STRATEGY, args.percent, args.threshold, args.min_keep,
                                 None)
    print(layer_set.describe())
    print(plan.table())
    loose = prune_utils.loose_model(model, plan)
    compact = prune_utils.compact_model(model, plan, loose)
    report = prune_utils.evaluate_and_report(args, STRATEGY, model, loose, compact, cfg, weights,
                                             time.perf_counter() - t0)
    paths = prune_utils.write_outputs(prefix, compact, plan, report)
    print('wrote ' + ', '.join(paths.values()))
    return paths


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
