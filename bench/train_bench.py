"""Training speed and demo convergence.

    python -m bench.train_bench [--skip-throughput] [--skip-demo] [--demo-only-settings]
    python -m bench.train_bench --img-size 224 --width 0.5 --epochs 30 ...      (demo settings)

(a) Throughput: images/s of train steps (forward, loss, backward, SGD step) of cfg/yolov3-tiny.cfg at 320,
    batch 16, on a synthetic random batch with a few targets per image (a few warm steps, then timed steps).
    CUDA: measured only when a GPU is present.
(b) Demo convergence: a yolov3-tiny-style cfg (width multiplier, anchors by k-means on the training boxes)
    trained from scratch with train.py on data/make_shapes.py data; mAP@0.5 on `valid` against wall time
    (training + per-epoch evaluation; data generation reported apart). Target: mAP@0.5 >= 0.90 within
    10 minutes on a 2-core CPU.
Prints tables and writes bench/results/train.json.
"""
import argparse
import csv
import os
import tempfile
import time

import numpy as np
import torch

from bench.common import load_average, print_table, write_result
from training import TrainConfig, fit
from utils.errors import cli_main

TARGET_MAP50 = 0.90
TARGET_SECONDS = 600.0


# ------------------------------------------------------------------------------------------------- demo cfg

def kmeans_anchors(wh, k=6, iters=100, seed=0):
    """k anchors (w, h) minimising 1 - IoU (boxes sharing a corner) over box sizes wh [n, 2], sorted by area."""
    wh = torch.as_tensor(wh, dtype=torch.float64)
    order = torch.argsort(wh.prod(1))
    centers = wh[order[((torch.arange(k) + 0.5) / k * len(wh)).long()]].clone()  # area quantiles: deterministic
    for _ in range(iters):
        inter = torch.minimum(wh[:, None], centers[None]).prod(2)
        iou = inter / (wh.prod(1)[:, None] + centers.prod(1)[None] - inter)
        assign = iou.argmax(1)
        new = torch.stack([wh[assign == j].median(0).values if (assign == j).any() else centers[j]
                           for j in range(k)])
        if torch.allclose(new, centers):
            break
        centers = new
    centers = centers[torch.argsort(centers.prod(1))]
    return [(max(1, int(round(w))), max(1, int(round(h)))) for w, h in centers.tolist()]


def data_anchors(data_path, img_size, k=6):
    """k-means anchors of the training boxes as letterboxed to img_size (long side = img_size)."""
    from utils.datasets import LoadImagesAndLabels, parse_data_cfg
    data = parse_data_cfg(data_path)
    ds = LoadImagesAndLabels(data['train'], img_size, augment=False, nc=data['classes'])
    wh = []
    for lab, (h0, w0) in zip(ds.labels, ds.shapes):
        r = img_size / max(h0, w0)
        if len(lab):
            wh.append(lab[:, 3:5] * np.array([w0 * r, h0 * r]))
    return kmeans_anchors(np.concatenate(wh), k)


def demo_cfg_text(nc, img_size, anchors, width=0.5):
    """A yolov3-tiny-style cfg: 5 conv+maxpool stages (stride 32), two [yolo] heads (strides 32 and 16);
    filters = tiny's x `width` (multiples of 8). anchors: 6 (w, h) pairs in input pixels, by area."""
    def f(c):
        return max(8, int(round(c * width / 8)) * 8)

    def conv(filters, size, stride=1, bn=1, act='leaky'):
        return (f"[convolutional]\nbatch_normalize={bn}\nfilters={filters}\nsize={size}\nstride={stride}\n"
                f"pad=1\nactivation={act}\n\n")

    def yolo(mask):
        a = ', '.join(f"{w},{h}" for w, h in anchors)
        return (f"[yolo]\nmask={','.join(map(str, mask))}\nanchors={a}\nclasses={nc}\nnum={len(anchors)}\n"
                "jitter=.3\nignore_thresh=.7\ntruth_thresh=1\nrandom=1\n\n")

    mp = "[maxpool]\nsize=2\nstride=2\n\n"
    s = f"[net]\nbatch=16\nsubdivisions=1\nwidth={img_size}\nheight={img_size}\nchannels=3\n\n"
    s += conv(f(16), 3) + mp                       # 0 1   /2
    s += conv(f(32), 3) + mp                       # 2 3   /4
    s += conv(f(64), 3) + mp                       # 4 5   /8
    s += conv(f(128), 3) + mp                      # 6 7   /16
    s += conv(f(256), 3) + mp                      # 8 9   /32
    s += conv(f(512), 3)                           # 10
    s += conv(f(128), 1)                           # 11
    s += conv(f(256), 3)                           # 12
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')  # 13
    s += yolo([3, 4, 5])                           # 14
    s += "[route]\nlayers=-4\n\n"                  # 15 -> 11
    s += conv(f(64), 1)                            # 16
    s += "[upsample]\nstride=2\n\n"                # 17
    s += "[route]\nlayers=-1,8\n\n"                # 18: upsampled + conv 8 (/16)
    s += conv(f(128), 3)                           # 19
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')  # 20
    s += yolo([0, 1, 2])                           # 21
    return s


