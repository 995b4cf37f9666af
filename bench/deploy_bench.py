"""Does a pruned model's BFLOPs saving turn into speed where it is deployed? Original vs compact models, batch-1 CPU
latency, one thread, in four runtimes: PyTorch, OpenCV DNN, onnxruntime and the original darknet.

    python -m bench.deploy_bench [--runs 15] [--img-size 416] [--parts synthetic,real,demo,int8]
        [--runtimes torch,opencv,onnxruntime,darknet] [--real PRUNED_CFG PRUNED_WEIGHTS]
        [--demo-report runs/demo/report.json] [--demo-root CHECKOUT]
        [--int8-percents 0.1,0.2] [--calib 100] [--extra NAME CFG WEIGHTS DATA ...]

Model pairs (each model is written as a Darknet cfg + .weights into a temporary folder, which OpenCV and darknet
read; onnxruntime runs utils/onnx_export.py's export of the same model):
  synthetic  cfg/yolov3.cfg at --img-size with sparse-trained-like BatchNorm gammas (bench/prune_bench.py
             sparse_like_), against three compact models: shortcut prune --percent 0.5, regular prune --round-to 8
             --percent 0.5, layer prune --shortcuts 16 (--shortcuts); 2.5x, 1.95x and 1.76x fewer BFLOPs.
  real       the COCO yolov3-tiny (../shared/models/yolov3-tiny-coco, or --real-base) at --img-size against
             --real PRUNED_CFG PRUNED_WEIGHTS (a fine-tuned pruned model); without --real, a tiny prune --percent
             0.5 of the real weights, labelled "not fine-tuned, timing only".
  demo       the models of `python demo.py` (its report.json: sparse / tiny_sparse and pruned.<name>) at their
             cfg's [net] size; skipped with a note when the report is absent.

Runtimes, each held to one thread: PyTorch (the model fused, eval, no_grad: as utils/latency.py times it),
OpenCV (cv2.dnn.readNetFromDarknet, OpenCV backend, CPU target, cv2.setNumThreads(1)), onnxruntime
(CPUExecutionProvider, intra- and inter-op threads 1) and darknet (libdarknet via bench/darknet_runtime.py,
single-threaded CPU; it runs only cfgs without [route] groups, [yolo] scale_x_y or new_coords: others are skipped
with a note). Before any timing each runtime's decoded objectness for a random input is checked against the
PyTorch model's (max |difference| < 5e-2: catches a model loaded wrongly; see OBJ_TOL).

Timing: --warmup untimed passes of every (model, runtime), then --runs rounds of one pass of each in turn, so
that drift of the machine hits all alike; the median per (model, runtime). speedup = original / compact latency
in the same runtime; efficiency = speedup / BFLOPs reduction (BFLOPs as darknet counts them, models.model_info).
Goal: efficiency >= 0.8 in every runtime at about 2x fewer BFLOPs. Where a pair misses it, the reason is given
from per-layer times in that runtime (PyTorch forward hooks, OpenCV getPerfProfile, onnxruntime's profiler;
darknet has none, so PyTorch's stands in), and the worst pair's top layers by time, original vs compact, are
saved. The load average before and after is recorded; idle = both under 0.5 per core.
Prints tables and writes bench/results/deploy.json (--result NAME for another name; `--parts int8 --result
deploy-int8` keeps the INT8 rows apart from the rest).

int8: FP32 vs INT8 in onnxruntime, latency and mAP side by side. Models: the COCO yolov3-tiny (--real-base),
the --real pruned model when given, and tiny prunes at --int8-percents (not sparse-trained, so calibrated
surgery: mean fold, refit, BN statistics on 64 coco128 train images; not fine-tuned), scored on coco128
val2017 (../shared/datasets/coco128); and every `--extra NAME CFG WEIGHTS DATA` (e.g. the BCCD models; the
first --extra of a .data file is the original its group's other rows are compared with), scored on DATA's
valid split. Each model is exported as FP32 ONNX (utils/onnx_export.py) at --img-size (an --extra at its cfg's
size) and quantized (utils/quantize.py, the default method, calibrated on --calib images of the train split);
mAP@0.5 and @0.5:0.95 by test.py's evaluator (test.py --onnx: square letterbox) for both; batch-1 latency of
both at 1 thread and at all cores (intra-op threads = os.cpu_count()), timed in alternating rounds as above.
Goals: a pruned INT8 model >= 3x faster than the original FP32 at 1 thread; INT8 costs <= 0.02
mAP@0.5 on COCO, <= 0.01 on an --extra data set (BCCD).
"""
import argparse
import copy
import dataclasses
import json
import os
import re
import statistics
import tempfile
import time

import numpy as np
import torch

import prune_layers
import prune_utils
from bench.common import REPO, load_average, print_table, write_result
from models import Darknet, layer_table, load_model, model_info
from utils.darknet_weights import save_weights
from utils.errors import DarkslimError, cli_main
from utils.onnx_export import yolo_shapes
from utils.parse_config import write_cfg

PARTS = ('synthetic', 'real', 'demo', 'int8')
RUNTIMES = ('torch', 'opencv', 'onnxruntime', 'darknet')
REAL_BASE = (os.path.join(REPO, '..', 'shared', 'models', 'yolov3-tiny-coco', 'yolov3-tiny.cfg'),
             os.path.join(REPO, '..', 'shared', 'models', 'yolov3-tiny-coco', 'yolov3-tiny.weights'))
