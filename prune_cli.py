"""The command-line side shared by normal_prune.py, regular_prune.py, shortcut_prune.py, tiny_prune.py and
layer_prune.py.

Each script is `get_args_parser()` (built with `add_prune_args`) + `main(args)` = `run(args, strategy)`:
resolve the inputs, load, prune (pruning.prune: layer set -> importance -> plan -> surgery -> calibration),
report (params, BFLOPs, .weights size, CPU latency, optional mAP on --data) and write the outputs. Library
errors name parameters (percent, min_keep, ...); `FLAGS` maps each to the flag a user typed.
"""
import copy
import json
import os
import time
from dataclasses import dataclass

from terminaltables import AsciiTable

import calibrate
import models
import prune_utils
import pruning
from importance import IMPORTANCES
from utils.errors import DarkslimError
from utils.evaluate import evaluate
from utils.torch_utils import select_device

DEFAULT_WEIGHTS = os.path.join('weights', 'last.pt')   # train.py's default output
DEFAULT_CALIB_STEPS = calibrate.DEFAULT_STEPS   # measured best on the real yolov3-tiny (bench/real_bench.py A)
DISTILL = {'loss': 'head', 'lr': 1e-4, 'batch': 8, 'bn': 'frozen'}     # distillation defaults (bench/slim_bench.py)
FLAGS = {'percent': '--percent', 'threshold': '--threshold', 'min_keep': '--min-keep', 'round_to': '--round-to',
         'layer_keep': '--layer-keep',
         'n_blocks': '--shortcuts', 'calib': '--calib', 'calib_steps': '--calib-steps', 'importance': '--importance',
         'plan': '--plan', 'strategy': 'the script', 'target_flops': '--target-flops', 'greedy': '--l1-greedy',
         'distill_iters': '--distill', 'steps': '--steps', 'iters': '--distill', 'loss': '--distill-loss',
         'lr': '--distill-lr', 'batch': '--distill-batch', 'bn': '--distill-bn'}
MODEL_PARAMS = {'n_blocks', 'plan'}    # errors about what the model holds: the message names the model file


