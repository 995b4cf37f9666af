"""Pruning speed and payoff on yolov3 at 416 with a synthetic sparse-trained gamma distribution.

    python bench/prune_bench.py [--cfg cfg/yolov3.cfg] [--img-size 416] [--runs 15] [--threads 1]

(a) wall time of the whole prune from files (load .weights, layer set, plan, loose + compact surgery, write
    cfg/.weights/.pt/.json/.png), mAP evaluation and latency timing excluded; target <= 10 s on a 2-core CPU.
(b) per strategy (normal, shortcut, regular pow2 / --round-to 8 / --round-to 32): params and BFLOPs after, CPU
    latency speedup at batch 1 (fused, median of --runs, original and pruned timed alternately), and speedup
    efficiency = latency speedup / BFLOPs reduction; target >= 0.85 with --round-to 8.
    Also the `shortcut_prune.py` command line end to end (process start, imports, --latency-runs 0, no --data).
(c) GPU, when torch.cuda.is_available(): the same models at batch 1 and 64 on cuda:0, each fused forward captured
    as a CUDA graph and replayed (utils.latency.latencies); otherwise recorded as "not measured: no GPU lent".
--threads defaults to 1: on a shared 2-core box two spinning OpenMP threads make latencies swing by several x
with the other load; one thread gives stable medians (pass --threads 2 on an idle machine).
Prints a table and writes bench/results/prune.json.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import prune_utils  # noqa: E402
from bench.common import load_average, print_table, write_result  # noqa: E402
from models import Darknet, load_model, model_info  # noqa: E402
from utils.darknet_weights import save_weights  # noqa: E402
from utils.errors import cli_main  # noqa: E402
from utils.latency import latencies  # noqa: E402

# (name, strategy, round_to)
STRATEGIES = [('normal', 'normal', None), ('shortcut', 'shortcut', None), ('regular (pow2)', 'regular', 'pow2'),
              ('regular --round-to 8', 'regular', 8), ('regular --round-to 32', 'regular', 32)]
GPU_BATCHES = (1, 64)
GPU_MIN_RUNS = 20                 # GPU passes are short: more of them for a stable median
PRUNE_TARGET_S = 10.0
EFFICIENCY_TARGET = 0.85


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cfg', default='cfg/yolov3.cfg')
    p.add_argument('--img-size', type=int, default=416)
    p.add_argument('--percent', type=float, default=0.5)
    p.add_argument('--near-zero', type=float, default=0.7, help='share of BN channels with |gamma| near 0')
    p.add_argument('--runs', type=int, default=15, help='timed forward passes per model (median)')
    p.add_argument('--threads', type=int, default=1, help='torch intra-op threads (0 = torch default)')
    return p


def sparse_model(cfg, img_size, near_zero, seed=0):
    """yolov3 with sane random weights and a sparse-trained-like gamma: `near_zero` of the channels |N(0, 0.01)|,
    the rest U(0.5, 1.2); betas N(0, 0.1)."""
    model = Darknet(cfg, img_size=img_size).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                small = torch.rand(n, generator=g) < near_zero
                m.weight.copy_(torch.where(small, torch.randn(n, generator=g).abs() * 0.01,
                                           0.5 + 0.7 * torch.rand(n, generator=g)))
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def prune_from_files(cfg, weights, strategy, round_to, percent, out_prefix, img_size):
    """The prune scripts' steps without mAP or latency timing; returns (compact model, plan, seconds)."""
    t = time.perf_counter()
    model = load_model(cfg, weights, img_size=img_size)
    layer_set = prune_utils.get_layer_set(model.module_defs, strategy, model.in_channels)
    plan = prune_utils.make_plan(model, layer_set, strategy, percent=percent, min_keep=1, round_to=round_to)
    loose = prune_utils.loose_model(model, plan)
    compact = prune_utils.compact_model(model, plan, loose)
    hw = (img_size, img_size)
    report = {'strategy': strategy, 'before': prune_utils.measure(model, hw, 0),
              'after': prune_utils.measure(compact, hw, 0)}
    prune_utils.write_outputs(out_prefix, compact, plan, report)
    return compact, plan, time.perf_counter() - t