EFFICIENCY_GOAL = 0.8
COCO128 = os.path.join(REPO, '..', 'shared', 'datasets', 'coco128')
INT8_SPEEDUP_GOAL = 3.0          # pruned + INT8 vs the original FP32, onnxruntime, 1 thread
INT8_MAP_COST = {'coco128': 0.02, 'extra': 0.01}   # most mAP@0.5 INT8 may lose against FP32 (COCO, BCCD)
SURGERY_IMAGES = 64              # coco128 train images behind the calibrated tiny prunes
# max |objectness difference| from PyTorch's accepted before timing: darknet and OpenCV normalise BN by
# sqrt(var) + 1e-6 where we use sqrt(var + 1e-5); on a trained model with tiny running variances that alone moves
# objectness by ~1e-2 (the demo's shortcut prune in darknet: 0.0117), while a model loaded wrongly is off by O(1)
OBJ_TOL = 5e-2
IDLE_PER_CORE = 0.5
TOP_LAYERS = 10         # layers per model kept in the worst pair's profile
PROFILE_PASSES = 3      # passes per model behind a per-layer profile (median per layer)
UNATTRIBUTED = -1       # profile key of time no cfg layer owns (e.g. the heads' concatenation)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', type=int, default=15, help='timed rounds (median per model and runtime)')
    p.add_argument('--warmup', type=int, default=2, help='untimed passes of every model and runtime first')
    p.add_argument('--img-size', type=int, default=416, help='input size of the synthetic and real pairs')
    p.add_argument('--parts', default=','.join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument('--runtimes', default=','.join(RUNTIMES), help=f"comma list of {', '.join(RUNTIMES)}")
    p.add_argument('--cfg', default='cfg/yolov3.cfg', help='the synthetic pair\'s original cfg')
    p.add_argument('--near-zero', type=float, default=0.6, help='synthetic: mean share of near-zero gammas')
    p.add_argument('--shortcuts', type=int, default=16, help='synthetic: residual blocks the layer prune removes')
    p.add_argument('--real', nargs=2, metavar=('PRUNED_CFG', 'PRUNED_WEIGHTS'),
                   help='real pair: the pruned (fine-tuned) yolov3-tiny; default: a timing-only tiny prune')
    p.add_argument('--real-base', nargs=2, metavar=('CFG', 'WEIGHTS'), default=REAL_BASE,
                   help='real pair: the original model (default: ../shared/models/yolov3-tiny-coco)')
    p.add_argument('--demo-report', default='runs/demo/report.json', help="demo.py's report.json")
    p.add_argument('--demo-root', default=REPO,
                   help="the checkout demo.py ran in: its report's paths are relative to it (default: this one)")
    p.add_argument('--int8-percents', default='0.1,0.2',
                   help='int8: tiny prunes of the COCO yolov3-tiny (calibrated surgery) beside the original')
    p.add_argument('--calib', type=int, default=None,
                   help='int8: INT8 calibration images of the train split (default: utils/quantize.py\'s)')
    p.add_argument('--extra', nargs=4, action='append', default=[], metavar=('NAME', 'CFG', 'WEIGHTS', 'DATA'),
                   help='int8: another model scored on DATA (repeatable; the first of a DATA is its group\'s '
                        'original)')
    p.add_argument('--result', default='deploy', help='writes bench/results/RESULT.json')
    return p


def comma_list(text, allowed, option):
    items = [s.strip() for s in text.split(',') if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise DarkslimError(f"{option} {text!r}; expected a comma list of {', '.join(allowed)}")
    return items


# --- the models -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class BenchModel:
    """One model as every runtime gets it: `net` (models.Darknet, eval, CPU) and its cfg + .weights on disk."""
    key: str
    part: str
    net: object
    hw: tuple
    cfg: str
    weights: str
    params: int
    bflops: float
    source: str


@dataclasses.dataclass
class BenchPair:
    part: str
    name: str
    original: str   # BenchModel keys
    compact: str
    note: str = ''


def add_model(models, tmp, key, part, net, hw, source):
    """Write `net` as cfg ([net] batch=1, height/width = hw, as darknet sizes itself from it) + .weights into
    `tmp` and add its BenchModel to `models` (a dict by key)."""
    stem = os.path.join(tmp, re.sub(r'[^A-Za-z0-9_.-]+', '_', key))
    defs = copy.deepcopy(net.defs)
    defs[0].update(batch=1, subdivisions=1, height=hw[0], width=hw[1])
    write_cfg(stem + '.cfg', defs)
    save_weights(net, stem + '.weights')
    params, bflops = model_info(net.defs, *hw)
    models[key] = BenchModel(key, part, net.eval(), tuple(hw), stem + '.cfg', stem + '.weights', params, bflops,
                             source)


def synthetic_models(args, models, tmp):
    """yolov3 with sparse-like gammas and its three compact models; returns the pairs."""
    from bench.prune_bench import sparse_like_
    s = args.img_size
    net = sparse_like_(Darknet(args.cfg, img_size=s), args.near_zero, seed=0)
    add_model(models, tmp, 'synthetic/original', 'synthetic', net, (s, s), f"{args.cfg}, sparse-like gammas")
    compacts = {}
    for name, strategy, round_to in (('shortcut --percent 0.5', 'shortcut', None),
                                     ('regular --round-to 8 --percent 0.5', 'regular', 8)):
        ls = prune_utils.get_layer_set(net.module_defs, strategy, net.in_channels)
        plan = prune_utils.make_plan(net, ls, strategy, percent=0.5, min_keep=1, round_to=round_to)
        compacts[name] = prune_utils.compact_model(net, plan)
    compacts[f'layer --shortcuts {args.shortcuts}'] = prune_layers.prune(net, args.shortcuts).compact
    pairs = []
    for name, compact in compacts.items():
        add_model(models, tmp, f'synthetic/{name}', 'synthetic', compact, (s, s), f"{name} of the original")
        pairs.append(BenchPair('synthetic', f"yolov3 {name}", 'synthetic/original', f'synthetic/{name}'))
    return pairs


def real_models(args, models, tmp, notes):
    """The COCO yolov3-tiny and a pruned version (--real, or a timing-only tiny prune); [] when absent."""
    cfg, weights = args.real_base
    if not (os.path.isfile(cfg) and os.path.isfile(weights)):
        notes.append(f"real: skipped, {cfg} / {weights} absent (../shared is not part of a clone)")
        return []
    for p in args.real or ():
        if not os.path.isfile(p):
            raise DarkslimError(f"--real {p}: no such file; expected the pruned model's cfg and weights")
    s = args.img_size
    net = load_model(cfg, weights, img_size=s)
    add_model(models, tmp, 'real/original', 'real', net, (s, s), f"{os.path.relpath(cfg, REPO)} + weights")
    if args.real:
        compact, note = load_model(args.real[0], args.real[1], img_size=s), ''
        source, name = f"{args.real[0]} + {args.real[1]}", 'yolov3-tiny pruned (fine-tuned)'
    else:
        ls = prune_utils.get_layer_set(net.module_defs, 'tiny', net.in_channels)
        compact = prune_utils.compact_model(net, prune_utils.make_plan(net, ls, 'tiny', percent=0.5, min_keep=1))
        note = 'not fine-tuned, timing only'
        source, name = 'tiny prune --percent 0.5 of the COCO weights', 'yolov3-tiny tiny --percent 0.5'
    add_model(models, tmp, 'real/pruned', 'real', compact, (s, s), source)
    return [BenchPair('real', name, 'real/original', 'real/pruned', note)]


def demo_models(args, models, tmp, notes):
    """demo.py's sparse models and their fine-tuned pruned ones, at their cfg's [net] size; [] when absent."""
    path = os.path.join(REPO, args.demo_report)
    if not os.path.isfile(path):
        notes.append(f"demo: skipped, {args.demo_report} absent (run `python demo.py` first)")
        return []
    with open(path) as f:
        report = json.load(f)
    try:
        sources = {k: (report[k]['cfg'], report[k]['weights']) for k in ('sparse', 'tiny_sparse')}
        pruned = {k: (m['cfg'], m['weights']) for k, m in report['pruned'].items()}
    except (KeyError, TypeError) as e:
        raise DarkslimError(f"{args.demo_report}: no {e} entry; expected demo.py's report.json (sparse, "
                            "tiny_sparse and pruned.<name> with cfg and weights)") from None
    for key, (cfg, weights) in {**sources, **{f'pruned/{k}': v for k, v in pruned.items()}}.items():
        net = load_model(os.path.join(args.demo_root, cfg), os.path.join(args.demo_root, weights))
        add_model(models, tmp, f'demo/{key}', 'demo', net, net.img_size, f"{cfg} + {weights}")
    # as demo.py pairs them: the tiny prune comes from the tiny model, every other prune from the sparse one
    return [BenchPair('demo', f"demo {name}", 'demo/tiny_sparse' if name == 'tiny' else 'demo/sparse',
                      f'demo/pruned/{name}', 'fine-tuned') for name in pruned]


# --- the runtimes: load a model, one timed pass, decoded objectness, per-layer times -----------------------------

def head_objectness(heads, outputs, layout):
    """Objectness of every box in PyTorch's detection order (head by head, then anchor, y, x) from a runtime's
    per-head outputs. heads: [(layer, na, ny, nx, no)]; layout 'yxa' (OpenCV rows [ny*nx*na, no]) or 'a_chw'
    (darknet [na, no, ny, nx])."""
    parts = []
    for (_, na, ny, nx, no), o in zip(heads, outputs):
        if layout == 'yxa':
            parts.append(np.asarray(o).reshape(ny, nx, na, no)[..., 4].transpose(2, 0, 1).ravel())
        else:
            parts.append(np.asarray(o)[:, 4].ravel())
    return np.concatenate(parts)


class TorchRun:
    """PyTorch: a fused copy (BatchNorm folded), eval, no_grad, the process's torch threads (set to 1)."""
    name = 'torch'

    def __init__(self, bm, x, tmp):
        self.net, self.x = copy.deepcopy(bm.net).eval().fuse(), x

    def run(self):
        t = time.perf_counter()
        with torch.no_grad():
            self.net(self.x)
        return time.perf_counter() - t

    def objectness(self):
        with torch.no_grad():
            return self.net(self.x)[0][0, :, 4].numpy()

    def profile(self, passes):
        """[{layer index: ms}] per pass, from forward hooks on every cfg layer's module."""
        stamps, rows, hooks = {}, [], []
        for i, m in enumerate(self.net.module_list):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, i=i: stamps.__setitem__(i, time.perf_counter())))
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, i=i: rows[-1].__setitem__(i, (time.perf_counter() - stamps[i]) * 1e3)))
        try:
            for _ in range(passes):
                rows.append({})
                self.run()
        finally:
            for h in hooks:
                h.remove()
        return rows

    def close(self):
        pass