def add_prune_args(p, strategy):
    """The options every prune script takes (regular and layer add --round-to, layer adds --shortcuts)."""
    p.add_argument('--cfg', help='model cfg (optional for a .pt that stores its cfg)')
    p.add_argument('--weights', help=f'sparse-trained .weights or .pt (default: {DEFAULT_WEIGHTS})')
    p.add_argument('--data', help='.data file: evaluate mAP of the original, loose and compact models')
    if strategy == 'layer':
        p.add_argument('--shortcuts', type=int, metavar='N',
                       help='remove the N candidate residual blocks with the lowest score (0: none; required '
                            'unless --plan)')
    how = p.add_mutually_exclusive_group()
    share = f"default {default_percent(strategy)}" if strategy != 'layer' else \
        'then also from the remaining network, in shortcut mode; default: no channel prune'
    how.add_argument('--percent', type=float, help=f"share of prunable channels to remove ({share})")
    how.add_argument('--threshold', type=float, help='remove channels scoring below this')
    how.add_argument('--target-flops', type=float, metavar='F',
                     help='remove the lowest-score channels until the BFLOPs (at --img-size) fall by at least F '
                          '(e.g. 0.35)' + ('; counts the blocks removed first' if strategy == 'layer' else ''))
    p.add_argument('--min-keep', type=int, metavar='K',
                   help='off by default: a layer the cut would empty stops the prune with an error; with K, such '
                        'a layer keeps its K highest-score channels and the prune goes on (other layers are '
                        'left as cut)')
    p.add_argument('--layer-keep', type=float, metavar='F',
                   help='a floor: every prunable layer keeps at least ceil(F x its channels) (its highest-score '
                        'ones, e.g. 0.1), so a global threshold cannot leave a wide layer with a channel or two '
                        'that fine-tuning cannot widen again; a layer the cut would empty keeps that share too')
    if strategy in ('regular', 'layer'):
        p.add_argument('--round-to', type=int, metavar='N',
                       help='round kept counts up to a multiple of N (8/16/32)' +
                            ('; default: a power of two' if strategy == 'regular' else ''))
    p.add_argument('--importance', default='gamma', choices=sorted(IMPORTANCES),
                   help='channel score: ' + '; '.join(f"{k}: {v.label}" for k, v in sorted(IMPORTANCES.items())))
    p.add_argument('--l1-greedy', action='store_true',
                   help='with --importance l1: filter norms without the input channels removed upstream (Li et '
                        'al. 2017, greedy); independent per layer by default')
    p.add_argument('--plan', metavar='FILE', help="replay the plan of an earlier prune (its .json or .pt) on the "
                                                 "same weights: the same outputs, choices not made again")
    p.add_argument('--img-size', type=int, help="input size for BFLOPs, latency and mAP (default: the cfg's)")
    p.add_argument('--calib', type=int, default=0, metavar='N',
                   help='calibrated surgery on N images of the --data train split (0: the plain beta fold); for '
                        'models that were not sparse-trained')
    p.add_argument('--calib-steps', default=','.join(DEFAULT_CALIB_STEPS),
                   help='with --calib: any of mean (measured means instead of act(beta)), refit (least-squares '
                        'refit of the convs that lost inputs), bn (BatchNorm statistics re-estimated)')
    p.add_argument('--distill', type=int, default=0, metavar='ITERS',
                   help='with --calib: then train the pruned model for ITERS steps to reproduce the original\'s '
                        'outputs on the calibration images, augmented; no labels are read (distill.py)')
    p.add_argument('--distill-loss', default=DISTILL['loss'], choices=('head', 'feature', 'head+feature'),
                   help='head: MSE on the raw head outputs weighted by the teacher\'s objectness; feature: MSE on '
                        'the kept channels entering the head convs')
    p.add_argument('--distill-lr', type=float, default=DISTILL['lr'], help='distillation learning rate (Adam)')
    p.add_argument('--distill-batch', type=int, default=DISTILL['batch'], help='distillation batch size')
    p.add_argument('--distill-bn', default=DISTILL['bn'], choices=('frozen', 'train'),
                   help='BatchNorm statistics during distillation: kept (frozen) or updated (train)')
    p.add_argument('--steps', type=int, default=1, metavar='K',
                   help='with --target-flops: reach it in K equal steps, each prune -> calibrate -> distill '
                        '(ITERS/K each)')
    p.add_argument('--batch-size', type=int, default=16, help='batch size for mAP evaluation')
    p.add_argument('--device', default='cpu', help='cpu | cuda | cuda:N (mAP evaluation)')
    p.add_argument('--latency-runs', type=int, default=5, help='timed CPU forward passes per model (0 = skip)')
    p.add_argument('--out', help='output prefix (default weights/<cfg stem>-<strategy>[-s<N>]-<percent, '
                                 't<threshold> or f<target>>[-<importance>][-pow2 | -r<N>])')
    return p


def default_percent(strategy):
    """The share of channels removed without --percent/--threshold (none for a layer prune: it removes blocks,
    and thins channels only when asked)."""
    return {'tiny': 0.3, 'layer': None}.get(strategy, 0.5)


def round_to_of(args, strategy):
    """regular: --round-to N, or 'pow2' without it; layer: --round-to N or None; other strategies never round."""
    if strategy == 'regular':
        return 'pow2' if args.round_to is None else args.round_to
    return getattr(args, 'round_to', None) if strategy == 'layer' else None


@dataclass
class PruneInputs:
    """What a prune run reads and writes, resolved from the command line (the arguments are not modified)."""
    cfg: str
    weights: str
    prefix: str
    percent: float


