"""Pruning speed and payoff: yolov3 at 416 (channels and residual blocks) and yolov4-tiny at 416 (channels through
its [route] groups splits), with gamma distributions shaped like those after sparse training.

    python -m bench.prune_bench [--img-size 416] [--runs 15] [--threads 1] [--part yolov3|v4tiny|all]

Sparse-like gamma (`sparse_like_`): real sparse training does not thin every layer alike. Each BN layer draws
its own share of near-zero channels (around --near-zero, spread +-0.25) and its own scale for the live ones; the
members of a shortcut group share most of their dead channels (the residual stream's unused channels die in all
of them); and a residual block draws a block scale, about a third of blocks coming out nearly dead. One i.i.d.
row (every channel near zero with the same probability: the best case for rounding and speed, the worst for
shortcut pruning) is kept for comparison, labelled as such.

yolov3: (a) wall time of the whole prune from files (load .weights, plan, surgery, write; no mAP, no latency);
target <= 10 s, and the `shortcut_prune.py` command end to end. (b) per strategy: params, BFLOPs, CPU latency
(batch 1, fused, one warm-up pass per model first, every model timed alternately, median of --runs), speedup and
efficiency = speedup / BFLOPs reduction; target >= 0.85 with --round-to 8. (c) layer pruning: --shortcuts 8 and
16, alone and with --percent 0.5, beside channel-only rows at similar BFLOPs. (d) GPU when present: batch 1 and
64, CUDA graphs (utils.latency.latencies); otherwise recorded as not measured.
yolov4-tiny: normal and tiny at --percent 0.3 and 0.5, and the share of channels prunable, with and without the CSP
splits' inputs (pruned in equal slices).
The load average before and after is recorded; a run is called idle only when both stay under 0.5 per core.
Prints tables and writes bench/results/prune.json.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

import prune_layers
import prune_utils
from bench.common import REPO, load_average, print_table, write_result
from models import Darknet, load_model, model_info
from utils.darknet_weights import save_weights
from utils.errors import cli_main
from utils.latency import latencies

# (row name, strategy, round_to, percent); percent None = --percent
CHANNEL_ROWS = [('normal', 'normal', None, None), ('shortcut', 'shortcut', None, None),
                ('regular (pow2)', 'regular', 'pow2', None), ('regular --round-to 8', 'regular', 8, None),
                ('regular --round-to 32', 'regular', 32, None), ('shortcut 0.3', 'shortcut', None, 0.3),
                ('shortcut 0.2', 'shortcut', None, 0.2)]
LAYER_ROWS = [(8, None), (16, None), (8, 0.5), (16, 0.5)]   # (--shortcuts, --percent)
V4T_ROWS = [('normal', 0.3), ('normal', 0.5), ('tiny', 0.3), ('tiny', 0.5)]
GPU_BATCHES = (1, 64)
GPU_MIN_RUNS = 20
PRUNE_TARGET_S = 10.0
EFFICIENCY_TARGET = 0.85
IDLE_PER_CORE = 0.5


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cfg', default='cfg/yolov3.cfg')
    p.add_argument('--v4tiny-cfg', default='cfg/yolov4-tiny.cfg')
    p.add_argument('--img-size', type=int, default=416)
    p.add_argument('--percent', type=float, default=0.5)
    p.add_argument('--near-zero', type=float, default=0.6, help='mean share of BN channels with |gamma| near 0')
    p.add_argument('--runs', type=int, default=15, help='timed forward passes per model (median)')
    p.add_argument('--threads', type=int, default=1, help='torch intra-op threads (0 = torch default)')
    p.add_argument('--part', default='all', choices=('yolov3', 'v4tiny', 'all'))
    return p


def _init_weights_(model, g):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)


def _dead_masks(model, near_zero, iid, g):
    """{conv: bool mask of near-zero channels}: per layer share (or one share for all when iid); the members of
    a shortcut group share 90 % of their dead channels."""
    ls = prune_utils.get_layer_set(model.module_defs, 'shortcut', model.in_channels)
    bn = [i for i, d in enumerate(model.module_defs) if d['type'] == 'convolutional' and d.get('batch_normalize')]

    def share():
        return near_zero if iid else float(min(0.95, max(0.05, near_zero + 0.5 * (torch.rand(1, generator=g) - 0.5))))
    masks = {i: torch.rand(model.module_defs[i]['filters'], generator=g) < share() for i in bn}
    if not iid:
        for group in ls.groups:
            common = masks[group[0]]
            for i in group[1:]:
                keep_own = torch.rand(len(common), generator=g) < 0.1
                masks[i] = torch.where(keep_own, masks[i], common)
    return masks


def sparse_like_(model, near_zero=0.6, iid=False, seed=0):
    """Random sane weights with a gamma distribution like that after sparse training (see the module doc):
    dead channels |N(0, 0.01)|, live ones U(0.5, 1.2) times a per-layer scale; residual blocks a block scale
    (a third nearly dead: x0.01). iid=True: one share for every layer, no layer, group or block structure."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    _init_weights_(model, g)
    masks = _dead_masks(model, near_zero, iid, g)
    block_scale = {}
    if not iid:
        for b in prune_layers.find_blocks(model.module_defs, model.in_channels).candidates:
            dead = torch.rand(1, generator=g).item() < 1 / 3
            block_scale[b.branch[-1]] = 0.01 if dead else 0.5 + torch.rand(1, generator=g).item()
    with torch.no_grad():
        for i, dead in masks.items():
            bn = model.module_list[i][1]
            n = len(dead)
            scale = 1.0 if iid else 0.6 + 0.8 * torch.rand(1, generator=g).item()
            live = (0.5 + 0.7 * torch.rand(n, generator=g)) * scale
            bn.weight.copy_(torch.where(dead, torch.randn(n, generator=g).abs() * 0.01, live) * block_scale.get(i, 1))
    return model