def cli_seconds(cfg, weights, percent, out_prefix, threads):
    """Wall seconds of `python shortcut_prune.py ...` (no latency timing, no mAP), as a user runs it."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, **({'OMP_NUM_THREADS': str(threads)} if threads else {})}
    t = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(repo, 'shortcut_prune.py'), '--cfg', cfg, '--weights', weights,
                    '--percent', str(percent), '--latency-runs', '0', '--out', out_prefix], check=True,
                   capture_output=True, cwd=repo, env=env)
    return time.perf_counter() - t


def gpu_latencies(nets, hw, runs):
    """{batch: {'median_ms': [per model], 'how': ...}} on cuda:0 (CUDA graphs), or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    out = {}
    for b in GPU_BATCHES:
        medians, how = latencies(nets, hw, runs, batch=b, device='cuda')
        out[b] = {'median_ms': [t * 1e3 for t in medians], 'how': how}
        torch.cuda.empty_cache()
    return out


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    s = args.img_size
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        model = sparse_model(args.cfg, s, args.near_zero)
        weights = save_weights(model, os.path.join(tmp, 'sparse.weights'))
        p0, b0 = model_info(model.defs, s, s)
        results, compacts = [], []
        for name, strategy, round_to in STRATEGIES:
            compact, plan, sec = prune_from_files(args.cfg, weights, strategy, round_to, args.percent,
                                                  os.path.join(tmp, strategy + str(round_to)), s)
            p1, b1 = model_info(compact.defs, s, s)
            compacts.append(compact)
            results.append({'name': name, 'strategy': strategy, 'round_to': round_to, 'prune_seconds': sec,
                            'removed_share': plan.removed_share, 'params_after': p1, 'bflops_after': b1})
        cli_s = cli_seconds(args.cfg, weights, args.percent, os.path.join(tmp, 'cli'), args.threads)
        lat, _ = latencies([model] + compacts, (s, s), args.runs)
        gpu_runs = max(args.runs, GPU_MIN_RUNS)
        gpu = gpu_latencies([model] + compacts, (s, s), gpu_runs)
    for r, t in zip(results, lat[1:]):
        speedup, reduction = lat[0] / t, b0 / r['bflops_after']
        r.update(latency_ms=t * 1e3, speedup=speedup, bflops_reduction=reduction, efficiency=speedup / reduction)
    rows = [['strategy', 'prune s', 'removed', 'params', 'BFLOPs', 'latency ms', 'speedup', 'BFLOPs red.',
             'efficiency']]
    rows.append(['original', '', '', f"{p0 / 1e6:.2f}M", f"{b0:.2f}", f"{lat[0] * 1e3:.0f}", '', '', ''])
    for r in results:
        rows.append([r['name'], f"{r['prune_seconds']:.2f}", f"{r['removed_share']:.1%}",
                     f"{r['params_after'] / 1e6:.2f}M", f"{r['bflops_after']:.2f}", f"{r['latency_ms']:.0f}",
                     f"{r['speedup']:.2f}x", f"{r['bflops_reduction']:.2f}x", f"{r['efficiency']:.2f}"])
    print_table(rows, title=f" {args.cfg} @ {s}, --percent {args.percent}, {torch.get_num_threads()} threads ")
    worst_prune = max(r['prune_seconds'] for r in results)
    eff8 = next(r['efficiency'] for r in results if r['round_to'] == 8)
    print(f"(a) whole prune (files in -> files out, no mAP/latency): max {worst_prune:.2f} s in process, "
          f"{cli_s:.2f} s as the shortcut_prune.py command; target <= {PRUNE_TARGET_S} s: "
          f"{'met' if max(worst_prune, cli_s) <= PRUNE_TARGET_S else 'NOT met'}")
    print(f"(b) speedup efficiency with --round-to 8: {eff8:.2f}, target >= {EFFICIENCY_TARGET}: "
          f"{'met' if eff8 >= EFFICIENCY_TARGET else 'NOT met'}")
    if gpu is None:
        print("(c) GPU: not measured: no GPU lent")
    else:
        rows = [['strategy'] + [f"batch {b} ms" for b in gpu] + [f"batch {b} speedup" for b in gpu]]
        for k, name in enumerate(['original'] + [r['name'] for r in results]):
            ms = [g['median_ms'][k] for g in gpu.values()]
            up = ['' if k == 0 else f"{g['median_ms'][0] / g['median_ms'][k]:.2f}x" for g in gpu.values()]
            rows.append([name] + [f"{t:.2f}" for t in ms] + up)
        how = gpu[GPU_BATCHES[0]]['how']
        print_table(rows, title=f" (c) {torch.cuda.get_device_name(0)}, {how}, median of {gpu_runs} ")
    write_result('prune', {
        'cfg': args.cfg, 'img_size': s, 'percent': args.percent, 'near_zero_share': args.near_zero,
        'latency_runs': args.runs, 'threads': torch.get_num_threads(),
        'original': {'params': p0, 'bflops': b0, 'latency_ms': lat[0] * 1e3},
        'strategies': results, 'cli_shortcut_prune_seconds': cli_s,
        'targets': {'prune_seconds_max': PRUNE_TARGET_S, 'efficiency_round_to_8_min': EFFICIENCY_TARGET},
        'met': {'prune_seconds': max(worst_prune, cli_s) <= PRUNE_TARGET_S,
                'efficiency_round_to_8': eff8 >= EFFICIENCY_TARGET},
        'gpu': 'not measured: no GPU lent' if gpu is None else {
            'device': torch.cuda.get_device_name(0), 'runs': gpu_runs,
            'models': ['original'] + [r['name'] for r in results],
            'batches': {str(b): g for b, g in gpu.items()}}}, load)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
