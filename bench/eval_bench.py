"""Evaluation throughput of test.test(): images/s including data loading, inference, NMS and matching.

    python bench/eval_bench.py [--cfgs cfg/yolov3-tiny.cfg cfg/yolov3.cfg] [--img-size S] [--batch-size 8]
                               [--limit N] [--device cpu] [--threads 1]

Data: ../shared/datasets/coco128 val2017 (skipped with a message when ../shared is absent), through a temporary
.data file. Models have random weights (seeded default init), so NMS sees many candidate boxes: the confidence
threshold is test.py's 0.001, as in a real mAP run. --img-size defaults to each cfg's own input size (as
test.py). --threads defaults to 1: on a shared 2-core box two spinning OpenMP threads make timings swing by
several x with the other load (NMS of small tensors most of all); pass --threads 2 (or 0 = torch default) on an
idle machine. Prints a table and writes bench/results/eval.json.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from utils.evaluate import evaluate, input_size  # noqa: E402
from bench.common import load_average, print_table, write_result  # noqa: E402
from models import Darknet, model_info  # noqa: E402
from utils.datasets import load_names  # noqa: E402
from utils.errors import DarkslimError, cli_main  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO128 = os.path.join(os.path.dirname(REPO), 'shared', 'datasets', 'coco128')


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cfgs', nargs='+', default=['cfg/yolov3-tiny.cfg', 'cfg/yolov3.cfg'])
    p.add_argument('--img-size', type=int, default=None, help="default: each cfg's max(width, height)")
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--conf-thres', type=float, default=0.001)
    p.add_argument('--iou-thres', type=float, default=0.6)
    p.add_argument('--limit', type=int, default=0, help='evaluate only the first N val images (0 = all)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=1, help='torch intra-op threads (0 = torch default)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--name', default='eval', help='result file bench/results/<name>.json')
    return p


def bench_eval(cfg, data, img_size, batch_size, conf_thres, iou_thres, device, seed, tmp):
    torch.manual_seed(seed)
    model = Darknet(os.path.join(REPO, cfg) if not os.path.isabs(cfg) else cfg).to(device).eval()
    img_size = input_size(model, img_size)
    dets_path = os.path.join(tmp, 'dets.json')
    r = evaluate(model, data, img_size=img_size, batch_size=batch_size, conf_thres=conf_thres,
                 iou_thres=iou_thres, save_json=dets_path, verbose=False)
    with open(dets_path) as f:
        n_dets = len(json.load(f))
    n = r['images']
    _, bflops = model_info(model.defs, img_size, img_size)
    return {'cfg': cfg, 'img_size': img_size, 'bflops': round(bflops, 2), 'images': n,
            'seconds': round(r['seconds'], 2), 'images_per_s': round(n / r['seconds'], 2),
            'inference_ms_per_image': round(1e3 * r['inference_seconds'] / n, 1),
            'nms_ms_per_image': round(1e3 * r['nms_seconds'] / n, 1),
            'other_ms_per_image': round(1e3 * (r['seconds'] - r['inference_seconds'] - r['nms_seconds']) / n, 1),
            'detections_per_image': round(n_dets / n, 1), 'mAP50_random_weights': round(r['mAP50'], 4)}


def main(args):
    val = os.path.join(COCO128, 'images', 'val2017')
    names = os.path.join(COCO128, 'coco.names')
    if not os.path.isdir(val) or not os.path.isfile(names):
        print(f"skip: {val} or {names} absent (../shared holds the benchmark data beside the developers' clone)")
        return None
    if args.threads < 0:
        raise DarkslimError(f"--threads {args.threads}; expected >= 0 (0 = torch default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        valid = val
        if args.limit:
            files = sorted(f for f in os.listdir(val) if f.lower().endswith(('.jpg', '.jpeg', '.png')))[:args.limit]
            if not files:
                raise DarkslimError(f"{val}: no images")
            valid = os.path.join(tmp, 'valid.txt')
            with open(valid, 'w') as f:
                f.writelines(os.path.join(val, x) + '\n' for x in files)
        data = os.path.join(tmp, 'coco128.data')
        with open(data, 'w') as f:  # class count from the names file, not hard-coded
            f.write(f"classes = {len(load_names(names))}\ntrain = {valid}\nvalid = {valid}\nnames = {names}\n")
        rows = [bench_eval(cfg, data, args.img_size, args.batch_size, args.conf_thres, args.iou_thres, device,
                           args.seed, tmp) for cfg in args.cfgs]
    print_table([['cfg', 'size', 'BFLOPs', 'images', 'images/s', 'infer ms/img', 'NMS ms/img', 'other ms/img',
                  'dets/img']] +
                [[r['cfg'], r['img_size'], r['bflops'], r['images'], r['images_per_s'], r['inference_ms_per_image'],
                  r['nms_ms_per_image'], r['other_ms_per_image'], r['detections_per_image']] for r in rows],
                title=f"test.test() on coco128 val2017, {device}, {torch.get_num_threads()} threads, random weights")
    payload = {'dataset': 'coco128 val2017', 'img_size': args.img_size or 'each cfg', 'batch_size': args.batch_size,
               'threads': torch.get_num_threads(), 'device': str(device), 'conf_thres': args.conf_thres,
               'iou_thres': args.iou_thres, 'max_det': 300,
               'note': 'random weights (seeded default init): conf_thres 0.001 as in test.py, so NMS sees many '
                       'candidates (up to max_nms 30000 per image) and keeps max_det per image; images/s covers '
                       'loading + letterbox, inference, NMS, matching and JSON',
               'results': rows}
    write_result(args.name, payload, load)
    return rows


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