def prune_from_files(cfg, weights, strategy, round_to, percent, out_prefix, img_size):
    """The prune scripts' steps without mAP or latency timing; returns (compact model, plan, seconds)."""
    t = time.perf_counter()
    model = load_model(cfg, weights, img_size=img_size)
    layer_set = prune_utils.get_layer_set(model.module_defs, strategy, model.in_channels)
    plan = prune_utils.make_plan(model, layer_set, strategy, percent=percent, min_keep=1, round_to=round_to)
    compact = prune_utils.compact_model(model, plan)
    hw = (img_size, img_size)
    report = {'strategy': strategy, 'before': prune_utils.measure(model, hw, 0),
              'after': prune_utils.measure(compact, hw, 0)}
    prune_utils.write_outputs(out_prefix, compact, plan, report)
    return compact, plan, time.perf_counter() - t


def cli_seconds(cfg, weights, percent, out_prefix, threads):
    """Wall seconds of `python shortcut_prune.py ...` (no latency timing, no mAP), as a user runs it."""
    env = {**os.environ, **({'OMP_NUM_THREADS': str(threads)} if threads else {})}
    t = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(REPO, 'shortcut_prune.py'), '--cfg', cfg, '--weights', weights,
                    '--percent', str(percent), '--latency-runs', '0', '--out', out_prefix], check=True,
                   capture_output=True, cwd=REPO, env=env)
    return time.perf_counter() - t


