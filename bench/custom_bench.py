"""Slim your own detector, measured: the COCO yolov3-tiny fine-tuned to BCCD (3 classes, real microscope images),
sparse-trained, pruned by half and by 70 % of its parameters, fine-tuned, with and without distillation.

    python -m bench.custom_bench [--epochs E] [--ft-epochs F] [--work-dir DIR [--reuse]]
    python -m bench.custom_bench --markdown          # the README table from bench/results/custom.json

Needs ../shared/datasets/bccd and ../shared/models/yolov3-tiny-coco (skips with a message otherwise). Everything
at --img-size (416). Splits: training on BCCD `train` (205 images); every hyperparameter (E, F, lr, s, the
s schedule, kd) was chosen on `val` (87 images) in separate runs; `test` (72 images) is read once per model at
the end, never to choose anything.

 1. convert: data/convert.py voc (the VOC split lists) -> Darknet labels, lists, .names, .data
 2. dense: the COCO cfg for 3 classes (models.py make-cfg), the COCO weights loaded where shapes match (the
    convs feeding [yolo] start fresh), E epochs on train
 3. sparse: -sr --prune 2 from the dense model, E epochs, s from --s to --s * --s-final (linear), without and
    with the dense model as --teacher; the saved BN statistics re-estimated on 64 train images (train.py's
    default with -sr)
 4. prune (tiny_prune's strategy; calibrated surgery on --calib train images): each sparse model at the
    smallest --percent that removes >= 50 % and >= 70 % of the dense parameters, every layer keeping at least
    --layer-keep of its channels (chosen on val: a layer left with 1-2 channels starves every head after it,
    and fine-tuning cannot widen it again); for comparison the dense
    model pruned post-training (no sparse training: importance `act`, calibrated, the same floor) to the same
    BFLOPs (post-SHARE) and to the same share of parameters (post-pSHARE)
 5. fine-tune each prune F epochs: the plain sparse model's prunes and the post-pSHARE prunes without and with
    --teacher (the dense model), the others with it
 6. every model: params, BFLOPs, CPU latency (batch 1, fused, all timed alternately, --threads), mAP@0.5 and
    @0.5:0.95 on test; each fine-tuned prune run by the original darknet (`detector test` finds cells; its
    [yolo] buffers vs ours) and OpenCV on a test image; docs/bccd-dense-vs-pruned.png: the dense and the
    70 % prune's detections on the first test image, side by side (detect.py's drawing).
Writes bench/results/custom.json.
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch

import calibrate
import pruning
import prune_utils
from bench.common import REPO, RESULTS, load_average, print_table, write_result
from bench.real_bench import opencv_max_diff
from detect import detect
from models import load_model, make_cfg, model_info
from training import TrainConfig, fit
from utils import darknet_build, darknet_lib
from utils.darknet_weights import save_weights
from utils.datasets import image_tensor, imread, letterbox, list_images, parse_data_cfg
from utils.errors import cli_main
from utils.evaluate import evaluate
from utils.io import write_bytes_atomic
from utils.latency import latencies
from utils.parse_config import parse_cfg, write_cfg

SHARED = os.path.join(os.path.dirname(REPO), 'shared')
BCCD = os.path.join(SHARED, 'datasets', 'bccd', 'BCCD')
MODEL_DIR = os.path.join(SHARED, 'models', 'yolov3-tiny-coco')
PICTURE = os.path.join(REPO, 'docs', 'bccd-dense-vs-pruned.png')


def add_bccd_args(p):
    """The options every BCCD bench shares: data, base model, the dense and sparse trainings, the prunes."""
    p.add_argument('--voc', default=BCCD, help='the VOC root to convert (default: ../shared BCCD)')
    p.add_argument('--base-cfg', default=os.path.join(MODEL_DIR, 'yolov3-tiny.cfg'))
    p.add_argument('--base-weights', default=os.path.join(MODEL_DIR, 'yolov3-tiny.weights'))
    p.add_argument('--img-size', type=int, default=416)
    p.add_argument('--epochs', type=int, default=12, help='E: dense and sparse-training epochs')
    p.add_argument('--lr0', type=float, default=0.01, help='learning rate of the dense and sparse runs')
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--s', type=float, default=0.15, help='sparsity rate at the start of sparse training')
    p.add_argument('--s-final', type=float, default=0.2, help='the rate decays linearly to s * S_FINAL')
    p.add_argument('--params', type=float, nargs='+', default=[0.5, 0.7],
                   help='shares of the dense parameters each prune removes (at least)')
    p.add_argument('--calib', type=int, default=64, help='calibration images (train split)')
    p.add_argument('--min-keep', type=int, default=8, help='channels kept in a layer the cut would empty')
    p.add_argument('--layer-keep', type=float, default=0.1,
                   help='share of every prunable layer kept at least (tiny_prune --layer-keep; 0: no floor)')
    p.add_argument('--threads', type=int, default=2, help='torch threads for training and latency')
    p.add_argument('--work-dir', help='keep the converted data and trained models here (default: a temp folder)')
    p.add_argument('--reuse', action='store_true',
                   help='with --work-dir: reuse trainings finished there, and prunes whose layer widths match')
    return p


def get_args_parser():
    p = add_bccd_args(argparse.ArgumentParser(description=__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument('--ft-epochs', type=int, default=6, help='F: fine-tuning epochs of each prune')
    p.add_argument('--ft-lr0', type=float, default=0.005, help='learning rate of the fine-tuning runs')
    p.add_argument('--kd', type=float, default=1.0, help='weight of the distillation term (--teacher runs)')
    p.add_argument('--latency-runs', type=int, default=30)
    p.add_argument('--results-dir', default=RESULTS, help='where custom.json goes')
    p.add_argument('--picture', default=PICTURE, help='the side-by-side PNG (empty: none)')
    p.add_argument('--markdown', action='store_true', help='print the README table from custom.json and exit')
    return p


@dataclass
class Row:
    """One model of the bench: how it was made and what it measures (mAP on test, filled at the end)."""
    name: str
    made: str
    cfg: str
    weights: str
    params: int = 0
    bflops: float = 0.0
    train_seconds: float = None
    val_mAP50: float = None
    test: dict = None
    latency_ms: float = None
    darknet: dict = None


def convert(work, voc):
    """data/convert.py voc -> (the .data file, its test split list). A kept work dir is converted once."""
    out = os.path.join(work, 'bccd')
    data = os.path.join(out, 'bccd.data')
    if not os.path.isfile(data):
        subprocess.run([sys.executable, os.path.join(REPO, 'data', 'convert.py'), 'voc', voc, '--out', out],
                       check=True, cwd=REPO)
    return data


def eval_data(work, data):
    """A .data file whose valid= is the test split (what test.py evaluates): read only at the end."""
    d = parse_data_cfg(data)
    if not d.get('test'):
        raise SystemExit(f"{data}: no test= split; the bench reports on test")
    path = os.path.join(work, 'bccd-test.data')
    with open(path, 'w') as f:
        f.write(f"classes={d['classes']}\ntrain={d['train']}\nvalid={d['test']}\nnames={d['names']}\n")
    return path


def train(work, name, args, cfg, weights, data, epochs, lr0, **extra):
    """One train.py run through the training library -> (its last.pt, val mAP@0.5 of the last epoch, seconds)."""
    out = os.path.join(work, name)
    last = os.path.join(out, 'last.pt')
    if args.reuse and os.path.isfile(last):                  # a finished run of an earlier, cut bench run
        with open(os.path.join(out, 'results.csv')) as f:
            rows = list(csv.DictReader(f))
        print(f"reusing {last}", flush=True)
        return last, float(rows[-1]['mAP50']), round(sum(float(r['train_seconds']) for r in rows), 1)
    config = TrainConfig(cfg=cfg, data=data, weights=weights, epochs=epochs, batch_size=args.batch_size,
                         img_size=args.img_size, lr0=lr0, warmup_epochs=min(1.0, epochs / 4), workers=1,
                         out_dir=out, eval_interval=1000, cache=True, **extra)
    t = time.perf_counter()
    summary = fit(config)
    seconds = round(time.perf_counter() - t, 1)
    val = (summary.get('metrics') or {}).get('mAP50')
    print(f"{name}: {epochs} epochs in {seconds:.0f} s; val mAP@0.5 {val}", flush=True)
    return last, val, seconds


def write_model(model, path_stem):
    """Darknet cfg + weights of `model` -> (cfg, weights) paths."""
    cfg, weights = path_stem + '.cfg', path_stem + '.weights'
    write_cfg(cfg, model.defs)
    save_weights(model, weights)
    return cfg, weights


def percent_for_params(model, share, size, min_keep, layer_keep=None, importance='gamma', images=None,
                       scores=None):
    """The smallest tiny-prune --percent (to 1e-3) whose compact model has at most (1 - share) of `model`'s
    parameters under `importance` (its `scores` when given, else scored once on `images`, its calibration
    images), by bisection (more percent never keeps more parameters)."""
    layer_set = prune_utils.get_layer_set(model.module_defs, 'tiny', model.in_channels)
    if scores is None:
        scores = prune_utils.score_channels(model, layer_set, importance, images)
    limit = (1 - share) * model_info(model.defs, size, size)[0]

    def params_at(p):
        plan = prune_utils.plan_from_scores(layer_set, 'tiny', scores, percent=p, min_keep=min_keep,
                                            layer_keep=layer_keep)
        return model_info(prune_utils.compact_defs(model, plan), size, size)[0]

    lo, hi = 0.0, 0.999
    if params_at(hi) > limit:
        raise SystemExit(f"no --percent removes {share:.0%} of the parameters (importance {importance}, min-keep "
                         f"{min_keep}, layer-keep {layer_keep})")
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if params_at(mid) <= limit else (mid, hi)
    return math.ceil(hi * 1e4) / 1e4                  # rounded up: the percent still meets the limit


def reused_prune(args, model, stem, plan):
    """With --reuse: the prune already written at `stem` (cfg, weights) when its layer widths are `plan`'s (a
    global threshold keeps each layer's highest scores, so equal widths are the same channels), else None."""
    cfg, weights = stem + '.cfg', stem + '.weights'
    if not (args.reuse and os.path.isfile(cfg) and os.path.isfile(weights)):
        return None
    widths = [d.get('filters') for d in prune_utils.compact_defs(model, plan)]
    if widths != [d.get('filters') for d in parse_cfg(cfg)]:
        return None
    print(f"reusing {cfg}", flush=True)
    return cfg, weights


