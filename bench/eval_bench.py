"""Evaluation speed: this test.py against an earlier commit's test.py on the same run, side by side.

    python -m bench.eval_bench [--runs 3] [--baseline 542e3d6] [--img-size 416] [--batch-size 16]
                               [--conf-thres 0.001] [--device cpu] [--threads 0] [--name eval]
    python -m bench.eval_bench --map-only          # one run of each variant: mAP only, no result file
    python -m bench.eval_bench --random-cfgs cfg/yolov3-tiny.cfg cfg/yolov3.cfg [--limit N]   # see below

Run: the real COCO yolov3-tiny (../shared/models/yolov3-tiny-coco) on coco128 val2017 (../shared/datasets/coco128,
128 images) through a temporary .data file (classes from coco.names; train= as well, which the older test.py
requires). The baseline's tree is extracted with `git archive <baseline> | tar -x` into a temporary folder and its
`python test.py` is run as a subprocess, as is this tree's, with the same arguments and each with its own
defaults otherwise (this one: rectangular batches, folded BatchNorm, loader workers). The two alternate, in the
order A B B A A B ... so that a drift in machine load hits both alike, --runs times each. Reported per run:
wall seconds of the process (start-up and model loading included) and images/s of the evaluation loop (from the
--report file: loading, inference, NMS, matching), then the medians and their ratio; plus mAP@0.5 and
mAP@0.5:0.95 of both and of one extra `test.py --square` run of this tree (the square letterbox, as the
baseline), to show what rectangular batches change in the metrics. Writes bench/results/<name>.json.

--threads N sets OMP_NUM_THREADS for both processes (0 = each process's torch default). Skipped with a message
when ../shared is absent (it lies beside the developers' clone only).

--random-cfgs: the older benchmark, evaluate() in this process on random-weight models built from each cfg
(NMS then sees many candidate boxes), images/s per cfg; writes bench/results/<name>.json (default eval_random).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import load_average, print_table, write_result
from utils.datasets import load_names
from utils.errors import DarkslimError, cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), 'shared')
COCO128 = os.path.join(SHARED, 'datasets', 'coco128')
TINY = os.path.join(SHARED, 'models', 'yolov3-tiny-coco')


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', type=int, default=3, help='timed runs of each test.py (alternating)')
    p.add_argument('--baseline', default='542e3d6', help='commit whose test.py is compared')
    p.add_argument('--img-size', type=int, default=416)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--conf-thres', type=float, default=0.001)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=0, help='OMP_NUM_THREADS for both (0 = torch default)')
    p.add_argument('--map-only', action='store_true', help='one run of each variant, print mAPs, write nothing')
    p.add_argument('--random-cfgs', nargs='+', default=None, metavar='CFG',
                   help='instead: in-process evaluate() of random-weight models of these cfgs')
    p.add_argument('--limit', type=int, default=0, help='--random-cfgs: only the first N val images (0 = all)')
    p.add_argument('--name', default=None, help='result file bench/results/<name>.json (default eval, '
                                                'eval_random with --random-cfgs)')
    return p


def _write_data(tmp, valid):
    names = os.path.join(COCO128, 'coco.names')
    data = os.path.join(tmp, 'coco128.data')
    with open(data, 'w') as f:  # class count from the names file, not hard-coded
        f.write(f"classes = {len(load_names(names))}\ntrain = {valid}\nvalid = {valid}\nnames = {names}\n")
    return data


def _extract(commit, dest):
    """The tree of `commit` of this repository, extracted into folder `dest` (git archive | tar -x)."""
    os.makedirs(dest)
    archive = subprocess.run(['git', '-C', REPO, 'archive', commit], capture_output=True)
    if archive.returncode:
        raise DarkslimError(f"git archive {commit}: {archive.stderr.decode().strip()}; expected a commit of {REPO}")
    subprocess.run(['tar', '-x', '-C', dest], input=archive.stdout, check=True)
    return dest


def _run_test_py(tree, common, extra, report, threads):
    """One `python test.py` of `tree`: {wall_s, images, loop_s, images_per_s, mAP50, mAP50_95}."""
    env = dict(os.environ)
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    cmd = [sys.executable, os.path.join(tree, 'test.py'), *common, *extra, '--report', report]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode:
        raise DarkslimError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
    with open(report) as f:
        rep = json.load(f)
    return {'wall_s': round(wall, 2), 'images': rep['images'], 'loop_s': round(rep['seconds'], 2),
            'images_per_s': round(rep['images'] / rep['seconds'], 2), 'mAP50': rep['mAP50'],
            'mAP50_95': rep['mAP50_95']}


def _summary(runs):
    med = {k: statistics.median(r[k] for r in runs) for k in ('wall_s', 'loop_s', 'images_per_s')}
    return {**{f'median_{k}': round(v, 2) for k, v in med.items()}, 'runs': runs}


def compare(args):
    """Alternating runs of the baseline's and this tree's test.py (one each with map_only), then one of this
    tree's test.py --square: ({'baseline': [run, ...], 'ours': [run, ...]}, square run)."""
    if args.runs < 1:
        raise DarkslimError(f"--runs {args.runs}; expected >= 1")
    val = os.path.join(COCO128, 'images', 'val2017')
    with tempfile.TemporaryDirectory() as tmp:
        data = _write_data(tmp, val)
        trees = {'baseline': _extract(args.baseline, os.path.join(tmp, 'baseline')), 'ours': REPO}
        common = ['--cfg', os.path.join(TINY, 'yolov3-tiny.cfg'),
                  '--weights', os.path.join(TINY, 'yolov3-tiny.weights'), '--data', data,
                  '--img-size', str(args.img_size), '--batch-size', str(args.batch_size),
                  '--conf-thres', str(args.conf_thres), '--device', args.device]
        report = os.path.join(tmp, 'report.json')
        runs = {'baseline': [], 'ours': []}
        order = [('baseline', 'ours') if k % 2 == 0 else ('ours', 'baseline') for k in range(args.runs)]
        for k, pair in enumerate([] if args.map_only else order):
            for side in pair:
                runs[side].append(_run_test_py(trees[side], common, [], report, args.threads))
                print(f"run {k + 1}/{args.runs} {side}: {runs[side][-1]}", flush=True)
        if args.map_only:
            for side in ('baseline', 'ours'):
                runs[side].append(_run_test_py(trees[side], common, [], report, args.threads))
        square = _run_test_py(REPO, common, ['--square'], report, args.threads)
    return runs, square