def gpu_latencies(nets, hw, runs):
    """{batch: {'median_ms': [per model], 'how': ...}} on cuda:0 (CUDA graphs), or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    out = {}
    for b in GPU_BATCHES:
        medians, how = latencies(nets, hw, runs, batch=b, device='cuda', warmup=3)
        out[b] = {'median_ms': [t * 1e3 for t in medians], 'how': how}
        torch.cuda.empty_cache()
    return out


def timed_rows(rows, nets, original, hw, runs):
    """Add latency_ms, speedup, bflops_reduction, efficiency to each row (nets[k] belongs to rows[k]); all models
    and the original timed alternately. Returns the original's latency in ms."""
    lat, _ = latencies([original] + nets, hw, runs, warmup=2)
    _, b0 = model_info(original.defs, *hw)
    for r, t in zip(rows, lat[1:]):
        speedup, reduction = lat[0] / t, b0 / r['bflops_after']
        r.update(latency_ms=t * 1e3, speedup=speedup, bflops_reduction=reduction, efficiency=speedup / reduction)
    return lat[0] * 1e3


def yolov3_rows(args, tmp):
    """Channel rows (sparse-like gamma, plus the i.i.d. row), layer rows; (rows, nets, original, cli seconds)."""
    s = args.img_size
    model = sparse_like_(Darknet(args.cfg, img_size=s), args.near_zero, seed=0)
    weights = save_weights(model, os.path.join(tmp, 'sparse.weights'))
    rows, nets = [], []
    for name, strategy, round_to, percent in CHANNEL_ROWS:
        compact, plan, sec = prune_from_files(args.cfg, weights, strategy, round_to, percent or args.percent,
                                              os.path.join(tmp, strategy + str(round_to)), s)
        rows.append({'name': name, 'kind': 'channel', 'strategy': strategy, 'round_to': round_to,
                     'percent': percent or args.percent, 'prune_seconds': sec, 'removed_share': plan.removed_share,
                     'params_after': model_info(compact.defs, s, s)[0], 'bflops_after': model_info(compact.defs, s, s)[1]})
        nets.append(compact)
    iid = sparse_like_(Darknet(args.cfg, img_size=s), args.near_zero, iid=True, seed=0)
    plan = prune_utils.make_plan(iid, prune_utils.get_layer_set(iid.module_defs, 'shortcut'), 'shortcut',
                                 percent=args.percent, min_keep=1)
    nets.append(prune_utils.compact_model(iid, plan))
    rows.append({'name': 'shortcut, i.i.d. gamma (best case for speed)', 'kind': 'channel-iid',
                 'strategy': 'shortcut', 'percent': args.percent, 'removed_share': plan.removed_share,
                 **dict(zip(('params_after', 'bflops_after'), model_info(nets[-1].defs, s, s)))})
    for n_blocks, percent in LAYER_ROWS:
        t = time.perf_counter()
        result = prune_layers.prune(model, n_blocks, percent, min_keep=1 if percent else None)
        sec = time.perf_counter() - t
        nets.append(result.compact)
        rows.append({'name': f"layer --shortcuts {n_blocks}" + (f" --percent {percent}" if percent else ''),
                     'kind': 'layer', 'shortcuts': n_blocks, 'percent': percent, 'prune_seconds': sec,
                     **dict(zip(('params_after', 'bflops_after'), model_info(result.compact.defs, s, s)))})
    cli = cli_seconds(args.cfg, weights, args.percent, os.path.join(tmp, 'cli'), args.threads)
    return rows, nets, model, cli


def v4tiny_rows(args):
    """yolov4-tiny channel rows and the prunable share with and without the CSP splits' inputs."""
    s = args.img_size
    model = sparse_like_(Darknet(args.v4tiny_cfg, img_size=s), args.near_zero, seed=1)
    rows, nets = [], []
    for strategy, percent in V4T_ROWS:
        ls = prune_utils.get_layer_set(model.module_defs, strategy)
        plan = prune_utils.make_plan(model, ls, strategy, percent=percent, min_keep=1)
        compact = prune_utils.compact_model(model, plan)
        nets.append(compact)
        total = sum(ls.filters.values())
        prunable = sum(ls.filters[i] for i in ls.prunable)
        without_splits = prunable - sum(ls.filters[i] for i in ls.slices)
        rows.append({'name': f"{strategy} {percent}", 'strategy': strategy, 'percent': percent,
                     'removed_share': plan.removed_share, 'prunable_share': prunable / total,
                     'prunable_share_without_splits': without_splits / total,
                     **dict(zip(('params_after', 'bflops_after'), model_info(compact.defs, s, s)))})
    return rows, nets, model


