"""Run a detector on an image, a folder of images or a list file; save copies with boxes and labels drawn.

    python detect.py --cfg C --weights W --source (IMAGE | FOLDER | LIST) --out DIR [--names N | --data D]
                     [--img-size S] [--conf-thres 0.25] [--iou-thres 0.45] [--max-det 300] [--device cpu]

--cfg may be left out when W is a .pt checkpoint that stores its cfg; --img-size defaults to the cfg's input size
(the larger of [net] width and height). Each input image is written to DIR under its own file name, with a
numeric suffix (name_1.jpg, ...) when an earlier input of this run already took that name (atomically); the
input files are never modified. Prints one line per image: detections counted per class and the inference + NMS
time.
"""
import argparse
import colorsys
import os
import time

import cv2
import numpy as np
import torch

from models import resolve_model
from utils.datasets import (PIXEL_MAX, check_classes, image_tensor, imread, letterbox, list_images, load_names,
                            parse_data_cfg, scale_coords)
from utils.errors import DarkslimError, cli_main
from utils.evaluate import input_size, model_device
from utils.io import write_bytes_atomic
from utils.metrics import class_name, non_max_suppression
from utils.torch_utils import de_parallel, select_device

_WHITE = (PIXEL_MAX,) * 3


def class_color(c):
    """A distinct BGR colour per class id (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((c * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(b * PIXEL_MAX), int(g * PIXEL_MAX), int(r * PIXEL_MAX)


def draw_detections(img, dets, names=None):
    """Copy of BGR image `img` with boxes [n, 6] (x1, y1, x2, y2, conf, cls in its pixels) and labels drawn."""
    img = img.copy()
    h, w = img.shape[:2]
    thick = max(1, round(0.002 * (h + w) / 2))
    font_scale = max(0.3, thick / 3)
    for x1, y1, x2, y2, conf, c in np.asarray(dets, dtype=np.float64).reshape(-1, 6).tolist():
        color = class_color(int(c))
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(img, p1, p2, color, thick, cv2.LINE_AA)
        label = f"{class_name(names, int(c))} {conf:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, max(thick - 1, 1))
        top = p1[1] - th - base if p1[1] - th - base >= 0 else p1[1]  # above the box, else inside it
        cv2.rectangle(img, (p1[0], top), (p1[0] + tw, top + th + base), color, -1, cv2.LINE_AA)
        cv2.putText(img, label, (p1[0], top + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, _WHITE,
                    max(thick - 1, 1), cv2.LINE_AA)
    return img


def _resolve_names(names, data, model_nc, model_name):
    """Class names from a list, a .names file or a .data file's names= (checked against the model)."""
    if data is not None:
        if names is not None:
            raise DarkslimError("both --names and --data given; expected one of them")
        names = check_classes(parse_data_cfg(data, need=('classes', 'names')), model_nc, os.fspath(data),
                              f"the model ({model_name})")
    elif isinstance(names, (str, os.PathLike)):
        path = os.fspath(names)
        names = load_names(path)
        if len(names) != model_nc:
            raise DarkslimError(f"{path}: found {len(names)} class names; the model ({model_name}) has "
                                f"{model_nc} classes")
    return list(names) if names is not None else None


def _out_path(src, out_dir, taken):
    """Output path for input `src`: its file name in out_dir, or name_1.ext, name_2.ext, ... when that name is in
    `taken` (names given to earlier inputs of this run; the chosen one is added)."""
    name = os.path.basename(src)
    stem, ext = os.path.splitext(name)
    k = 0
    while name in taken:
        k += 1
        name = f"{stem}_{k}{ext}"
    taken.add(name)
    dst = os.path.join(out_dir, name)
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise DarkslimError(f"{dst}: --out would overwrite the input image; expected an output folder other "
                            f"than the source folder")
    return dst


