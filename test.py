"""Evaluate a detector on a data set's `valid` images: P, R, F1, mAP@0.5 and mAP@0.5:0.95 (COCO 101-point).

    python test.py --cfg C --weights W --data D [--img-size S] [--batch-size 16] [--conf-thres 0.001]
                   [--iou-thres 0.6] [--max-det 300] [--device cpu] [--save-json F] [--report R] [--workers N]
                   [--square] [--half] [--augment] [--skip-bad-labels]
    python test.py --onnx M.onnx --data D [--threads N] [same evaluation options]

--cfg may be left out when W is a .pt checkpoint that stores its cfg; --img-size defaults to the cfg's input size
(the larger of [net] width and height). The .data file needs only classes= and valid= (names= for the table).

Images are batched by aspect ratio and each batch is letterboxed to the smallest multiple-of-32 rectangle that
holds its images resized to long side --img-size (fewer padded pixels, so faster; --square letterboxes every
image to an --img-size square instead). The model is evaluated with its BatchNorm folded into the convolutions,
DataLoader workers (default min(cores - 1, batch size, 4)) load the next batches during the forward pass, and
--half runs the forward pass in fp16 (CUDA only). Predictions and labels are compared in original image pixels,
the frame of the --save-json COCO detections, so the numbers equal pycocotools' COCOeval on that JSON.

--save-json writes COCO results ({image_id, category_id, bbox [x, y, w, h] in original pixels, score, and
file_name}) that score against official COCO annotations: image_id is the image's file stem as a number when
every stem is a number (COCO's 000000000139.jpg -> 139), else its 0-based index in the valid list; category_id
is COCO's own id (1..90 with gaps, the standard 80-to-91 table) when the .data names= are COCO's 80 classes in
COCO order (official or darknet spelling), else the class index 0..nc-1. The evaluation itself is
utils/evaluate.py.

--onnx M.onnx evaluates an exported model (`python models.py export`, FP32 or --int8) in onnxruntime with the
same letterbox, NMS, matching and metrics, so its mAP compares with the PyTorch model's. An export with a fixed
input size (the default) takes only its own square: it is evaluated with the square letterbox at that size,
i.e. it compares with `test.py --square --img-size S` on the same weights; an export made with --dynamic-size
(height and width dynamic) is evaluated in the default rectangular batches, like plain `test.py`.
"""
import argparse

from models import load_model
from utils.errors import DarkslimError, cli_main
from utils.evaluate import evaluate
from utils.torch_utils import select_device


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cfg', default=None, help='Darknet cfg (optional when --weights is a .pt storing one)')
    p.add_argument('--weights', help='.weights (darknet) or .pt (darkslim checkpoint)')
    p.add_argument('--onnx', default=None,
                   help='evaluate this exported ONNX model (FP32 or INT8) in onnxruntime instead of --weights')
    p.add_argument('--threads', type=int, default=None,
                   help='--onnx: onnxruntime intra-op threads (default: one per physical core)')
    p.add_argument('--data', required=True, help='.data file; its valid= images are evaluated')
    p.add_argument('--split', default='valid', choices=('valid', 'test', 'train'),
                   help="which list of the .data file to evaluate: valid= (default), test= (a split kept apart, "
                        "e.g. data/convert.py's), train=")
    p.add_argument('--img-size', type=int, default=None,
                   help="letterbox long side (multiple of 32); default: the cfg's max(width, height)")
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--conf-thres', type=float, default=0.001)
    p.add_argument('--iou-thres', type=float, default=0.6, help='NMS IoU threshold')
    p.add_argument('--max-det', type=int, default=300, help='detections kept per image after NMS')
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    p.add_argument('--save-json', default=None, help='write COCO-format detections here')
    p.add_argument('--report', default=None, help='write the metrics as JSON here')
    p.add_argument('--workers', type=int, default=None,
                   help='DataLoader worker processes (default min(cores - 1, batch size, 4); 0 = none)')
    p.add_argument('--square', action='store_true',
                   help='letterbox every image to an img-size square (default: rectangular batches)')
    p.add_argument('--half', action='store_true', help='fp16 forward pass (CUDA devices only)')
    p.add_argument('--augment', action='store_true', help='test-time augmentation: add a left-right flip pass')
    p.add_argument('--skip-bad-labels', action='store_true',
                   help='drop (and count) bad label rows instead of stopping at the first one')
    return p


def main(args):
    if args.workers is not None and args.workers < 0:
        raise DarkslimError(f"--workers {args.workers}; expected >= 0")
    if args.max_det < 1:
        raise DarkslimError(f"--max-det {args.max_det}; expected a positive integer")
    if args.batch_size < 1:
        raise DarkslimError(f"--batch-size {args.batch_size}; expected a positive integer")
    model, square = onnx_detector(args) if args.onnx else (torch_model(args), args.square)
    return evaluate(model, args.data, img_size=args.img_size, batch_size=args.batch_size,
                    conf_thres=args.conf_thres, iou_thres=args.iou_thres, max_det=args.max_det,
                    save_json=args.save_json, report=args.report, workers=args.workers, augment=args.augment,
                    rect=not square, half=args.half, skip_bad_labels=args.skip_bad_labels, split=args.split)


def torch_model(args):
    """--cfg / --weights as a fused PyTorch model on --device."""
    if args.weights is None:
        raise DarkslimError("no --weights; expected --weights W (or --onnx M.onnx)")
    device = select_device(args.device)
    if args.half and device.type != 'cuda':
        raise DarkslimError(f"--half on device {device}; expected a CUDA device (--device cuda)")
    model = load_model(args.cfg, args.weights, device=device, img_size=args.img_size)
    return model.fuse()  # BatchNorm folded into the convolutions: the same function, fewer operations


def onnx_detector(args):
    """(--onnx model in onnxruntime, square letterbox?): a fixed-size export takes only its own square."""
    from utils.onnx_export import OnnxDetector
    if args.weights or args.cfg:
        raise DarkslimError("--onnx with --weights/--cfg; expected one model: the ONNX file, or cfg + weights")
    if args.half or args.device != 'cpu':
        raise DarkslimError("--onnx with --half/--device; expected neither (onnxruntime runs on the CPU here)")
    if args.threads is not None and args.threads < 1:
        raise DarkslimError(f"--threads {args.threads}; expected a positive integer")
    det = OnnxDetector(args.onnx, threads=args.threads)
    if det.fixed_hw is None:
        return det, args.square
    h, w = det.fixed_hw
    if args.img_size is not None and args.img_size != h:
        raise DarkslimError(f"--img-size {args.img_size}; {args.onnx} has a fixed {h}x{w} input, expected "
                            f"{h} (or no --img-size)")
    if h != w:
        raise DarkslimError(f"{args.onnx}: fixed input {h}x{w}; expected a square input, or an export made "
                            "with --dynamic-size")
    if not args.square:
        print(f"{args.onnx}: fixed {h}x{w} input, so square letterbox at {h} (compare with test.py --square "
              f"--img-size {h})")
    return det, True


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