def _print_compare(args, runs, square):
    rows = [['test.py', 'runs', 'median wall s', 'median loop s', 'median images/s', 'mAP@0.5', 'mAP@0.5:0.95']]
    for side, label in (('baseline', f'{args.baseline} (square)'), ('ours', 'this tree (rect)')):
        s = _summary(runs[side])
        rows.append([label, len(runs[side]), s['median_wall_s'], s['median_loop_s'], s['median_images_per_s'],
                     f"{runs[side][0]['mAP50']:.4f}", f"{runs[side][0]['mAP50_95']:.4f}"])
    rows.append(['this tree --square', 1, square['wall_s'], square['loop_s'], square['images_per_s'],
                 f"{square['mAP50']:.4f}", f"{square['mAP50_95']:.4f}"])
    print_table(rows, title=f"yolov3-tiny (COCO weights), coco128 val2017, {args.img_size}, batch {args.batch_size}, "
                            f"conf {args.conf_thres}, {args.device}")


def bench_random(cfg, data, args, device, tmp):
    """evaluate() of a random-weight (seeded default init) model of `cfg`: one result row."""
    import torch
    from models import Darknet, model_info
    from utils.evaluate import evaluate, input_size
    torch.manual_seed(0)
    model = Darknet(os.path.join(REPO, cfg) if not os.path.isabs(cfg) else cfg).to(device).eval()
    img_size = input_size(model, args.img_size)
    dets_path = os.path.join(tmp, 'dets.json')
    r = evaluate(model, data, img_size=img_size, batch_size=args.batch_size, conf_thres=args.conf_thres,
                 save_json=dets_path, verbose=False)
    with open(dets_path) as f:
        n_dets = len(json.load(f))
    n = r['images']
    _, bflops = model_info(model.defs, img_size, img_size)
    return {'cfg': cfg, 'img_size': img_size, 'bflops': round(bflops, 2), 'images': n,
            'seconds': round(r['seconds'], 2), 'images_per_s': round(n / r['seconds'], 2),
            'inference_ms_per_image': round(1e3 * r['inference_seconds'] / n, 1),
            'nms_ms_per_image': round(1e3 * r['nms_seconds'] / n, 1), 'detections_per_image': round(n_dets / n, 1)}