# ----------------------------------------------------------------------------------------------- throughput

def bench_throughput(cfg, img_size, batch, warm, steps, device):
    from models import Darknet
    from utils.loss import compute_loss
    torch.manual_seed(0)
    model = Darknet(cfg, img_size).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(batch, 3, img_size, img_size, generator=g).to(device)
    n_t = 4  # targets per image
    t = torch.zeros(batch * n_t, 6)
    t[:, 0] = torch.arange(batch).repeat_interleave(n_t)
    t[:, 1] = torch.randint(0, model.nc, (batch * n_t,), generator=g)
    t[:, 2:4] = torch.rand(batch * n_t, 2, generator=g) * 0.6 + 0.2
    t[:, 4:6] = torch.rand(batch * n_t, 2, generator=g) * 0.3 + 0.05
    t = t.to(device)
    amp = device.type == 'cuda'
    scaler = torch.amp.GradScaler('cuda', enabled=amp)

    def step():
        with torch.autocast(device_type=device.type, enabled=amp):
            loss, _ = compute_loss(model(imgs), t, model, img_hw=imgs.shape[-2:])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(warm):
        step()
    if amp:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if amp:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {'cfg': cfg, 'img_size': img_size, 'batch': batch, 'device': str(device), 'amp': amp,
            'warm_steps': warm, 'timed_steps': steps, 'step_seconds_median': round(med, 4),
            'images_per_second': round(batch / med, 2)}


# ---------------------------------------------------------------------------------------------- convergence

def demo_train_config(data, cfg, out_dir, a):
    """The training.TrainConfig of the demo run (its train.py command line is printed too)."""
    return TrainConfig(cfg=cfg, data=data, epochs=a.epochs, batch_size=a.batch_size, img_size=a.img_size,
                       lr0=a.lr0, warmup_epochs=a.warmup_epochs, workers=a.workers, out_dir=out_dir, seed=a.seed,
                       cache=a.cache, mosaic=a.mosaic, hyp=list(a.hyp) if a.hyp else None)


def as_command_line(config):
    """The train.py command line equal to a TrainConfig (options that differ from the defaults)."""
    default = TrainConfig()
    argv = []
    for k, v in vars(config).items():
        if v == getattr(default, k):
            continue
        flag = '--' + k.replace('_', '-')
        argv += [flag] if v is True else [flag, *map(str, v)] if isinstance(v, list) else [flag, str(v)]
    return 'python train.py ' + ' '.join(argv)


def bench_demo(a):
    if a.work_dir:
        return _bench_demo(a, a.work_dir)
    with tempfile.TemporaryDirectory(prefix='darkslim-train-bench-') as work:
        return _bench_demo(a, work)