def replayed_prune(model, plan, images, stem, args, info):
    """`plan` written at `stem` (reused with --reuse when the widths match; else replayed by pruning.prune,
    calibrated on `images`) -> (cfg, weights, info)."""
    reused = reused_prune(args, model, stem, plan)
    if reused:
        return (*reused, {**info, 'reused': True})
    t = time.perf_counter()
    result = pruning.prune(model, 'tiny', pruning.PruneOptions(plan=plan.to_json()), images=images)
    info = {**info, 'surgery_seconds': round(time.perf_counter() - t, 1)}
    return (*write_model(result.nets['compact'], stem), info)


def prune_sparse(sparse, share, images, args, stem):
    """The sparse model pruned (tiny, calibrated) to remove >= `share` of its parameters -> (cfg, weights, info)."""
    layer_keep = args.layer_keep or None
    layer_set = prune_utils.get_layer_set(sparse.module_defs, 'tiny', sparse.in_channels)
    scores = prune_utils.score_channels(sparse, layer_set, 'gamma')
    percent = percent_for_params(sparse, share, args.img_size, args.min_keep, layer_keep, scores=scores)
    plan = prune_utils.make_plan(sparse, layer_set, 'tiny', percent=percent, min_keep=args.min_keep,
                                 layer_keep=layer_keep, img_hw=(args.img_size, args.img_size), scores=scores)
    return replayed_prune(sparse, plan, images, stem, args, {'percent': percent})


