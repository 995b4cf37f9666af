"""Evaluate a detector on a data set's `valid` images: P, R, F1, mAP@0.5 and mAP@0.5:0.95 (COCO 101-point).

    python test.py --cfg C --weights W --data D [--img-size S] [--batch-size 16] [--conf-thres 0.001]
                   [--iou-thres 0.6] [--max-det 300] [--device cpu] [--save-json F] [--report R] [--workers N]
                   [--augment]

--cfg may be left out when W is a .pt checkpoint that stores its cfg; --img-size defaults to the cfg's input size
(the larger of [net] width and height). Predictions and labels are compared in original image pixels, the frame
of the --save-json COCO detections, so the numbers equal pycocotools' COCOeval on that JSON. The evaluation
itself is utils/evaluate.py.
"""
import argparse

from models import load_model
from utils.errors import DarkslimError, cli_main
from utils.evaluate import evaluate
from utils.torch_utils import select_device


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
    if args.batch_size < 1:
        raise DarkslimError(f"--batch-size {args.batch_size}; expected a positive integer")
    model = load_model(args.cfg, args.weights, device=select_device(args.device), img_size=args.img_size)
    return evaluate(model, args.data, img_size=args.img_size, batch_size=args.batch_size,
                    conf_thres=args.conf_thres, iou_thres=args.iou_thres, max_det=args.max_det,
                    save_json=args.save_json, report=args.report, workers=args.workers, augment=args.augment)


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
