"""Layer pruning: remove the N residual blocks ([shortcut] + its branch of convs) whose last BN has the lowest
mean |gamma|; with --percent or --threshold, then channel-prune the rest as shortcut_prune.py does.

    python layer_prune.py --cfg C --weights W --shortcuts N [--data D] [--percent P | --threshold T]
                          [--min-keep K] [--round-to R] [--img-size S] [--device cpu] [--out PREFIX]

Sparse-train first with `train.py -sr --prune 1` (the shortcut layer set): it regularizes the gamma of every
branch's last conv, which is what ranks the blocks here (the candidate table says so per block: column
'-sr --prune 1'). Every candidate's score is printed, lowest first, and every [shortcut] that is no candidate
with the reason. A removed block's constant act(beta) is folded into the convs that consume it (exact for 1x1
consumers, up to image-border effects for k x k ones). Layer numbers in the channel plan are those of the
block-pruned network (PREFIX.json 'plan' -> 'layer_map' maps the original's to them).

Writes PREFIX.cfg, PREFIX.weights, PREFIX.pt, PREFIX.json and PREFIX-channels.png; see prune_layers.py.
"""
import argparse
import os
import time

import models
import prune_cli
import prune_layers
import prune_utils
from utils.errors import DarkslimError, cli_main

STRATEGY = prune_layers.STRATEGY


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cfg', help='model cfg (optional for a .pt that stores its cfg)')
    p.add_argument('--weights', help=f'sparse-trained (-sr --prune 1) .weights or .pt '
                                     f'(default: {prune_cli.DEFAULT_WEIGHTS})')
    p.add_argument('--data', help='.data file: evaluate mAP of the original, loose and compact models')
    p.add_argument('--shortcuts', type=int, required=True, metavar='N',
                   help='remove the N candidate residual blocks with the lowest score (0: none)')
    how = p.add_mutually_exclusive_group()
    how.add_argument('--percent', type=float, help='then also remove this share of the prunable channels of the '
                                                   'remaining network (shortcut mode; default: no channel prune)')
    how.add_argument('--threshold', type=float, help='then also remove channels with |gamma| below this')
    p.add_argument('--min-keep', type=int, metavar='K',
                   help='channel prune: a layer the cut would empty keeps its K highest-|gamma| channels')
    p.add_argument('--round-to', type=int, metavar='R', help='channel prune: round kept counts up to a multiple of R')
    p.add_argument('--img-size', type=int, help="input size for BFLOPs, latency and mAP (default: the cfg's)")
    p.add_argument('--batch-size', type=int, default=16, help='batch size for mAP evaluation')
    p.add_argument('--device', default='cpu', help='cpu | cuda | cuda:N (mAP evaluation)')
    p.add_argument('--latency-runs', type=int, default=5, help='timed CPU forward passes per model (0 = skip)')
    p.add_argument('--out', help='output prefix (default weights/<cfg stem>-layer-s<N>[-<percent> | -t<threshold>]'
                                 '[-r<R>])')
    return p


def default_prefix(args):
    stem = os.path.splitext(os.path.basename(args.cfg or args.weights or prune_cli.DEFAULT_WEIGHTS))[0]
    name = f"{stem}-{STRATEGY}-s{args.shortcuts}"
    if args.percent is not None:
        name += f"-{args.percent:g}"
    elif args.threshold is not None:
        name += f"-t{args.threshold:g}"
    if args.round_to is not None:
        name += f"-r{args.round_to}"
    return os.path.join('weights', name)


def resolve_inputs(args):
    """prune_cli.resolve_inputs (weights default, inputs exist, device, outputs never overwrite inputs) with the
    layer prune's prefix; without --percent/--threshold there is no channel prune."""
    return prune_cli.resolve_inputs(args, STRATEGY, prefix=default_prefix(args))


def as_flags(error, source):
    """A library error reworded with the CLI flags and prefixed with the model file it is about."""
    text = str(prune_cli.as_flags(error)).replace('n_blocks', '--shortcuts')
    return DarkslimError(f"{source}: {text}")


def main(args):
    """Load, plan (every refusal before anything is printed), print the candidate blocks and plans, report
    (params, BFLOPs, size, latency, mAP with --data), write PREFIX.{cfg,weights,pt,json} and -channels.png."""
    t0 = time.perf_counter()
    inputs = resolve_inputs(args)
    model = models.load_model(inputs.cfg, inputs.weights, img_size=args.img_size)
    try:
        result = prune_layers.prune(model, args.shortcuts, args.percent, args.threshold, args.min_keep,
                                    args.round_to)
    except DarkslimError as e:
        raise as_flags(e, inputs.cfg or inputs.weights) from None
    sparsity = prune_cli.sparsity_check(inputs.weights, prune_layers.SPARSE_MODE)
    print(result.plan.table())
    if result.plan.channel_plan is not None:
        print('channel prune of the block-pruned network (its layer numbers):')
        print(result.layer_set.describe())
        print(result.plan.channel_plan.table())
    report = prune_cli.evaluate_and_report(args, STRATEGY, result.nets, inputs, time.perf_counter() - t0)
    report['sparsity_training'] = sparsity
    paths = prune_utils.write_outputs(inputs.prefix, result.compact, result.plan, report)
    print('wrote ' + ', '.join(paths.values()))
    return paths


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
