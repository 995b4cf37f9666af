"""Evaluate a detector on a data set's `valid` images: P, R, F1, mAP@0.5 and mAP@0.5:0.95 (COCO 101-point).

    python test.py --cfg C --weights W --data D [--img-size S] [--batch-size 16] [--conf-thres 0.001]
                   [--iou-thres 0.6] [--max-det 300] [--device cpu] [--save-json F] [--report R] [--workers N]
                   [--augment]

--cfg may be left out when W is a .pt checkpoint that stores its cfg; --img-size defaults to the cfg's input size
(the larger of [net] width and height). Predictions and labels are compared in
ORIGINAL image pixels (letterbox undone with scale_coords), the frame of the --save-json COCO detections, so the
numbers equal pycocotools' COCOeval on that JSON (see utils/metrics.py for the conventions).
"""
import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader

from models import load_model
from utils.boxes import xywhn2xyxy
from utils.datasets import LoadImagesAndLabels, check_img_size, parse_data_cfg, scale_coords
from utils.datasets import check_classes as check_data_classes
from utils.errors import DarkslimError, cli_main
from utils.io import write_text_atomic
from utils.metrics import DetectionStats, coco_json_detections, format_table, non_max_suppression, write_coco_json
from utils.torch_utils import de_parallel, select_device

# per-class keys of DetectionStats.compute() -> the keys test() reports
_PER_CLASS_KEYS = {'P': 'precision', 'R': 'recall', 'F1': 'f1', 'AP50': 'ap50', 'AP50_95': 'ap50_95'}


def check_classes(data_path, data, model_nc, model_name):
    """Deprecated (old argument order): use utils.datasets.check_classes(data, nc, data_path, model_name)."""
    return check_data_classes(data, model_nc, data_path, f"the model ({model_name})")


def model_device(model, default):
    """Device of the model's first parameter; select_device(default) for a model without parameters."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else select_device(default)


def get_model(model_or_cfg, weights, device, img_size=None):
    """(model, device, name): a model as is on its own device, or one built from cfg path (None: the cfg stored in
    .pt `weights`) + `weights` with models.load_model on select_device(device)."""
    if isinstance(model_or_cfg, torch.nn.Module):
        return model_or_cfg, model_device(model_or_cfg, device), type(model_or_cfg).__name__
    dev = select_device(device)
    model = load_model(model_or_cfg, weights, device=dev, img_size=img_size)
    return model, dev, os.fspath(model_or_cfg if model_or_cfg is not None else weights)


def input_size(model, img_size=None):
    """Square letterbox side: `img_size`, or by default the model's input size max(h, w) (Darknet.img_size, the
    cfg's [net] height and width); a positive multiple of 32."""
    if img_size is not None:
        return check_img_size(img_size)
    hw = getattr(de_parallel(model), 'img_size', None)
    if hw is None or max(hw) % 32:
        raise DarkslimError(f"no img-size given and the model's input size (h, w) is {hw}; expected --img-size "
                            f"(a positive multiple of 32)")
    return int(max(hw))


def inference(model, imgs, augment=False):
    """Decoded detector output [B, N, 5 + nc] (cx, cy, w, h in input pixels). augment: also run on the
    left-right flipped batch and append its boxes mapped back (cx -> W - cx), leaving the merge to NMS."""
    out = model(imgs)[0]
    if augment:
        flipped = model(imgs.flip(3))[0].clone()
        flipped[..., 0] = imgs.shape[3] - flipped[..., 0]
        out = torch.cat((out, flipped), 1)
    return out


def _labels_original(targets, img_hw, shapes):
    """targets [n, 5] (cls, cx, cy, w, h normalised to the letterboxed input of img_hw) -> [n, 5] cls, x1, y1,
    x2, y2 in original image pixels, via the dataset's letterbox parameters. Not clipped to the image, like the
    ground truth pycocotools gets from utils.metrics.coco_gt_from_labels."""
    box = xywhn2xyxy(targets[:, 1:5], img_hw[1], img_hw[0])
    return torch.cat((targets[:, :1], scale_coords(img_hw, box, *shapes, clip=False)), 1)