def detect(model_or_cfg, source, out, weights=None, names=None, data=None, img_size=None, conf_thres=0.25,
           iou_thres=0.45, max_det=300, device='cpu', verbose=True):
    """Detect objects in `source` (an image, a folder of images or a list file) and save annotated copies into
    folder `out` (file names as in the module doc).

    model_or_cfg: a models.Darknet (any nn.Module with `.nc` whose eval forward returns (inference [B, N, 5+nc],
    ...)), used on its own device; or a cfg path (None with a .pt `weights` storing one). names: list, .names path,
    or None (then `data`, a .data file, may give them; else class ids are shown). img_size: letterbox side;
    None = the model's input size max(h, w).
    Returns one dict per image: {path, out, detections (float64 [n, 6] x1, y1, x2, y2, conf, cls in the original
    image's pixels, by descending conf), counts ({class name: n}), seconds (inference + NMS)}.
    """
    model, model_name = resolve_model(model_or_cfg, weights, select_device(device), img_size)
    dev = model_device(model)
    img_size = input_size(model, img_size)
    names = _resolve_names(names, data, de_parallel(model).nc, model_name)
    files = list_images(source)
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DarkslimError(f"{out}: exists and is not a folder; expected an output folder")
    os.makedirs(out, exist_ok=True)

    was_training = model.training
    model.eval()
    results, taken = [], set()
    try:
        for path in files:
            img0 = imread(path)
            img, ratio, pad = letterbox(img0, img_size)
            x = image_tensor(img).to(dev).unsqueeze(0)
            t0 = time.perf_counter()
            with torch.no_grad():
                pred = non_max_suppression(model(x)[0], conf_thres, iou_thres, max_det)[0]
            if dev.type == 'cuda':
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
            dets = scale_coords(img.shape[:2], pred.cpu().double(), img0.shape[:2], (ratio, pad)).numpy()
            dst = _out_path(path, out, taken)
            ok, buf = cv2.imencode(os.path.splitext(dst)[1], draw_detections(img0, dets, names))
            if not ok:
                raise DarkslimError(f"{dst}: OpenCV cannot encode this image format; expected .jpg, .png, ...")
            write_bytes_atomic(dst, buf.tobytes())
            classes, n = np.unique(dets[:, 5].astype(int), return_counts=True)
            counts = {class_name(names, c): k for c, k in zip(classes.tolist(), n.tolist())}
            results.append({'path': path, 'out': dst, 'detections': dets, 'counts': counts, 'seconds': seconds})
            if verbose:
                found = ', '.join(f"{n} {k}" for k, n in counts.items()) or 'no detections'
                print(f"{path} ({img0.shape[1]}x{img0.shape[0]}): {found} ({1e3 * seconds:.1f} ms)")
    finally:
        model.train(was_training)
    if verbose:
        total = sum(r['seconds'] for r in results)
        print(f"{len(results)} images in {total:.2f} s (inference + NMS); results saved to {out}")
    return results


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cfg', default=None, help='Darknet cfg (optional when --weights is a .pt storing one)')
    p.add_argument('--weights', required=True, help='.weights (darknet) or .pt (darkslim checkpoint)')
    p.add_argument('--source', required=True, help='an image, a folder of images or a list file of image paths')
    p.add_argument('--out', required=True, help='output folder for the annotated images')
    g = p.add_mutually_exclusive_group()
    g.add_argument('--names', default=None, help='.names file (one class name per line)')
    g.add_argument('--data', default=None, help='.data file whose names= gives the class names')
    p.add_argument('--img-size', type=int, default=None,
                   help="letterboxed input size (multiple of 32); default: the cfg's max(width, height)")
    p.add_argument('--conf-thres', type=float, default=0.25)
    p.add_argument('--iou-thres', type=float, default=0.45, help='NMS IoU threshold')
    p.add_argument('--max-det', type=int, default=300, help='detections kept per image after NMS')
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    return p


def main(args):
    if args.max_det < 1:
        raise DarkslimError(f"--max-det {args.max_det}; expected a positive integer")
    return detect(args.cfg, args.source, args.out, weights=args.weights, names=args.names, data=args.data,
                  img_size=args.img_size, conf_thres=args.conf_thres, iou_thres=args.iou_thres,
                  max_det=args.max_det, device=args.device)


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