def _bench_demo(a, work):
    from data.make_shapes import make_shapes
    data_dir = os.path.join(work, f"shapes_{a.n_train}_{a.n_val}_{a.data_size}_s{a.data_seed}")
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(data_dir, 'shapes.data')):
        make_shapes(data_dir, a.n_train, a.n_val, a.data_size, a.data_seed)
    data_seconds = time.perf_counter() - t0
    data = os.path.join(data_dir, 'shapes.data')
    anchors = data_anchors(data, a.img_size)
    from utils.datasets import parse_data_cfg
    nc = parse_data_cfg(data)['classes']
    cfg = os.path.join(work, f"demo_w{a.width}_{a.img_size}.cfg")
    from utils.io import write_text_atomic
    write_text_atomic(cfg, demo_cfg_text(nc, a.img_size, anchors, a.width))
    from models import model_info
    from utils.parse_config import parse_cfg
    params, bflops = model_info(parse_cfg(cfg))
    out_dir = os.path.join(work, 'run')
    config = demo_train_config(data, cfg, out_dir, a)
    print(as_command_line(config))
    t0, c0 = time.perf_counter(), time.process_time()
    summary = fit(config)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    curve, elapsed, reached = [], 0.0, None
    with open(os.path.join(out_dir, 'results.csv')) as f:
        for row in csv.DictReader(f):
            elapsed += float(row['train_seconds']) + float(row['eval_seconds'])
            point = {'epoch': int(row['epoch']), 'wall_seconds': round(elapsed, 1),
                     'mAP50': round(float(row['mAP50']), 4), 'mAP50_95': round(float(row['mAP50_95']), 4)}
            curve.append(point)
            if reached is None and point['mAP50'] >= TARGET_MAP50:
                reached = point
    return {'data': {'n_train': a.n_train, 'n_val': a.n_val, 'img_size': a.data_size, 'seed': a.data_seed,
                     'generate_seconds': round(data_seconds, 1)},
            'model': {'width': a.width, 'img_size': a.img_size, 'anchors': anchors, 'params': params,
                      'bflops': round(bflops, 3)},
            'settings': {k: getattr(a, k) for k in ('epochs', 'batch_size', 'lr0', 'warmup_epochs', 'workers',
                                                    'cache', 'mosaic', 'hyp', 'seed')},
            'train_command': as_command_line(config),
            'cfg_text': open(cfg).read(),
            'wall_seconds_total': round(wall, 1),
            'cpu_seconds_main_process': round(cpu, 1),  # all threads; workers' processes not included
            'train_images_per_second': round(
                summary['train_images_per_second'], 1),
            'final': {k: round(v, 4) for k, v in (summary['metrics'] or {}).items()},
            'curve': curve, 'target': {'mAP50': TARGET_MAP50, 'seconds': TARGET_SECONDS},
            'reached_target': reached is not None and reached['wall_seconds'] <= TARGET_SECONDS,
            'first_epoch_at_target': reached}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--skip-throughput', action='store_true')
    p.add_argument('--skip-demo', action='store_true')
    p.add_argument('--throughput-cfg', default='cfg/yolov3-tiny.cfg')
    p.add_argument('--throughput-size', type=int, default=320)
    p.add_argument('--throughput-batch', type=int, default=16)
    p.add_argument('--warm', type=int, default=2)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--work-dir', help='keep data/cfg/run here (default: a new temp folder)')
    p.add_argument('--n-train', type=int, default=800)
    p.add_argument('--n-val', type=int, default=200)
    p.add_argument('--data-size', type=int, default=256, help='make_shapes image size')
    p.add_argument('--data-seed', type=int, default=0)
    p.add_argument('--width', type=float, default=0.5, help='demo cfg filters = yolov3-tiny x width')
    p.add_argument('--img-size', type=int, default=192)
    p.add_argument('--epochs', type=int, default=35)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--lr0', type=float, default=0.01)
    p.add_argument('--warmup-epochs', type=float, default=1.0)
    p.add_argument('--workers', type=int, default=0, help='0: augment in this process (2 cores)')
    p.add_argument('--no-cache', dest='cache', action='store_false', help='decode images every epoch')
    p.add_argument('--mosaic', action='store_true')
    p.add_argument('--hyp', nargs='*', help='train.py --hyp overrides (loss/augmentation)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--name', default='train', help='result name: bench/results/<name>.json')
    return p


def main(args):
    load = load_average()
    result = {}
    if not args.skip_throughput:
        cpu = bench_throughput(args.throughput_cfg, args.throughput_size, args.throughput_batch, args.warm,
                               args.steps, torch.device('cpu'))
        result['throughput_cpu'] = cpu
        if torch.cuda.is_available():
            result['throughput_cuda'] = bench_throughput(args.throughput_cfg, args.throughput_size,
                                                         args.throughput_batch, 5, 20, torch.device('cuda'))
        else:
            result['throughput_cuda'] = 'not measured: no GPU'
        rows = [['device', 'cfg', 'img', 'batch', 's/step', 'images/s']]
        for r in (cpu, result['throughput_cuda']):
            if isinstance(r, dict):
                rows.append([r['device'], r['cfg'], r['img_size'], r['batch'], r['step_seconds_median'],
                             r['images_per_second']])
            else:
                rows.append(['cuda', r, '', '', '', ''])
        print_table(rows, title='training throughput (forward + loss + backward + SGD step)')
    if not args.skip_demo:
        demo = bench_demo(args)
        result['demo'] = demo
        rows = [['epoch', 'wall s', 'mAP@0.5', 'mAP@0.5:0.95']]
        rows += [[c['epoch'], c['wall_seconds'], c['mAP50'], c['mAP50_95']] for c in demo['curve']]
        print_table(rows, title=f"demo convergence (width {args.width}, img {args.img_size}, "
                                f"{demo['model']['bflops']} BFLOPs)")
        r = demo['first_epoch_at_target']
        print(f"target mAP@0.5 >= {TARGET_MAP50} within {TARGET_SECONDS:.0f} s: "
              + (f"reached at epoch {r['epoch']}, {r['wall_seconds']} s" if r else 'not reached')
              + f"; data generation {demo['data']['generate_seconds']} s (not counted)")
    write_result(args.name, result, load)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