def _default_prefix(args, strategy, weights, percent):
    stem = os.path.splitext(os.path.basename(args.cfg or weights))[0]
    parts = [stem, strategy]
    if strategy == 'layer':
        parts.append('plan' if args.shortcuts is None else f"s{args.shortcuts}")
    if args.target_flops is not None:
        parts.append(f"f{args.target_flops:g}")
    elif percent is not None or args.threshold is not None:
        parts.append(f"{percent:g}" if percent is not None else f"t{args.threshold:g}")
    if args.importance != 'gamma':
        parts.append(args.importance + ('-greedy' if args.l1_greedy else ''))
    round_to = round_to_of(args, strategy)
    rounding = '' if round_to is None else '-pow2' if round_to == 'pow2' else f"-r{round_to}"
    return os.path.join('weights', '-'.join(parts) + rounding)


def _default_weights(weights):
    if weights is not None:
        return weights
    if not os.path.isfile(DEFAULT_WEIGHTS):
        raise DarkslimError(f"no --weights given and {DEFAULT_WEIGHTS} (train.py's default output) does not "
                            "exist; expected --cfg C --weights W (.weights or .pt)")
    return DEFAULT_WEIGHTS


def resolve_inputs(args, strategy):
    """PruneInputs: with no --weights, train.py's weights/last.pt; with neither --percent nor --threshold, the
    strategy's default percent; the output prefix is --out, else one under weights/. Outputs may never
    overwrite inputs."""
    weights = _default_weights(args.weights)
    if not os.path.isfile(weights):
        raise DarkslimError(f"{weights}: no such weights file")
    if args.cfg is None and not models.is_torch_file(weights):
        raise DarkslimError(f"{weights}: darknet .weights store no cfg; expected --cfg C")
    select_device(args.device)                        # a bad --device fails now, before any work
    if args.calib < 0:
        raise DarkslimError(f"--calib {args.calib}; expected a number of images >= 0")
    if args.calib and not args.data:
        raise DarkslimError(f"--calib {args.calib} needs --data (its train split gives the calibration images)")
    if strategy == 'layer' and args.shortcuts is None and args.plan is None:
        raise DarkslimError("--shortcuts N is required (or --plan FILE to replay a layer prune)")
    percent = args.percent
    if percent is None and args.threshold is None and args.target_flops is None and args.plan is None:
        percent = default_percent(strategy)
    prefix = args.out or _default_prefix(args, strategy, weights, percent)
    for ext in prune_utils.OUTPUT_EXTS:
        for src in (args.cfg, weights, args.plan):
            if src is not None and os.path.abspath(prefix + ext) == os.path.abspath(src):
                raise DarkslimError(f"--out {prefix}: {prefix + ext} is an input; expected another prefix "
                                    "(inputs are never overwritten)")
    return PruneInputs(args.cfg, weights, prefix, percent)


def cli_error(error, source):
    """A library DarkslimError shown with the CLI's flags; errors about what the model holds name its file."""
    text = error.shown(FLAGS)
    return DarkslimError(f"{source}: {text}" if error.param in MODEL_PARAMS else text)


def load_plan(path):
    """The plan stored by a prune: its .json ('plan') or its .pt ('prune')."""
    if path is None:
        return None
    if models.is_torch_file(path):
        stored = models.read_checkpoint(path).get('prune')
    else:
        try:
            with open(path) as f:
                stored = json.load(f).get('plan')
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise DarkslimError(f"{path}: not a prune's .json; expected the PREFIX.json a prune wrote") from None
    if not isinstance(stored, dict):
        raise DarkslimError(f"{path}: holds no prune plan; expected the PREFIX.json or PREFIX.pt a prune wrote")
    return stored


def prune_options(args, strategy, inputs):
    calib_steps = tuple(s for s in args.calib_steps.split(',') if s)
    return pruning.PruneOptions(inputs.percent, args.threshold, args.min_keep, round_to_of(args, strategy),
                                getattr(args, 'shortcuts', None), args.importance, calib_steps, load_plan(args.plan),
                                args.target_flops, args.l1_greedy, img_hw=(args.img_size,) * 2 if args.img_size
                                else None, distill_iters=args.distill, steps=args.steps,
                                distill={'loss': args.distill_loss, 'lr': args.distill_lr, 'batch': args.distill_batch,
                                         'bn': args.distill_bn, 'device': select_device(args.device),
                                         'img_size': args.img_size}, layer_keep=args.layer_keep)


