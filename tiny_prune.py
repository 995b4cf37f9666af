"""Prune every prunable conv of a cfg without shortcuts (the yolov3-tiny family; --prune 2).

    python tiny_prune.py --cfg C --weights W [--data D] (--percent P | --threshold T) [--min-keep K]
                   [--img-size S] [--device cpu] [--out PREFIX]

With no arguments it prunes weights/last.pt (train.py's default output) with the cfg stored in it.
Writes PREFIX.cfg, PREFIX.weights, PREFIX.pt, PREFIX.json and PREFIX-channels.png; see prune_cli.py and prune_utils.py.
"""
import argparse

import prune_cli
from utils.errors import cli_main

STRATEGY = 'tiny'


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return prune_cli.add_prune_args(p, STRATEGY)


def main(args):
    return prune_cli.run(args, STRATEGY)


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
