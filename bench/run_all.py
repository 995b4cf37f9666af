"""Run every benchmark of the project and rewrite bench/results/*.json (what `make bench` runs).

    python -m bench.run_all [--only io prune eval train real deploy demo-seeds bn-refresh slim layer custom schedule]

(slim runs its select part; `python -m bench.slim_bench --part report` is the val report.)

Each script prints its own table; this prints which ones ran and how long they took. The README's numbers
come from the JSON files these write (each with machine, date and git commit).
"""
import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = {'io': 'bench.io_bench', 'prune': 'bench.prune_bench', 'eval': 'bench.eval_bench',
           'train': 'bench.train_bench', 'real': 'bench.real_bench', 'deploy': 'bench.deploy_bench',
           'demo-seeds': 'bench.demo_seeds', 'bn-refresh': 'bench.bn_refresh_bench', 'slim': 'bench.slim_bench',
           'layer': 'bench.layer_bench', 'custom': 'bench.custom_bench', 'schedule': 'bench.schedule_bench'}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--only', nargs='+', choices=sorted(BENCHES), help='run only these')
    return p


def main(args):
    failed = []
    for name in args.only or BENCHES:
        print(f"\n=== {name}: {BENCHES[name]}", flush=True)
        t = time.perf_counter()
        rc = subprocess.run([sys.executable, '-m', BENCHES[name]], cwd=REPO).returncode
        print(f"=== {name}: exit {rc} in {time.perf_counter() - t:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))
