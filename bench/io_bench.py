"""Darknet core I/O speed: parse + build + load of yolov3 (random 248 MB .weights), and save.

    python -m bench.io_bench [--cfg cfg/yolov3.cfg] [--repeat 3]
Prints a table and writes bench/results/io.json. Target: <= 3 s each on a 2-core CPU.
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from bench.common import load_average, print_table, write_result
from models import Darknet, load_model
from utils.darknet_weights import save_weights
from utils.errors import cli_main


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cfg', default='cfg/yolov3.cfg')
    p.add_argument('--repeat', type=int, default=3)
    return p


def bench_io(cfg, repeat=3):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'random.weights')
        model = Darknet(cfg)
        n = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
        with open(src, 'wb') as f:  # darknet header (0, 2, 0, seen int64), then random floats
            np.array([0, 2, 0], np.int32).tofile(f)
            np.array([0], np.int64).tofile(f)
            np.random.default_rng(0).standard_normal(n, dtype=np.float32).tofile(f)
        size_mb = os.path.getsize(src) / 1e6
        load_s, save_s = [], []
        for k in range(repeat):
            t = time.perf_counter()
            m = load_model(cfg, src)           # parse + build + load
            load_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            save_weights(m, os.path.join(tmp, f'out{k}.weights'))
            save_s.append(time.perf_counter() - t)
        same = open(src, 'rb').read() == open(os.path.join(tmp, 'out0.weights'), 'rb').read()
    return {'cfg': cfg, 'weights_mb': round(size_mb, 1), 'floats': n, 'repeat': repeat,
            'parse_build_load_s': round(statistics.median(load_s), 3), 'save_s': round(statistics.median(save_s), 3),
            'round_trip_byte_identical': same, 'target_s': 3.0}


def main(args):
    load = load_average()
    r = bench_io(args.cfg, args.repeat)
    print_table([['step', 'median s', 'target s'],
                 ['parse + build + load', r['parse_build_load_s'], r['target_s']],
                 ['save', r['save_s'], r['target_s']]],
                title=f"{r['cfg']} ({r['weights_mb']} MB .weights, {r['floats']} floats)")
    print(f"load -> save byte-identical: {r['round_trip_byte_identical']}")
    write_result('io', r, load)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