def random_cfgs(args):
    """--random-cfgs: evaluate() throughput of random-weight models, in this process."""
    import torch
    from utils.torch_utils import select_device
    val = os.path.join(COCO128, 'images', 'val2017')
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        valid = val
        if args.limit:
            files = sorted(f for f in os.listdir(val) if f.lower().endswith(('.jpg', '.jpeg', '.png')))[:args.limit]
            valid = os.path.join(tmp, 'valid.txt')
            with open(valid, 'w') as f:
                f.writelines(os.path.join(val, x) + '\n' for x in files)
        data = _write_data(tmp, valid)
        rows = [bench_random(cfg, data, args, device, tmp) for cfg in args.random_cfgs]
    print_table([['cfg', 'size', 'BFLOPs', 'images', 'images/s', 'infer ms/img', 'NMS ms/img', 'dets/img']] +
                [[r['cfg'], r['img_size'], r['bflops'], r['images'], r['images_per_s'], r['inference_ms_per_image'],
                  r['nms_ms_per_image'], r['detections_per_image']] for r in rows],
                title=f"evaluate() on coco128 val2017, {device}, {torch.get_num_threads()} threads, random weights")
    write_result(args.name or 'eval_random', {
        'dataset': 'coco128 val2017', 'batch_size': args.batch_size, 'threads': torch.get_num_threads(),
        'device': str(device), 'conf_thres': args.conf_thres, 'results': rows,
        'note': 'random weights: NMS sees many candidates and keeps max_det (300) per image'}, load)
    return rows


def main(args):
    if not os.path.isdir(os.path.join(COCO128, 'images', 'val2017')):
        print(f"skip: {COCO128} absent (../shared holds the benchmark data beside the developers' clone)")
        return None
    if args.random_cfgs:
        return random_cfgs(args)
    if not os.path.isfile(os.path.join(TINY, 'yolov3-tiny.weights')):
        print(f"skip: {TINY} absent (../shared holds the benchmark model beside the developers' clone)")
        return None
    load = load_average()
    runs, square = compare(args)
    _print_compare(args, runs, square)
    ours, base = _summary(runs['ours']), _summary(runs['baseline'])
    rect_vs_square = {k: round(runs['ours'][0][k] - square[k], 5) for k in ('mAP50', 'mAP50_95')}
    print(f"mAP rect - square: {rect_vs_square}")
    if args.map_only:
        return runs, square
    speedup = {'images_per_s': round(ours['median_images_per_s'] / base['median_images_per_s'], 3),
               'wall': round(base['median_wall_s'] / ours['median_wall_s'], 3)}
    print(f"speed-up (medians): evaluation loop {speedup['images_per_s']}x images/s, process wall {speedup['wall']}x")
    payload = {'dataset': 'coco128 val2017 (128 images)', 'model': 'yolov3-tiny, official COCO weights',
               'img_size': args.img_size, 'batch_size': args.batch_size, 'conf_thres': args.conf_thres,
               'device': args.device, 'threads': args.threads or 'torch default', 'baseline': args.baseline,
               'order': 'alternating A B, B A, ...', 'speedup': speedup, 'baseline_runs': base, 'ours_runs': ours,
               'ours_square_once': square, 'mAP_rect_minus_square': rect_vs_square,
               'note': 'both are `python test.py` subprocesses with their own defaults; wall_s includes start-up and '
                       'model loading, images_per_s is the evaluation loop from the --report file'}
    write_result(args.name or 'eval', payload, load)
    return runs, square


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