def test(model_or_cfg, data, weights=None, img_size=None, batch_size=16, conf_thres=0.001, iou_thres=0.6,
         max_det=300, device='cpu', dataloader=None, save_json=None, report=None, verbose=True, workers=0,
         augment=False):
    """Evaluate on the `valid` images of .data file `data`; returns a JSON-ready dict

    {precision, recall, f1, mAP50, mAP50_95 (means over classes with labels), per_class: [{class, name, images,
     targets, precision, recall, f1, ap50, ap50_95}], images, seconds (wall time of the whole evaluation loop:
     loading, inference, NMS, matching), targets, conf_threshold (the P/R/F1 operating point), inference_seconds,
     nms_seconds}.

    model_or_cfg: a models.Darknet (any nn.Module with `.nc` whose eval forward returns (inference [B, N, 5+nc],
    ...)) used as is on its own device, in eval mode, restored to its previous mode afterwards; or a cfg path
    (None with a .pt `weights` that stores one), then built with models.load_model(cfg, weights, device).
    img_size: letterbox side; None = the model's input size max(h, w) (see input_size).
    dataloader: optional, yielding LoadImagesAndLabels.collate_fn batches in data-set order (not shuffled);
    image_id in the JSON is the running image index. save_json / report: paths written atomically.
    """
    data_path = os.fspath(data)
    data_cfg = parse_data_cfg(data_path)
    model, dev, model_name = get_model(model_or_cfg, weights, device, img_size)
    names = check_data_classes(data_cfg, de_parallel(model).nc, data_path, f"the model ({model_name})")
    if dataloader is None:
        img_size = input_size(model, img_size)
        if batch_size < 1:
            raise DarkslimError(f"--batch-size {batch_size}; expected a positive integer")
        dataset = LoadImagesAndLabels(data_cfg['valid'], img_size, batch_size, augment=False, nc=data_cfg['classes'])
        dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                collate_fn=LoadImagesAndLabels.collate_fn)

    was_training = model.training
    model.eval()
    stats, json_dets = DetectionStats(), []
    t_inf = t_nms = 0.0
    image_id = 0
    t_start = time.perf_counter()
    try:
        with torch.no_grad():
            for imgs, targets, paths, shapes in dataloader:
                imgs = imgs.to(dev, non_blocking=True)
                t0 = time.perf_counter()
                out = inference(model, imgs, augment)
                if dev.type == 'cuda':
                    torch.cuda.synchronize(dev)
                t1 = time.perf_counter()
                preds = non_max_suppression(out, conf_thres, iou_thres, max_det)
                preds = [p.cpu() for p in preds]
                t_nms += time.perf_counter() - t1
                t_inf += t1 - t0
                img_hw = tuple(imgs.shape[2:])
                targets = targets.cpu()
                for si, pred in enumerate(preds):
                    if shapes[si] is None:
                        raise DarkslimError(f"{paths[si]}: batch has no letterbox shapes (a mosaic?); "
                                            f"expected an evaluation loader with augment=False")
                    labels = _labels_original(targets[targets[:, 0] == si, 1:], img_hw, shapes[si])
                    predn = scale_coords(img_hw, pred, *shapes[si])
                    stats.update(predn, labels)
                    if save_json is not None:
                        json_dets += coco_json_detections(predn, image_id, paths[si])
                    image_id += 1
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t_start

    res = stats.compute(names)
    result = {
        'precision': res['precision'], 'recall': res['recall'], 'f1': res['f1'],
        'mAP50': res['mAP50'], 'mAP50_95': res['mAP50_95'],
        'per_class': [{'class': pc['class'], 'name': pc['name'], 'images': pc['images'], 'targets': pc['targets'],
                       **{new: pc[old] for old, new in _PER_CLASS_KEYS.items()}} for pc in res['per_class']],
        'images': res['images'], 'seconds': seconds,
        'targets': res['targets'], 'conf_threshold': res['conf_threshold'],
        'inference_seconds': t_inf, 'nms_seconds': t_nms,
    }
    if save_json is not None:
        write_coco_json(save_json, json_dets)
    if report is not None:
        write_text_atomic(report, json.dumps(result, indent=2) + '\n')
    if verbose:
        print(format_table(res))
        n = max(res['images'], 1)
        print(f"{res['images']} images in {seconds:.2f} s: {res['images'] / max(seconds, 1e-9):.1f} images/s "
              f"(inference {1e3 * t_inf / n:.1f} ms/image, NMS {1e3 * t_nms / n:.1f} ms/image, "
              f"conf-thres {conf_thres}, iou-thres {iou_thres})")
        if save_json is not None:
            print(f"wrote {len(json_dets)} detections to {save_json}")
        if report is not None:
            print(f"wrote {report}")
    return result


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cfg', default=None, help='Darknet cfg (optional when --weights is a .pt storing one)')
    p.add_argument('--weights', required=True, help='.weights (darknet) or .pt (darkslim checkpoint)')
    p.add_argument('--data', required=True, help='.data file; its valid= images are evaluated')
    p.add_argument('--img-size', type=int, default=None,
                   help="letterboxed input size (multiple of 32); default: the cfg's max(width, height)")
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--conf-thres', type=float, default=0.001)
    p.add_argument('--iou-thres', type=float, default=0.6, help='NMS IoU threshold')
    p.add_argument('--max-det', type=int, default=300, help='detections kept per image after NMS')
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    p.add_argument('--save-json', default=None, help='write COCO-format detections here')
    p.add_argument('--report', default=None, help='write the metrics as JSON here')
    p.add_argument('--workers', type=int, default=0, help='DataLoader worker processes')
    p.add_argument('--augment', action='store_true', help='test-time augmentation: add a left-right flip pass')
    return p


def main(args):
    if args.workers < 0:
        raise DarkslimError(f"--workers {args.workers}; expected >= 0")
    if args.max_det < 1:
        raise DarkslimError(f"--max-det {args.max_det}; expected a positive integer")
    return test(args.cfg, args.data, weights=args.weights, img_size=args.img_size, batch_size=args.batch_size,
                conf_thres=args.conf_thres, iou_thres=args.iou_thres, max_det=args.max_det, device=args.device,
                save_json=args.save_json, report=args.report, workers=args.workers, augment=args.augment)


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