class OpenCVRun:
    """OpenCV DNN: readNetFromDarknet on the written cfg + weights, OpenCV backend, CPU target, 1 thread."""
    name = 'opencv'
    OWN_INDEX = ('conv', 'shortcut', 'upsample', 'concat', 'identity', 'yolo', 'permute', 'pool', 'maxpool',
                 'slice', 'region', 'reorg')  # name prefixes whose number is their cfg layer's index

    def __init__(self, bm, x, tmp):
        import cv2
        cv2.setNumThreads(1)
        self.cv2 = cv2
        self.net = cv2.dnn.readNetFromDarknet(bm.cfg, bm.weights)
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        names = self.net.getUnconnectedOutLayersNames()
        self.names = sorted(names, key=lambda n: int(n.split('_')[-1]))  # yolo_<cfg index>: cfg order
        self.x, self.heads = x.numpy(), yolo_shapes(bm.net, *bm.hw)

    def run(self):
        t = time.perf_counter()
        self.net.setInput(self.x)
        self.net.forward(self.names)
        return time.perf_counter() - t

    def objectness(self):
        self.net.setInput(self.x)
        return head_objectness(self.heads, self.net.forward(self.names), 'yxa')

    def profile(self, passes):
        """[{layer index: ms}] per pass from getPerfProfile. The importer names its layers <kind>_<cfg index>,
        except that BatchNorm and activations fused into a conv carry other numbers: they go to the layer
        before them (their time is 0 once fused)."""
        rows, names = [], self.net.getLayerNames()
        for _ in range(passes):
            self.run()
            _, ticks = self.net.getPerfProfile()
            row, owner = {}, UNATTRIBUTED
            for name, t in zip(names, np.asarray(ticks).ravel()):
                kind, _, num = name.rpartition('_')
                if kind in self.OWN_INDEX and num.isdigit():
                    owner = int(num)
                row[owner] = row.get(owner, 0.0) + float(t) * 1e3 / self.cv2.getTickFrequency()
            rows.append(row)
        return rows

    def close(self):
        pass