def print_rows(rows, original_ms, p0, b0, title):
    table = [['model', 'params', 'BFLOPs', 'latency ms', 'speedup', 'BFLOPs red.', 'efficiency']]
    table.append(['original', f"{p0 / 1e6:.2f}M", f"{b0:.2f}", f"{original_ms:.1f}", '', '', ''])
    for r in rows:
        table.append([r['name'], f"{r['params_after'] / 1e6:.2f}M", f"{r['bflops_after']:.2f}",
                      f"{r['latency_ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['bflops_reduction']:.2f}x",
                      f"{r['efficiency']:.2f}"])
    print_table(table, title)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    s = args.img_size
    load = load_average()
    out = {'img_size': s, 'percent': args.percent, 'near_zero_share': args.near_zero, 'latency_runs': args.runs,
           'threads': torch.get_num_threads(), 'gamma': 'sparse-like: per-layer share and scale, shared group '
           'masks, per-block scale (one i.i.d. row labelled)'}
    if args.part in ('yolov3', 'all'):
        with tempfile.TemporaryDirectory() as tmp:
            rows, nets, model, cli = yolov3_rows(args, tmp)
        ms = timed_rows(rows, nets, model, (s, s), args.runs)
        p0, b0 = model_info(model.defs, s, s)
        print_rows(rows, ms, p0, b0, f" {args.cfg} @ {s}, {torch.get_num_threads()} thread(s), median of {args.runs} ")
        worst = max(r.get('prune_seconds', 0) for r in rows if r['kind'] == 'channel')
        eff8 = next(r['efficiency'] for r in rows if r.get('round_to') == 8)
        print(f"(a) whole prune: max {worst:.2f} s in process, {cli:.2f} s as the shortcut_prune.py command "
              f"(target <= {PRUNE_TARGET_S} s); (b) --round-to 8 efficiency {eff8:.2f} (target >= "
              f"{EFFICIENCY_TARGET})")
        gpu = gpu_latencies([model] + nets, (s, s), max(args.runs, GPU_MIN_RUNS))
        print("(d) GPU: " + ("not measured: no GPU" if gpu is None else str(gpu)))
        out['yolov3'] = {'cfg': args.cfg, 'original': {'params': p0, 'bflops': b0, 'latency_ms': ms}, 'rows': rows,
                         'cli_shortcut_prune_seconds': cli, 'max_prune_seconds': worst,
                         'met': {'prune_seconds': max(worst, cli) <= PRUNE_TARGET_S,
                                 'efficiency_round_to_8': eff8 >= EFFICIENCY_TARGET},
                         'gpu': 'not measured: no GPU' if gpu is None else {
                             'device': torch.cuda.get_device_name(0), 'batches': {str(b): g for b, g in gpu.items()}}}
    if args.part in ('v4tiny', 'all'):
        rows, nets, model = v4tiny_rows(args)
        ms = timed_rows(rows, nets, model, (s, s), args.runs)
        p0, b0 = model_info(model.defs, s, s)
        print_rows(rows, ms, p0, b0, f" {args.v4tiny_cfg} @ {s} ")
        for r in rows:
            print(f"  {r['name']}: prunable channels {r['prunable_share']:.0%}, "
                  f"{r['prunable_share_without_splits']:.0%} with the splits' inputs excluded")
        out['yolov4_tiny'] = {'cfg': args.v4tiny_cfg, 'original': {'params': p0, 'bflops': b0, 'latency_ms': ms},
                              'rows': rows}
    end = load_average()
    cores = os.cpu_count() or 1
    out['idle'] = max(load[0], end[0]) <= IDLE_PER_CORE * cores
    write_result('prune', out, load)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