def img_hw(model, img_size):
    return (img_size, img_size) if img_size else tuple(model.img_size)


def evaluate_map(model, data, img_size, batch_size, device):
    """{'mAP50', 'mAP50_95'} of `model` on the .data file's valid images (on `device`; the model is not moved)."""
    dev = select_device(device)
    m = model if dev.type == 'cpu' else copy.deepcopy(model).to(dev)
    r = evaluate(m, data, img_size=img_size, batch_size=batch_size, verbose=False)
    return {'mAP50': r['mAP50'], 'mAP50_95': r['mAP50_95']}


def metrics_rows(before, after, maps=None):
    """[Metric, Before, After] rows for the report table."""
    def fmt_lat(s):
        return 'skipped' if s is None else f"{s * 1e3:.1f} ms"
    rows = [['Metric', 'Before', 'After'],
            ['params', f"{before['params']:,}", f"{after['params']:,} ({after['params'] / before['params']:.1%})"],
            ['BFLOPs', f"{before['bflops']:.3f}", f"{after['bflops']:.3f} ({after['bflops'] / before['bflops']:.1%})"],
            ['weights file', f"{before['weights_bytes'] / 1e6:.2f} MB", f"{after['weights_bytes'] / 1e6:.2f} MB"],
            ['CPU latency (batch 1, fused, median)', fmt_lat(before['latency_s']), fmt_lat(after['latency_s'])]]
    if before['latency_s'] and after['latency_s']:
        rows[-1][2] += f" ({before['latency_s'] / after['latency_s']:.2f}x)"
    if maps:
        for key, label in (('mAP50', 'mAP@0.5'), ('mAP50_95', 'mAP@0.5:0.95')):
            rows.append([label, f"{maps['original'][key]:.4f}", f"{maps['compact'][key]:.4f}"])
            rows.append([f"{label} (loose model)", '', f"{maps['loose'][key]:.4f}"])
            if 'beta_fold' in maps:
                rows.append([f"{label} (beta fold, uncalibrated)", '', f"{maps['beta_fold'][key]:.4f}"])
    return rows


def evaluate_and_report(args, strategy, nets, inputs, prune_s):
    """Measure original and compact (params, BFLOPs, .weights size, CPU latency), evaluate mAP of every model in
    `nets` ({'original', 'loose', 'compact'}) when --data is given, print the Metric | Before | After table;
    returns the JSON report."""
    hw = img_hw(nets['original'], args.img_size)
    before = prune_utils.measure(nets['original'], hw, args.latency_runs)
    after = prune_utils.measure(nets['compact'], hw, args.latency_runs)
    maps = None
    if args.data:
        size = args.img_size or max(hw)
        maps = {name: evaluate_map(m, args.data, size, args.batch_size, args.device) for name, m in nets.items()}
    print(AsciiTable(metrics_rows(before, after, maps), f" {strategy} prune ").table)
    if maps is None:
        print('mAP skipped: no --data given')
    return {'strategy': strategy, 'cfg': inputs.cfg, 'weights': inputs.weights, 'img_size': list(hw),
            'before': before, 'after': after, 'map': maps, 'prune_seconds': prune_s}


def stage_report(args, result, maps):
    """Per stage that ran (beta fold, each calibration step, distillation): seconds and, with --data, mAP; the
    last stage is the written model. Printed as a table; returns the JSON rows."""
    if not result.stages:
        return None
    seconds = (result.calibration or {}).get('seconds', {})
    names = list(result.stages) + [result.final_stage]
    size = args.img_size or max(result.nets['original'].img_size)
    rows = []
    for name in names:
        row = {'stage': name, 'seconds': seconds.get('fold' if name == 'beta_fold' else name)}
        if maps:      # the written model and the beta fold were evaluated with the report; the others now
            row.update(maps.get('compact' if name == names[-1] else name) or
                       evaluate_map(result.stages[name], args.data, size, args.batch_size, args.device))
        rows.append(row)
    table = [['stage', 'seconds', 'mAP@0.5', 'mAP@0.5:0.95']]
    table += [[r['stage'], '' if r['seconds'] is None else f"{r['seconds']:.1f}", f"{r.get('mAP50', float('nan')):.4f}",
               f"{r.get('mAP50_95', float('nan')):.4f}"] for r in rows]
    print(AsciiTable(table, ' stages ').table)
    return rows