class OnnxRun:
    """onnxruntime: utils/onnx_export.py's export (BatchNorm folded), CPUExecutionProvider, 1 + 1 threads."""
    name = 'onnxruntime'

    def __init__(self, bm, x, tmp):
        import onnxruntime as ort

        from utils.onnx_export import export_onnx
        self.ort, self.path = ort, os.path.join(tmp, os.path.basename(bm.cfg)[:-4] + '.onnx')
        export_onnx(bm.net, self.path, img_size=bm.hw)
        self.session, self.feed, self.tmp = self._session(), {'images': x.numpy()}, tmp

    def _session(self, profile_prefix=None):
        so = self.ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        if profile_prefix:
            so.enable_profiling, so.profile_file_prefix = True, profile_prefix
        return self.ort.InferenceSession(self.path, so, providers=['CPUExecutionProvider'])

    def run(self):
        t = time.perf_counter()
        self.session.run(None, self.feed)
        return time.perf_counter() - t

    def objectness(self):
        return self.session.run(['detections'], self.feed)[0][0, :, 4]

    def profile(self, passes):
        """[{layer index: ms}] per pass from onnxruntime's profiler (a second session): node names carry
        module_list.<cfg index>; layout reorders and the like are unattributed."""
        session = self._session(os.path.join(self.tmp, 'ort-profile'))
        session.run(None, self.feed)  # its own warm-up pass, dropped below
        for _ in range(passes):
            session.run(None, self.feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
        runs = [e for e in events if e.get('cat') == 'Session' and e.get('name') == 'model_run']
        rows = [{} for _ in runs]
        for e in events:
            if e.get('cat') != 'Node' or not e.get('name', '').endswith('_kernel_time'):
                continue
            k = next((n for n, r in enumerate(runs) if r['ts'] <= e['ts'] <= r['ts'] + r['dur']), None)
            if k is None:
                continue
            m = re.search(r'module_list\.(\d+)', e['name'])
            owner = int(m.group(1)) if m else UNATTRIBUTED
            rows[k][owner] = rows[k].get(owner, 0.0) + e['dur'] / 1e3
        return rows[1:]

    def close(self):
        pass


class DarknetRun:
    """darknet: libdarknet in a child process (bench/darknet_runtime.py), single-threaded CPU; no layer timer."""
    name = 'darknet'

    def __init__(self, bm, x, tmp):
        from bench.darknet_runtime import DarknetNet
        self.net, self.heads = DarknetNet(bm.cfg, bm.weights, tmp), yolo_shapes(bm.net, *bm.hw)
        self.net.set_input(x.numpy())

    def run(self):
        return self.net.run()

    def objectness(self):
        outs = self.net.yolo_outputs()
        return head_objectness(self.heads, [outs[k] for k in sorted(outs)], 'a_chw')

    profile = None

    def close(self):
        self.net.close()


RUNNERS = {'torch': TorchRun, 'opencv': OpenCVRun, 'onnxruntime': OnnxRun, 'darknet': DarknetRun}


def runtime_missing(name):
    """Why runtime `name` cannot run here, or None."""
    if name == 'darknet':
        from bench.darknet_runtime import missing
        return missing()
    module = {'opencv': 'cv2', 'onnxruntime': 'onnxruntime', 'torch': 'torch'}[name]
    try:
        __import__(module)
    except ImportError:
        return f"{module} not installed"
    return None


# --- load, check, time ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Check:
    """One runtime's agreement with the PyTorch model before timing."""
    model: str
    runtime: str
    max_objectness_diff: float
    load_seconds: float


def reference_objectness(bm, x):
    """The (unfused) PyTorch model's decoded objectness for x, in detection order."""
    with torch.no_grad():
        return bm.net(x)[0][0, :, 4].numpy()


def load_runners(models, runtimes, tmp, notes):
    """({(model key, runtime): runner}, [Check]): every model in every available runtime, each checked against
    PyTorch (a difference over OBJ_TOL stops the benchmark: a model loaded wrongly times nothing useful)."""
    from bench.darknet_runtime import unsupported
    available = []
    for rt in runtimes:
        why = runtime_missing(rt)
        if why:
            notes.append(f"{rt}: skipped, {why}")
        else:
            available.append(rt)
    runners, checks = {}, []
    for bm in models.values():
        x = torch.rand(1, bm.net.in_channels, *bm.hw, generator=torch.Generator().manual_seed(0))
        ref = reference_objectness(bm, x)
        for rt in available:
            why = unsupported(bm.net.defs) if rt == 'darknet' else None
            if why:
                notes.append(f"darknet: {bm.key} skipped, {why}")
                continue
            t = time.perf_counter()
            runner = RUNNERS[rt](bm, x, tmp)
            diff = float(np.abs(runner.objectness() - ref).max())
            checks.append(Check(bm.key, rt, diff, time.perf_counter() - t))
            if not diff < OBJ_TOL:
                raise DarkslimError(f"{bm.key} in {rt}: objectness differs from PyTorch's by {diff:.3g}; expected "
                                    f"< {OBJ_TOL} (the runtime loaded a different model)")
            runners[bm.key, rt] = runner
        print(f"  loaded and checked {bm.key}: " + ', '.join(
            f"{c.runtime} {c.max_objectness_diff:.1e}" for c in checks if c.model == bm.key), flush=True)
    return runners, checks


def time_alternating(runners, runs, warmup):
    """{(model, runtime): [seconds per timed pass]}: `warmup` untimed rounds, then `runs` rounds of one pass of
    every runner in turn."""
    order = list(runners.items())
    t = time.perf_counter()
    for _ in range(warmup):
        for _, r in order:
            r.run()
    if warmup:
        per_round = (time.perf_counter() - t) / warmup
        print(f"  warm-up: {per_round:.1f} s a round, so about {per_round * runs:.0f} s for {runs} timed rounds",
              flush=True)
    times = {k: [] for k, _ in order}
    for n in range(runs):
        t = time.perf_counter()
        for k, r in order:
            times[k].append(r.run())
        print(f"  round {n + 1}/{runs}: {time.perf_counter() - t:.1f} s", flush=True)
    return times


# --- results and profiles ---------------------------------------------------------------------------------------

def pair_rows(pairs, models, medians, runtimes):
    """One row per (pair, runtime) timed: latencies (ms), speedup, BFLOPs reduction, efficiency, goal met."""
    rows = []
    for p in pairs:
        o, c = models[p.original], models[p.compact]
        for rt in runtimes:
            if (o.key, rt) not in medians or (c.key, rt) not in medians:
                continue
            t_o, t_c = medians[o.key, rt], medians[c.key, rt]
            speedup, reduction = t_o / t_c, o.bflops / c.bflops
            rows.append({'part': p.part, 'pair': p.name, 'note': p.note, 'runtime': rt, 'original': o.key,
                         'compact': c.key, 'bflops_original': o.bflops, 'bflops_compact': c.bflops,
                         'original_ms': t_o * 1e3, 'compact_ms': t_c * 1e3, 'speedup': speedup,
                         'bflops_reduction': reduction, 'efficiency': speedup / reduction,
                         'met': speedup / reduction >= EFFICIENCY_GOAL})
    return rows


def profile_summary(per_pass, bm, top=TOP_LAYERS):
    """Per-layer times (median over passes) of one model: totals for convs and the rest, conv GFLOP/s, and the
    `top` layers by time with their type, shapes and BFLOPs."""
    table = layer_table(bm.net.defs, *bm.hw)
    layers = sorted({k for row in per_pass for k in row})
    ms = {k: statistics.median(row.get(k, 0.0) for row in per_pass) for k in layers}
    is_conv = {k: k >= 0 and table[k].type == 'convolutional' for k in layers}
    conv_ms = sum(v for k, v in ms.items() if is_conv[k])
    conv_bflops = sum(r.bflops for r in table if r.type == 'convolutional')
    top_rows = []
    for k, v in sorted(ms.items(), key=lambda kv: -kv[1])[:top]:
        r = table[k] if k >= 0 else None
        top_rows.append({'layer': k, 'type': r.type if r else 'unattributed', 'filters': r.filters if r else '',
                         'input': r.input if r else '', 'output': r.output if r else '',
                         'bflops': r.bflops if r else 0.0, 'ms': v,
                         'gflop_per_s': r.bflops / v * 1e3 if r and r.bflops and v else None})
    return {'total_ms': sum(ms.values()), 'conv_ms': conv_ms, 'other_ms': sum(ms.values()) - conv_ms,
            'conv_bflops': conv_bflops, 'conv_gflop_per_s': conv_bflops / conv_ms * 1e3 if conv_ms else None,
            'top_layers': top_rows}


def why_short(o, c, reduction):
    """One sentence on where a compact model's time goes beyond a perfect (BFLOPs-proportional) speedup, from
    the original's and compact's profile summaries."""
    conv_red = o['conv_bflops'] / c['conv_bflops']
    conv_excess = c['conv_ms'] - o['conv_ms'] / conv_red       # over conv time that would scale with conv FLOPs
    other_excess = c['other_ms'] - o['other_ms'] / reduction   # over the rest shrinking like the whole model
    lead = ('mostly the convs: the narrower layers run at fewer GFLOP/s' if conv_excess >= other_excess else
            'mostly layers without much arithmetic (routes, upsampling, shortcuts, heads, layout) that shrink less '
            'than the BFLOPs')
    return (f"{lead}; profiled {o['total_ms']:.1f} -> {c['total_ms']:.1f} ms ({o['total_ms'] / c['total_ms']:.2f}x), "
            f"convs {o['conv_ms'] / c['conv_ms']:.2f}x faster for {conv_red:.2f}x fewer conv BFLOPs "
            f"({o['conv_gflop_per_s']:.1f} -> {c['conv_gflop_per_s']:.1f} GFLOP/s), other layers "
            f"{o['other_ms']:.1f} -> {c['other_ms']:.1f} ms ({c['other_ms'] / c['total_ms']:.0%} of the compact's "
            f"profiled time)")


def explain(rows, runners, models):
    """Add 'why' (and 'profiled_in') to every row that misses the goal, from per-layer profiles in its runtime
    (PyTorch's where the runtime has no layer timer); returns the worst row's full profile (or None)."""
    cache = {}

    def summary(key, rt):
        if (key, rt) not in cache:
            runner = runners[key, rt]
            cache[key, rt] = profile_summary(runner.profile(PROFILE_PASSES), models[key])
        return cache[key, rt]

    def profiled_in(r):
        return r['runtime'] if getattr(runners[r['original'], r['runtime']], 'profile', None) else 'torch'

    for r in rows:
        if not r['met'] and (r['original'], profiled_in(r)) in runners:
            rt = profiled_in(r)
            r['profiled_in'] = rt
            r['why'] = why_short(summary(r['original'], rt), summary(r['compact'], rt), r['bflops_reduction'])
    if not rows:
        return None
    worst = min(rows, key=lambda r: r['efficiency'])
    rt = profiled_in(worst)
    if (worst['original'], rt) not in runners:
        return None
    return {'pair': worst['pair'], 'runtime': worst['runtime'], 'profiled_in': rt,
            'efficiency': worst['efficiency'], 'met': worst['met'], 'passes': PROFILE_PASSES,
            'original': summary(worst['original'], rt), 'compact': summary(worst['compact'], rt)}


# --- report -----------------------------------------------------------------------------------------------------

def print_results(rows, checks, models, title):
    print_table([['model', 'runtime', 'max |d objectness| vs PyTorch', 'load + check s']] +
                [[c.model, c.runtime, f"{c.max_objectness_diff:.1e}", f"{c.load_seconds:.1f}"] for c in checks],
                ' agreement before timing ')
    table = [['pair', 'runtime', 'BFLOPs', 'original ms', 'compact ms', 'speedup', 'BFLOPs red.', 'efficiency',
              f'>= {EFFICIENCY_GOAL}']]
    for r in rows:
        table.append([r['pair'] + (f" ({r['note']})" if r['note'] else ''), r['runtime'],
                      f"{r['bflops_original']:.2f} -> {r['bflops_compact']:.2f}", f"{r['original_ms']:.1f}",
                      f"{r['compact_ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['bflops_reduction']:.2f}x",
                      f"{r['efficiency']:.2f}", 'yes' if r['met'] else 'NO (why below)'])
    print_table(table, title)
    for r in rows:
        if not r['met']:
            how = '' if r.get('profiled_in') == r['runtime'] else f" [{r['runtime']} has no layer timer: " \
                                                                   f"{r.get('profiled_in', 'no')} profile]"
            print(f"  {r['pair']}, {r['runtime']}: efficiency {r['efficiency']:.2f}{how}: "
                  f"{r.get('why', 'no profile available')}")


def print_worst(worst):
    if not worst:
        return
    print(f"per-layer profile of the lowest efficiency ({worst['pair']}, {worst['runtime']}, "
          f"{worst['efficiency']:.2f}; times from {worst['profiled_in']}, median of {worst['passes']} passes):")
    for side in ('original', 'compact'):
        s = worst[side]
        print_table([['layer', 'type', 'filters', 'output', 'BFLOPs', 'ms', 'GFLOP/s']] +
                    [[t['layer'], t['type'], t['filters'], t['output'], f"{t['bflops']:.3f}", f"{t['ms']:.2f}",
                      f"{t['gflop_per_s']:.1f}" if t['gflop_per_s'] else ''] for t in s['top_layers']],
                    f" {side}: {s['total_ms']:.1f} ms profiled, convs {s['conv_ms']:.1f} ms, other "
                    f"{s['other_ms']:.1f} ms ")


# --- int8: FP32 vs INT8 in onnxruntime, latency and mAP -------------------------------------------------------

@dataclasses.dataclass
class Int8Model:
    """A model of the int8 part: `net` (models.Darknet, eval, CPU), the .data file it is scored (valid) and
    calibrated (train) on, its square input side, and its group (speedups compare with the group's first)."""
    key: str
    group: str
    net: object
    data: str
    size: int
    source: str


def coco128_data(tmp):
    """A .data file for coco128: train2017 calibrates, val2017 scores; the class count from its names file."""
    from utils.datasets import load_names
    names = os.path.join(COCO128, 'coco.names')
    path = os.path.join(tmp, 'coco128.data')
    with open(path, 'w') as f:
        f.write(f"classes = {len(load_names(names))}\ntrain = {os.path.join(COCO128, 'images', 'train2017')}\n"
                f"valid = {os.path.join(COCO128, 'images', 'val2017')}\nnames = {names}\n")
    return path


def int8_percents(text):
    try:
        percents = [float(v) for v in text.split(',') if v.strip()]
    except ValueError:
        percents = None
    if percents is None or not all(0 < p < 1 for p in percents):
        raise DarkslimError(f"--int8-percents {text!r}; expected a comma list of fractions in (0, 1)")
    return percents


def coco_int8_models(args, tmp, notes):
    """The COCO yolov3-tiny at --img-size, the pruned model of --real (when given) and the calibrated tiny
    prunes at --int8-percents; [] when absent."""
    import calibrate
    cfg, weights = args.real_base
    if not all(os.path.exists(p) for p in (cfg, weights, COCO128)):
        notes.append(f"int8: COCO rows skipped, {cfg} / {weights} / {COCO128} absent (../shared is not part of "
                     "a clone)")
        return []
    s, data = args.img_size, coco128_data(tmp)
    net = load_model(cfg, weights, img_size=s)
    models = [Int8Model('yolov3-tiny', 'coco128', net, data, s, f"{os.path.relpath(cfg, REPO)} + weights")]
    if args.real:
        models.append(Int8Model('yolov3-tiny pruned (--real)', 'coco128', load_model(*args.real, img_size=s), data,
                                s, f"{args.real[0]} + {args.real[1]}"))
    percents = int8_percents(args.int8_percents)
    if percents:
        images = calibrate.calibration_images(data, SURGERY_IMAGES, s, verbose=False)
        ls = prune_utils.get_layer_set(net.module_defs, 'tiny', net.in_channels)
        for pct in percents:
            plan = prune_utils.make_plan(net, ls, 'tiny', percent=pct, min_keep=1)
            compact, _ = calibrate.calibrated_compact(net, plan, images, verbose=False)
            models.append(Int8Model(f'yolov3-tiny tiny {pct}', 'coco128', compact.eval(), data, s,
                                    f"tiny prune --percent {pct} --calib {SURGERY_IMAGES} of the COCO weights "
                                    "(calibrated surgery, not fine-tuned)"))
    return models


def extra_int8_models(args):
    """--extra NAME CFG WEIGHTS DATA models at their cfg's size, grouped by DATA."""
    models = []
    for name, cfg, weights, data in args.extra:
        for p in (cfg, weights, data):
            if not os.path.isfile(p):
                raise DarkslimError(f"--extra {name}: {p}: no such file; expected CFG WEIGHTS DATA files")
        net = load_model(cfg, weights)
        models.append(Int8Model(name, data, net, data, max(net.img_size), f"{cfg} + {weights}"))
    return models


class OrtRun:
    """onnxruntime on one ONNX file: CPUExecutionProvider, `threads` intra-op threads, sequential."""

    def __init__(self, path, threads, x):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])
        self.feed = {'images': x}

    def run(self):
        t = time.perf_counter()
        self.session.run(None, self.feed)
        return time.perf_counter() - t


