"""Evaluation of a detector on a data set's `valid` images: P, R, F1, mAP@0.5 and mAP@0.5:0.95 (COCO 101-point).

`evaluate(model, data)` is what test.py, train.py (every epoch), the prune scripts (--data) and the benchmarks
call. Predictions and labels are compared in ORIGINAL image pixels (letterbox undone with scale_coords), the
frame of the COCO-format JSON that `save_json` writes, so the numbers equal pycocotools' COCOeval on that JSON
(see utils/metrics.py for the conventions).

Speed: by default images are batched by aspect ratio and each batch is letterboxed to its own smallest
rectangle (utils.datasets.rect_batches; rect=False: every image to an img_size square), loaded by worker
processes while the model runs, and fed in channels-last memory format (faster convolutions on CPU and CUDA).
Results are gathered per image and scored in data-set order, so they do not depend on the batching.

Backends: the evaluator runs a detector through a small interface (TorchDetector here; OnnxDetector in
utils/onnx_export.py runs an exported FP32 or INT8 model in onnxruntime): `nc`, `device`, `img_size`,
`fixed_hw` (None, or the (h, w) a fixed-size model takes: then the square letterbox is the only one it fits),
`running()` (the evaluation context) and `detections(imgs)` -> [B, N, 5 + nc]. Letterbox, NMS, matching and
metrics are this module's, the same for every backend, so their mAPs are comparable.
"""
import contextlib
import json
import os
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from utils.boxes import xywhn2xyxy
from utils.datasets import (LoadImagesAndLabels, RectBatchSampler, check_classes, check_img_size, parse_data_cfg,
                            scale_coords)
from utils.errors import DarkslimError
from utils.io import write_text_atomic
from utils.metrics import (DetectionStats, coco_category_ids, coco_image_ids, coco_json_detections, format_table,
                           non_max_suppression, write_coco_json)
from utils.torch_utils import de_parallel

# per-class keys of DetectionStats.compute() -> the keys test() reports
_PER_CLASS_KEYS = {'P': 'precision', 'R': 'recall', 'F1': 'f1', 'AP50': 'ap50', 'AP50_95': 'ap50_95'}