def sparsity_check(weights, strategy):
    """{'sparse_trained', 'trained_mode', 'warning'} from the training options a .pt stores: a prune ranks scores
    of all prunable layers together, which is only fair for |gamma| when exactly those were regularized (-sr
    for the same layer set). None for darknet .weights (they carry no training options)."""
    if not models.is_torch_file(weights):
        return None
    saved = models.checkpoint_args(weights)
    if not saved:
        return None
    wanted = pruning.MODE_OF[strategy]
    trained = prune_utils.MODES.get(saved.get('prune', 0), str(saved.get('prune'))) if saved.get('sr') else None
    warning = None
    if trained is None:
        warning = (f"warning: {weights} was not sparse-trained (train.py without -sr): channels are ranked by "
                   f"|gamma| of a normally trained model, so removed channels are alive (expect a large mAP "
                   f"drop before fine-tuning)")
    elif trained != wanted:
        warning = (f"warning: {weights} was sparse-trained for the {trained} layer set (-sr --prune "
                   f"{saved.get('prune')}), not the {wanted} one this prune uses: regularized and unregularized "
                   f"|gamma| are ranked together")
    if warning:
        print(warning)
    return {'sparse_trained': trained is not None, 'trained_mode': trained, 'warning': warning}


def print_plan(result):
    """The layer list and plan (for a layer prune: the candidate blocks, then the channel prune if any)."""
    if result.strategy == 'layer':
        print(result.plan.table())
        if result.plan.channel_plan is not None:
            print('channel prune of the block-pruned network (its layer numbers):')
            print(result.layer_set.describe())
            print(result.plan.channel_plan.table())
    else:
        print(result.layer_set.describe())
        print(result.plan.table())
    for line in result.warnings:
        print(line)
    if result.calibration:
        print(f"calibration: {result.calibration['images']} train images, steps {result.calibration['steps']}")


def run(args, strategy):
    """A prune script's whole job ('normal' | 'regular' | 'shortcut' | 'tiny' | 'layer'): load, plan and surgery
    (a bad plan fails before anything is printed or written), print the layer list and plan, report, write
    PREFIX.{cfg,weights,pt,json} and PREFIX-channels.png. Returns {ext: path}."""
    t0 = time.perf_counter()
    inputs = resolve_inputs(args, strategy)
    model = models.load_model(inputs.cfg, inputs.weights, img_size=args.img_size)
    options = prune_options(args, strategy, inputs)
    images = calibrate.calibration_images(args.data, args.calib, args.img_size or max(model.img_size),
                                          verbose=False) if args.calib else None
    files = calibrate.calibration_files(args.data, args.calib) if args.calib and args.distill else None
    try:
        result = pruning.prune(model, strategy, options, images, files)
    except DarkslimError as e:
        raise cli_error(e, inputs.cfg or inputs.weights) from None
    sparsity = sparsity_check(inputs.weights, strategy)
    print_plan(result)
    report = evaluate_and_report(args, strategy, result.nets, inputs, time.perf_counter() - t0)
    report['sparsity_training'] = sparsity
    report['calibration'] = result.calibration
    report['stages'] = stage_report(args, result, report['map'])
    report['importance'] = options.importance
    report['warnings'] = result.warnings
    paths = prune_utils.write_outputs(inputs.prefix, result.nets['compact'], result.plan, report)
    print('wrote ' + ', '.join(paths.values()))
    return paths