def int8_export_and_score(m, tmp, calib):
    """(FP32 path, INT8 path, {'fp32': (mAP50, mAP50_95), 'int8': ...}) of one Int8Model."""
    from calibrate import calibration_files
    from utils import quantize
    from utils.evaluate import evaluate
    from utils.onnx_export import OnnxDetector, export_onnx
    stem = os.path.join(tmp, 'int8-' + re.sub(r'[^A-Za-z0-9_.-]+', '_', m.key))
    fp32 = export_onnx(m.net, stem + '-fp32.onnx', img_size=(m.size, m.size)).path
    q = quantize.quantize_onnx(fp32, stem + '-int8.onnx', calibration_files(m.data, calib), m.size)
    maps = {}
    for kind, path in (('fp32', fp32), ('int8', q.path)):
        r = evaluate(OnnxDetector(path), m.data, rect=False, verbose=False)
        maps[kind] = (r['mAP50'], r['mAP50_95'])
    print(f"  {m.key}: mAP@0.5 FP32 {maps['fp32'][0]:.4f}, INT8 {maps['int8'][0]:.4f}", flush=True)
    return fp32, q.path, maps


def int8_part(args, tmp, notes):
    """FP32 vs INT8 rows (see the module doc), or None when onnx/onnxruntime are missing or no model is
    available. Timing: the 1-thread sessions in alternating rounds, then the all-core sessions (apart, so
    that spinning pool threads of one do not slow the others)."""
    from utils import quantize
    if args.calib is not None and args.calib < 1:
        raise DarkslimError(f"--calib {args.calib}; expected a positive number of images")
    why = quantize.missing()
    if why:
        notes.append(f"int8: skipped, {why}")
        return None
    print("int8: building, exporting, quantizing and scoring the models", flush=True)
    models = coco_int8_models(args, tmp, notes) + extra_int8_models(args)
    if not models:
        return None
    calib = args.calib or quantize.DEFAULT_CALIB
    threads = {'1t': 1, 'mt': os.cpu_count() or 1}
    runners, maps = {t: {} for t in threads}, {}
    for m in models:
        fp32, int8, maps[m.key] = int8_export_and_score(m, tmp, calib)
        x = torch.rand(1, m.net.in_channels, m.size, m.size, generator=torch.Generator().manual_seed(0)).numpy()
        for kind, path in (('fp32', fp32), ('int8', int8)):
            for t, n in threads.items():
                runners[t][m.key, kind] = OrtRun(path, n, x)
    med, times = {}, {}
    for t in threads:
        print(f"int8: timing {len(runners[t])} sessions at {threads[t]} threads", flush=True)
        for k, v in time_alternating(runners[t], args.runs, args.warmup).items():
            med[k + (t,)], times[k + (t,)] = statistics.median(v) * 1e3, [x * 1e3 for x in v]
    return {'method': quantize.DEFAULT_METHOD, 'float_heads': quantize.FLOAT_HEADS, 'calib_images': calib,
            'threads_all': threads['mt'], 'runs': args.runs,
            'goal': {'speedup_min': INT8_SPEEDUP_GOAL, 'map50_cost_max': INT8_MAP_COST},
            'rows': int8_rows(models, maps, med),
            'times_ms': {f"{k[0]} {k[1]} {k[2]}": v for k, v in times.items()}}


