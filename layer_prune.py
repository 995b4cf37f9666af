"""Layer pruning: remove the N residual blocks ([shortcut] + its branch of convs) with the lowest score (by
default the mean |gamma| of their last BN); with --percent or --threshold, then channel-prune the rest as
shortcut_prune.py does.

    python layer_prune.py --cfg C --weights W --shortcuts N [--data D] [--percent P | --threshold T]
                          [--min-keep K] [--round-to R] [--calib N] [--img-size S] [--device cpu] [--out PREFIX]

Sparse-train first with `train.py -sr --prune 1` (the shortcut layer set): it regularizes the gamma of every
branch's last conv, which is what ranks the blocks here (the candidate table says so per block: column
'-sr --prune 1'). Every candidate's score is printed, lowest first, and every [shortcut] that is no candidate
with the reason. A removed block's constant act(beta) (with --calib: its measured mean output) is folded into
the convs that consume it (exact for 1x1 consumers, up to image-border effects for k x k ones). Layer numbers
in the channel plan are those of the block-pruned network (PREFIX.json 'plan' -> 'layer_map' maps the
original's to them).

Writes PREFIX.cfg, PREFIX.weights, PREFIX.pt, PREFIX.json and PREFIX-channels.png; see prune_cli.py and
prune_layers.py.
"""
import argparse

import prune_cli
from utils.errors import cli_main

STRATEGY = 'layer'


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return prune_cli.add_prune_args(p, STRATEGY)


def main(args):
    return prune_cli.run(args, STRATEGY)


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