def post_training_plan(dense, images, args, target_flops=None, share=None):
    """The plan of a post-training prune (importance act, scored once on `images`): removing `target_flops` of
    the BFLOPs, or at the smallest --percent removing >= `share` of the parameters -> (Plan, percent or None)."""
    layer_set = prune_utils.get_layer_set(dense.module_defs, 'tiny', dense.in_channels)
    layer_keep = args.layer_keep or None
    scores = prune_utils.score_channels(dense, layer_set, 'act', images)
    percent = None if share is None else percent_for_params(dense, share, args.img_size, args.min_keep, layer_keep,
                                                            'act', scores=scores)
    plan = prune_utils.make_plan(dense, layer_set, 'tiny', percent=percent, min_keep=args.min_keep,
                                 importance='act', target_flops=target_flops, img_hw=(args.img_size, args.img_size),
                                 layer_keep=layer_keep, scores=scores)
    return plan, percent


def prune_post_training(dense, images, args, stem, target_flops=None, share=None):
    """The dense model pruned without sparse training (importance act, calibrated): to remove `target_flops` of
    its BFLOPs, or at the smallest --percent removing >= `share` of its parameters -> (cfg, weights, info). The
    channels are scored once; the surgery replays that plan."""
    plan, percent = post_training_plan(dense, images, args, target_flops, share)
    info = {'percent': percent, 'target_flops': target_flops and round(target_flops, 4), 'importance': 'act'}
    return replayed_prune(dense, plan, images, stem, args, info)