def int8_rows(models, maps, med):
    """One row per model: sizes, mAP FP32 / INT8, latencies (ms), speedups and the goals."""
    rows, first = [], {}
    for m in models:
        orig = first.setdefault(m.group, m.key)
        (f50, f95), (q50, q95) = maps[m.key]['fp32'], maps[m.key]['int8']
        ms = {f'{kind}_{t}_ms': med[m.key, kind, t] for kind in ('fp32', 'int8') for t in ('1t', 'mt')}
        vs_orig = med[orig, 'fp32', '1t'] / ms['int8_1t_ms']
        cost_max = INT8_MAP_COST['coco128' if m.group == 'coco128' else 'extra']
        params, bflops = model_info(m.net.defs, m.size, m.size)
        rows.append({'model': m.key, 'group': m.group, 'original': orig, 'source': m.source, 'img_size': m.size,
                     'params': params, 'bflops': bflops, 'mAP50_fp32': f50, 'mAP50_int8': q50,
                     'mAP50_95_fp32': f95, 'mAP50_95_int8': q95, 'mAP50_cost': f50 - q50, **ms,
                     'int8_speedup_1t': ms['fp32_1t_ms'] / ms['int8_1t_ms'],
                     'int8_speedup_mt': ms['fp32_mt_ms'] / ms['int8_mt_ms'],
                     'int8_vs_original_fp32_1t': vs_orig,
                     'map_cost_met': f50 - q50 <= cost_max,
                     'speedup_met': None if m.key == orig else vs_orig >= INT8_SPEEDUP_GOAL})
    return rows