def model_device(model):
    """Device of the model's first parameter (the CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device('cpu')


def input_size(model, img_size=None):
    """Square letterbox side: `img_size`, or by default the model's input size max(h, w) (Darknet.img_size, the
    cfg's [net] height and width, or a detector backend's img_size); a positive multiple of 32."""
    if img_size is not None:
        return check_img_size(img_size)
    hw = getattr(de_parallel(model), 'img_size', None)
    if hw is None or max(hw) % 32:
        raise DarkslimError(f"no input size given and the model's input size (h, w) is {hw}; expected an "
                            f"input size (a positive multiple of 32)")
    return int(max(hw))


class TorchDetector:
    """A PyTorch detector as the evaluator's backend: models.Darknet, or any nn.Module with `.nc` whose eval
    forward returns (decoded [B, N, 5 + nc], ...), used on its own device. running(): eval mode and no_grad,
    the model's mode restored after (it is never modified). detections(): channels-last input (oneDNN and
    cuDNN run these convolutions faster than NCHW), fp16 autocast with `half` (CUDA), float32 out."""
    fixed_hw = None   # any multiple of the model's largest stride

    def __init__(self, model, half=False):
        plain = de_parallel(model)
        self.model, self.nc, self.half = model, plain.nc, half
        self.device = model_device(model)
        self.img_size = getattr(plain, 'img_size', None)

    def __repr__(self):
        return type(de_parallel(self.model)).__name__

    @contextlib.contextmanager
    def running(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield self
        finally:
            self.model.train(was_training)

    def detections(self, imgs):
        imgs = imgs.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast('cuda', dtype=torch.float16) if self.half else contextlib.nullcontext():
            out = self.model(imgs)[0]
        out = out.float()  # NMS and box arithmetic in float32 also after fp16 autocast
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        return out


def as_detector(model, half=False):
    """`model` as an evaluator backend: a backend (anything with `detections`) as it is, an nn.Module wrapped in
    TorchDetector."""
    return model if hasattr(model, 'detections') else TorchDetector(model, half)


def inference(detector, imgs, augment=False):
    """Decoded detector output [B, N, 5 + nc] (cx, cy, w, h in input pixels) of a backend. augment: also run
    on the left-right flipped batch and append its boxes mapped back (cx -> W - cx), leaving the merge to NMS."""
    out = detector.detections(imgs)
    if augment:
        flipped = detector.detections(imgs.flip(3)).clone()
        flipped[..., 0] = imgs.shape[3] - flipped[..., 0]
        out = torch.cat((out, flipped), 1)
    return out


def _labels_original(targets, img_hw, shapes):
    """targets [n, 5] (cls, cx, cy, w, h normalised to the letterboxed input of img_hw) -> [n, 5] cls, x1, y1,
    x2, y2 in original image pixels, via the dataset's letterbox parameters. Not clipped to the image, like the
    ground truth pycocotools gets from utils.metrics.coco_gt_from_labels."""
    box = xywhn2xyxy(targets[:, 1:5], img_hw[1], img_hw[0])
    return torch.cat((targets[:, :1], scale_coords(img_hw, box, *shapes, clip=False)), 1)


def default_workers(batch_size):
    """DataLoader worker processes that load the next batches while the model runs: min(cores - 1, batch_size,
    4), so one core stays with the forward pass; 0 (load in this process) on a one-core machine."""
    return max(0, min((os.cpu_count() or 1) - 1, batch_size, 4))


def evaluate(model, data, img_size=None, batch_size=16, conf_thres=0.001, iou_thres=0.6, max_det=300,
             dataloader=None, save_json=None, report=None, verbose=True, workers=None, augment=False, rect=True,
             rect_pad=0.0, half=False, skip_bad_labels=False, split='valid'):
    """Evaluate `model` on the `split` images (default `valid`; `test` for a held-out test list) of .data file
    `data`; returns a JSON-ready dict

    {precision, recall, f1, mAP50, mAP50_95 (means over classes with labels), per_class: [{class, name, images,
     targets, precision, recall, f1, ap50, ap50_95}], images, seconds (wall time of the whole evaluation loop:
     loading, inference, NMS, matching), targets, conf_threshold (the P/R/F1 operating point), inference_seconds,
     nms_seconds}.

    model: a models.Darknet (any nn.Module with `.nc` whose eval forward returns (inference [B, N, 5+nc], ...)),
    used as is on its own device, in eval mode, restored to its previous mode afterwards (never modified); or
    a detector backend (module doc), e.g. utils.onnx_export.OnnxDetector.
    img_size: letterbox long side; None = the model's input size max(h, w) (see input_size).
    rect: rectangular batches (module doc; rect_pad extra strides per batch, ultralytics uses 0.5); False:
    square letterbox (the only one a fixed-size backend takes: it must be square and img_size its side).
    workers: loader processes, None = default_workers(batch_size). half: fp16 autocast of the forward pass
    (CUDA only). skip_bad_labels: drop bad label rows (counted) instead of stopping.
    dataloader: optional, yielding LoadImagesAndLabels.collate_fn batches (any batching and order; images are
    put back in the order of dataloader.dataset.img_files, else taken in arrival order).
    save_json / report: paths written atomically. JSON ids: image_id = numeric file stem when every stem is one,
    else the index in the valid list; category_id = COCO's official id when the names are COCO's 80 classes,
    else the class index (utils.metrics.coco_image_ids / coco_category_ids).
    """
    data_path = os.fspath(data)
    if split not in ('valid', 'test', 'train'):
        raise DarkslimError(f"{{split}} {split!r}; expected valid, test or train", param='split')
    data_cfg = parse_data_cfg(data_path, need=('classes', split))
    data_cfg = {**data_cfg, 'valid': data_cfg[split]}
    det = as_detector(model, half)
    nc = det.nc
    names = check_classes(data_cfg, nc, data_path, f"the model ({det!r})")
    if half and det.device.type != 'cuda':
        raise DarkslimError(f"half precision needs the model on a CUDA device; it is on {det.device}")
    if dataloader is None:
        size = _letterbox_size(det, img_size, rect)
        dataloader = _loader(data_cfg, size, batch_size, workers, rect, rect_pad, skip_bad_labels,
                             pin=det.device.type == 'cuda')
    with det.running():
        images, times = _collect(det, dataloader, Thresholds(conf_thres, iou_thres, max_det), augment)
    stats = DetectionStats()
    for im in images:  # data-set order: ties in score break as in COCOeval
        stats.update(im.pred, im.labels)
    times['seconds'] = time.perf_counter() - times['start']
    res = stats.compute(names)
    result = {
        'precision': res['precision'], 'recall': res['recall'], 'f1': res['f1'],
        'mAP50': res['mAP50'], 'mAP50_95': res['mAP50_95'],
        'per_class': [{'class': pc['class'], 'name': pc['name'], 'images': pc['images'], 'targets': pc['targets'],
                       **{new: pc[old] for old, new in _PER_CLASS_KEYS.items()}} for pc in res['per_class']],
        'images': res['images'], 'seconds': times['seconds'],
        'targets': res['targets'], 'conf_threshold': res['conf_threshold'],
        'inference_seconds': times['inference'], 'nms_seconds': times['nms'],
    }
    n_dets = _write_outputs(save_json, report, result, images, coco_category_ids(names, nc))
    if verbose:
        print(format_table(res))
        _print_speed(res['images'], times, conf_thres, iou_thres)
        if save_json is not None:
            print(f"wrote {n_dets} detections to {save_json}")
        if report is not None:
            print(f"wrote {report}")
    return result


def _letterbox_size(det, img_size, rect):
    """The letterbox side for backend `det`: input_size(); a fixed-size backend takes only its own square."""
    if det.fixed_hw is None:
        return input_size(det, img_size)
    h, w = det.fixed_hw
    if h != w or h % 32:
        raise DarkslimError(f"{det!r}: fixed input {h}x{w}; expected a square multiple of 32, or a model with "
                            "dynamic height and width")
    if rect:
        raise DarkslimError(f"{det!r}: fixed input {h}x{w} takes the square letterbox only; expected rect=False "
                            "(or a model with dynamic height and width)", param='rect')
    if img_size is not None and img_size != h:
        raise DarkslimError(f"img size {img_size}; {det!r} has a fixed {h}x{w} input, expected {h}",
                            param='img_size')
    return h


@dataclass
class Thresholds:
    """NMS settings: confidence threshold, IoU threshold, detections kept per image."""
    conf: float = 0.001
    iou: float = 0.6
    max_det: int = 300


@dataclass
class ImageResult:
    """One evaluated image: detections [n, 6] x1, y1, x2, y2, conf, cls and labels [m, 5] cls, x1, y1, x2, y2,
    both in original pixels; its path and COCO image_id."""
    pred: torch.Tensor
    labels: torch.Tensor
    path: str
    image_id: int


def _loader(data_cfg, img_size, batch_size, workers, rect, rect_pad, skip_bad_labels, pin):
    """The evaluation DataLoader over the .data file's valid images (letterboxed, no augmentation)."""
    if batch_size < 1:
        raise DarkslimError(f"batch size {batch_size}; expected a positive integer")
    workers = default_workers(batch_size) if workers is None else workers
    if workers < 0:
        raise DarkslimError(f"workers {workers}; expected >= 0")
    dataset = LoadImagesAndLabels(data_cfg['valid'], img_size, batch_size, augment=False, nc=data_cfg['classes'],
                                  skip_bad_labels=skip_bad_labels, rect=rect, rect_pad=rect_pad)
    common = dict(num_workers=workers, collate_fn=LoadImagesAndLabels.collate_fn, pin_memory=pin)
    if rect:
        return DataLoader(dataset, batch_sampler=RectBatchSampler(dataset), **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)