def skipped(bench, args):
    """True (and a line saying why) when the dataset or the base model is missing: the bench needs ../shared."""
    missing = [p for p in (args.voc, args.base_cfg, args.base_weights) if not os.path.exists(p)]
    if missing:
        print(f"{bench}: skipped, missing {', '.join(missing)} (needs ../shared)")
    return bool(missing)


def first_test_image(data):
    return list_images(parse_data_cfg(data)['test'])[0]


def runtimes():
    """{name: DarknetRuntime or the reason it is missing}: Debian's original darknet and AlexeyAB's (built from
    ../shared into the cache)."""
    out = {'darknet': darknet_lib.DEBIAN.missing() or darknet_lib.DEBIAN}
    alexeyab, why = darknet_build.alexeyab()
    out['alexeyab'] = alexeyab or why
    return out


def darknet_check(model, cfg, weights, image, names, workdir):
    """Each darknet on `cfg` + `weights`: its [yolo] buffers vs our raw heads on `image` letterboxed to the cfg's
    size (max |difference|) and `darknet detector test` -> {class name: detections at 0.25}; OpenCV's importer
    vs our forward. A runtime that is missing here gets the reason instead."""
    size = model.defs[0]['height'], model.defs[0]['width']
    x = image_tensor(letterbox(imread(image), size)[0])[None]
    out = {'opencv_max_diff': round(opencv_max_diff(model, cfg, weights, x), 6)}
    with torch.no_grad():
        raw = model.eval()(x)[1]
    heads = [(model.module_list[i].scale_x_y, model.module_list[i].new_coords) for i in model.yolo_layers]
    with open(os.path.join(workdir, 'names.txt'), 'w') as f:
        f.write('\n'.join(names) + '\n')
    with open(os.path.join(workdir, 'run.data'), 'w') as f:
        f.write(f"classes={len(names)}\nnames=names.txt\n")
    for name, rt in runtimes().items():
        if isinstance(rt, str):
            out[name] = f"skipped: {rt}"
            continue
        bufs, _ = darknet_lib.darknet_run(cfg, weights, os.path.join(workdir, name), x=x.numpy(), runtime=rt)
        found, _ = darknet_lib.darknet_detect(rt, os.path.join(workdir, 'run.data'), cfg, weights, image, workdir)
        diff = darknet_lib.max_yolo_diff(raw, [bufs[i] for i in sorted(bufs)], heads)
        out[name] = {'yolo_max_diff': float(f"{diff:.3g}"),
                     'detections': {n: sum(d.name == n for d in found) for n in sorted({d.name for d in found})}}
    return out