def print_int8(res):
    n = res['threads_all']
    table = [['model', 'BFLOPs', 'mAP@0.5 FP32 -> INT8', 'cost ok', 'FP32 1t ms', 'INT8 1t ms', f'FP32 {n}t ms',
              f'INT8 {n}t ms', 'INT8 speedup 1t', f'INT8 speedup {n}t', 'vs original FP32 1t']]
    for r in res['rows']:
        goal = '' if r['speedup_met'] is None else \
            f" ({'>=' if r['speedup_met'] else 'NO, <'} {INT8_SPEEDUP_GOAL:g}x)"
        table.append([r['model'], f"{r['bflops']:.2f}", f"{r['mAP50_fp32']:.4f} -> {r['mAP50_int8']:.4f}",
                      'yes' if r['map_cost_met'] else 'NO', f"{r['fp32_1t_ms']:.1f}", f"{r['int8_1t_ms']:.1f}",
                      f"{r['fp32_mt_ms']:.1f}", f"{r['int8_mt_ms']:.1f}", f"{r['int8_speedup_1t']:.2f}x",
                      f"{r['int8_speedup_mt']:.2f}x", f"{r['int8_vs_original_fp32_1t']:.2f}x{goal}"])
    print_table(table, f" onnxruntime FP32 vs INT8, batch 1, median of {res['runs']} rounds ")
    print(f"INT8: {res['method']} calibration on {res['calib_images']} train images; speedups of a group's other "
          f"rows against its first (original) model's FP32 at 1 thread")