class _ImageOrder:
    """Data-set index and COCO image_id of each image as batches arrive in any order: found by path (a path
    listed twice takes its indices in list order); arrival order when the data set has no img_files."""

    def __init__(self, files):
        files = list(files or [])
        self.slots = {}
        for i, f in enumerate(files):
            self.slots.setdefault(f, []).append(i)
        self.ids, self.arrived = coco_image_ids(files), 0

    def take(self, path):
        """(index, image_id) of the next image with this path."""
        free = self.slots.get(path)
        k = free.pop(0) if free else len(self.ids) + self.arrived
        self.arrived += 1
        return k, self.ids[k] if k < len(self.ids) else k


def _collect(det, dataloader, th, augment):
    """Run backend `det` over the loader: (ImageResult list in data-set order, {'start', 'inference', 'nms'})."""
    order = _ImageOrder(getattr(getattr(dataloader, 'dataset', None), 'img_files', None))
    found, times = {}, {'inference': 0.0, 'nms': 0.0, 'start': time.perf_counter()}
    for imgs, targets, paths, shapes in dataloader:
        t0 = time.perf_counter()
        out = inference(det, imgs, augment)
        t1 = time.perf_counter()
        preds = [p.cpu() for p in non_max_suppression(out, th.conf, th.iou, th.max_det)]
        times['nms'] += time.perf_counter() - t1
        times['inference'] += t1 - t0
        img_hw = tuple(imgs.shape[2:])
        targets = targets.cpu()
        for si, pred in enumerate(preds):
            if shapes[si] is None:
                raise DarkslimError(f"{paths[si]}: batch has no letterbox shapes (a mosaic?); "
                                    f"expected an evaluation loader with augment=False")
            labels = _labels_original(targets[targets[:, 0] == si, 1:], img_hw, shapes[si])
            k, image_id = order.take(paths[si])
            found[k] = ImageResult(scale_coords(img_hw, pred, *shapes[si]), labels, paths[si], image_id)
    return [found[k] for k in sorted(found)], times


def _write_outputs(save_json, report, result, images, category_ids):
    """Write the COCO JSON and the report (each when its path is given); returns the number of detections."""
    n = 0
    if save_json is not None:
        dets = []
        for im in images:
            dets += coco_json_detections(im.pred, im.image_id, im.path, class_map=category_ids)
        write_coco_json(save_json, dets)
        n = len(dets)
    if report is not None:
        write_text_atomic(report, json.dumps(result, indent=2) + '\n')
    return n


def _print_speed(images, times, conf_thres, iou_thres):
    n = max(images, 1)
    print(f"{images} images in {times['seconds']:.2f} s: {images / max(times['seconds'], 1e-9):.1f} images/s "
          f"(inference {1e3 * times['inference'] / n:.1f} ms/image, NMS {1e3 * times['nms'] / n:.1f} ms/image, "
          f"conf-thres {conf_thres}, iou-thres {iou_thres})")