def side_by_side(models, image, names, out, size):
    """One PNG: `image` with each (title, model)'s detections (detect.py's drawing, conf 0.25), side by side."""
    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (title, model) in enumerate(models):
            r = detect(model, image, os.path.join(tmp, str(k)), names=names, img_size=size, verbose=False)[0]
            img = cv2.imread(r['out'])
            counts = ', '.join(f"{n} {c}" for c, n in r['counts'].items())
            bar = np.full((36, img.shape[1], 3), 255, np.uint8)
            cv2.putText(bar, f"{title}: {counts}", (8, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
            panels.append(np.vstack([bar, img]))
    ok, buf = cv2.imencode('.png', np.hstack(panels))
    write_bytes_atomic(out, buf.tobytes())
    print(f"wrote {out}")


def measure(rows, test_data, args):
    """Fill params, BFLOPs, latency (all timed alternately) and test mAP of every row: the one read of test."""
    nets = [load_model(r.cfg, r.weights) for r in rows]
    for r, m in zip(rows, nets):
        r.params, bflops = model_info(m.defs, args.img_size, args.img_size)
        r.bflops = round(bflops, 3)
    if args.latency_runs:
        lat, _ = latencies(nets, (args.img_size, args.img_size), args.latency_runs, warmup=2)
        for r, t in zip(rows, lat):
            r.latency_ms = round(t * 1e3, 2)
    for r, m in zip(rows, nets):
        res = evaluate(m, test_data, img_size=args.img_size, batch_size=16, verbose=False)
        r.test = {'mAP50': round(res['mAP50'], 4), 'mAP50_95': round(res['mAP50_95'], 4)}
        print(f"{r.name}: test mAP@0.5 {r.test['mAP50']:.4f}", flush=True)
    return nets


def table(rows):
    dense = rows[0]
    out = [['model', 'made', 'params', 'BFLOPs', 'latency ms', 'speed-up', 'test mAP@0.5', 'mAP@.5:.95',
            'Δ mAP@0.5']]
    for r in rows:
        speed = f"{dense.latency_ms / r.latency_ms:.2f}x" if r.latency_ms else ''
        out.append([r.name, r.made, f"{r.params:,} ({r.params / dense.params - 1:+.0%})", r.bflops,
                    r.latency_ms or '', speed, f"{r.test['mAP50']:.3f}", f"{r.test['mAP50_95']:.3f}",
                    f"{r.test['mAP50'] - dense.test['mAP50']:+.3f}"])
    return out


def markdown(folder=RESULTS):
    stored = json.load(open(os.path.join(folder, 'custom.json')))
    rows = [Row(**r) for r in stored['rows']]
    t = table(rows)
    print('| ' + ' | '.join(t[0]) + ' |\n|' + '---|' * len(t[0]))
    for line in t[1:]:
        print('| ' + ' | '.join(str(c) for c in line) + ' |')


def train_dense(work, args, data):
    """Stage 2: the base cfg for the data's class count, the base weights where shapes match, E epochs -> (its
    last.pt, val mAP@0.5, seconds)."""
    cfg = os.path.join(work, 'yolov3-tiny-bccd.cfg')
    if not os.path.isfile(cfg):
        make_cfg(args.base_cfg, parse_data_cfg(data)['classes'], cfg)
    return train(work, 'dense', args, cfg, args.base_weights, data, args.epochs, args.lr0)


def pipeline(work, args, data):
    """Stages 2-5 -> rows (dense first), hyperparameters and seconds; each row's model written as cfg + weights."""
    rows, seconds = [], {}
    dense_pt, val, seconds['dense'] = train_dense(work, args, data)
    dense = load_model(None, dense_pt)
    rows.append(Row('dense', f"COCO yolov3-tiny, {args.epochs} epochs", *write_model(dense, f"{work}/dense"),
                    train_seconds=seconds['dense'], val_mAP50=val))
    teacher = {'teacher': [rows[0].cfg, rows[0].weights], 'kd': args.kd}
    sr = {'sr': True, 's': args.s, 's_final': args.s_final, 'prune': 2}
    sparse = {}
    for tag, extra in (('sparse', {}), ('sparse-kd', teacher)):
        pt, val, seconds[tag] = train(work, tag, args, None, dense_pt, data, args.epochs, args.lr0, **sr, **extra)
        sparse[tag] = load_model(None, pt)
        rows.append(Row(tag, f"-sr {args.epochs} epochs" + (' --teacher dense' if extra else ''),
                        *write_model(sparse[tag], f"{work}/{tag}"), train_seconds=seconds[tag], val_mAP50=val))
    images = calibrate.calibration_images(data, args.calib, args.img_size)
    dense_bflops = model_info(dense.defs, args.img_size, args.img_size)[1]
    for share in args.params:
        for tag, model in sparse.items():
            p_cfg, p_weights, info = prune_sparse(model, share, images, args, f"{work}/{tag}-{share:g}")
            rows.append(Row(f"{tag}-{share:g}", f"tiny_prune --percent {info['percent']}"
                            + (f" --layer-keep {args.layer_keep:g}" if args.layer_keep else ''), p_cfg, p_weights))
            fts = (('ft', {}), ('ft-kd', teacher)) if tag == 'sparse' else (('ft-kd', teacher),)
            rows += [finetune(work, f"{tag}-{share:g}", ft_tag, extra, p_cfg, p_weights, data, args, seconds)
                     for ft_tag, extra in fts]
        removed = 1 - model_info(load_model(f"{work}/sparse-{share:g}.cfg").defs, args.img_size,
                                 args.img_size)[1] / dense_bflops
        floor = f" --layer-keep {args.layer_keep:g}" if args.layer_keep else ''
        for tag, made, aim in ((f"post-{share:g}", f"to -{removed:.0%} BFLOPs (as sparse-{share:g})",
                                {'target_flops': removed}),
                               (f"post-p{share:g}", f"to -{share:.0%} params", {'share': share})):
            p_cfg, p_weights, info = prune_post_training(dense, images, args, f"{work}/{tag}", **aim)
            percent = f" --percent {info['percent']}" if info['percent'] is not None else ''
            rows.append(Row(tag, f"dense pruned post-training (act{percent}{floor}) {made}", p_cfg, p_weights))
            fts = (('ft', {}), ('ft-kd', teacher)) if tag.startswith('post-p') else (('ft-kd', teacher),)
            rows += [finetune(work, tag, ft_tag, extra, p_cfg, p_weights, data, args, seconds) for ft_tag, extra in fts]
    return rows


def finetune(work, pruned, ft_tag, extra, cfg, weights, data, args, seconds):
    """F fine-tuning epochs of the prune `pruned` (with a --teacher when `extra` names one) -> its Row."""
    name = f"{pruned}-{ft_tag}"
    pt, val, seconds[name] = train(work, name, args, cfg, weights, data, args.ft_epochs, args.ft_lr0, **extra)
    made = f"fine-tune {args.ft_epochs} epochs" + (' --teacher dense' if extra else '')
    return Row(name, made, *write_model(load_model(None, pt), f"{work}/{name}"), train_seconds=seconds[name],
               val_mAP50=val)


def checks(rows, data, work):
    """darknet + OpenCV on every fine-tuned prune, on the first test image."""
    image = first_test_image(data)
    names = [n for n in open(parse_data_cfg(data)['names']).read().splitlines() if n.strip()]
    for r in rows:
        if '-ft' in r.name:
            folder = os.path.join(work, 'darknet', r.name)
            os.makedirs(folder, exist_ok=True)
            r.darknet = darknet_check(load_model(r.cfg, r.weights), r.cfg, r.weights, image, names, folder)
            print(f"{r.name}: darknet/OpenCV {r.darknet}", flush=True)
    return image, names


def main(args):
    if args.markdown:
        return markdown(args.results_dir)
    if skipped('custom_bench', args):
        return 0
    torch.set_num_threads(args.threads)
    load = load_average()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        os.makedirs(work, exist_ok=True)
        data = convert(work, args.voc)
        rows = pipeline(work, args, data)
        measure(rows, eval_data(work, data), args)
        image, names = checks(rows, data, work)
        if args.picture:
            final = next(r for r in rows if r.name == f"sparse-{max(args.params):g}-ft-kd")
            side_by_side([('dense', load_model(rows[0].cfg, rows[0].weights)),
                          (f"{final.name} (-{1 - final.params / rows[0].params:.0%} params)",
                           load_model(final.cfg, final.weights))], image, names, args.picture, args.img_size)
        n_test = len(list_images(parse_data_cfg(data)['test']))
    print_table(table(rows), title=f"BCCD test split ({n_test} images)")
    options = {k: v for k, v in vars(args).items() if k != 'markdown'}     # reuse: trainings taken from work_dir
    for r in rows:                                 # paths inside the work folder mean nothing afterwards
        r.cfg, r.weights = os.path.basename(r.cfg), os.path.basename(r.weights)
    write_result('custom', {'options': options, 'total_seconds': round(time.perf_counter() - t0, 1),
                            'splits': 'train: training and calibration; val: choices (separate runs); test: '
                                      'every number here',
                            'rows': [asdict(r) for r in rows]}, load, folder=args.results_dir)
    return 0


if __name__ == '__main__':
    sys.exit(cli_main(main, get_args_parser().parse_args()))