def build_models(args, parts, tmp, notes):
    models, pairs = {}, []
    if 'synthetic' in parts:
        pairs += synthetic_models(args, models, tmp)
    if 'real' in parts:
        pairs += real_models(args, models, tmp, notes)
    if 'demo' in parts:
        pairs += demo_models(args, models, tmp, notes)
    return models, pairs


def main(args):
    parts = comma_list(args.parts, PARTS, '--parts')
    runtimes = comma_list(args.runtimes, RUNTIMES, '--runtimes')
    if args.runs < 1 or args.warmup < 0:
        raise DarkslimError(f"--runs {args.runs} --warmup {args.warmup}; expected runs >= 1, warmup >= 0")
    torch.set_num_threads(1)
    load = load_average()
    t0, notes = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix='deploy-bench-') as tmp:
        print("building and writing the models", flush=True)
        models, pairs = build_models(args, parts, tmp, notes)
        runners, checks = load_runners(models, runtimes, tmp, notes)
        if runners:
            print(f"timing {len(runners)} (model, runtime) runners: {args.warmup} warm-up + {args.runs} rounds",
                  flush=True)
        t_timing = time.perf_counter()
        times = time_alternating(runners, args.runs, args.warmup) if runners else {}
        timing_s = time.perf_counter() - t_timing
        medians = {k: statistics.median(v) for k, v in times.items()}
        rows = pair_rows(pairs, models, medians, runtimes)
        worst = explain(rows, runners, models)
        for r in runners.values():
            r.close()
        int8 = int8_part(args, tmp, notes) if 'int8' in parts else None
    end = load_average()
    if models:
        print_results(rows, checks, models, f" batch 1, 1 thread, median of {args.runs} alternating rounds ")
        print_worst(worst)
    if int8:
        print_int8(int8)
    for n in notes:
        print(f"note: {n}")
    cores = os.cpu_count() or 1
    idle = max(load[0], end[0]) <= IDLE_PER_CORE * cores
    print(f"load average {load} -> {end} ({'idle' if idle else 'NOT idle'}: {cores} cores); "
          f"{time.perf_counter() - t0:.0f} s in all, {timing_s:.0f} s timing")
    out = {'img_size': args.img_size, 'runs': args.runs, 'warmup': args.warmup, 'threads': 1,
           'goal': {'efficiency_min': EFFICIENCY_GOAL, 'objectness_tolerance': OBJ_TOL},
           'models': {k: {'part': m.part, 'source': m.source, 'hw': list(m.hw), 'params': m.params,
                          'bflops': m.bflops,
                          'latency_ms': {rt: medians[k, rt] * 1e3 for rt in runtimes if (k, rt) in medians},
                          'times_ms': {rt: [t * 1e3 for t in times[k, rt]] for rt in runtimes if (k, rt) in times}}
                      for k, m in models.items()},
           'pairs': rows, 'met_everywhere': bool(rows) and all(r['met'] for r in rows),
           'agreement': [dataclasses.asdict(c) for c in checks], 'worst_case_profile': worst, 'notes': notes,
           'int8': int8, 'seconds': {'total': time.perf_counter() - t0, 'timing': timing_s}, 'idle': idle}
    write_result(args.result, out, load)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
