"""Static INT8 quantization of an exported detector (utils/onnx_export.py) with onnxruntime's quantization tools.

    quantize_onnx(fp32_onnx, out, files, img_size=416)        # files: calibration images (the train split)

The result is a QDQ-format ONNX model (QuantizeLinear/DequantizeLinear pairs around float operators, which
onnxruntime fuses into integer kernels) with the FP32 export's input and outputs, names and shapes unchanged:
  - conv weights int8 (7-bit range: REDUCE_RANGE), symmetric, one scale per output channel; activations uint8
    (asymmetric: most of them are leaky-ReLU outputs, far from symmetric); biases int32 at input x weight scale
  - activation ranges calibrated on `files` letterboxed exactly as evaluation letterboxes them
    (utils.datasets.LoadImagesAndLabels, augment=False, an img_size square), fed CHUNK images per calibration
    pass so that the histogram methods do not hold every activation of every image in memory
  - the box decoding after each head conv (sigmoid, exp, grid offsets, anchors and the concatenation of pixel
    coordinates with 0..1 scores into `detections`) stays float: one 8-bit scale cannot hold pixels up to the
    input size and probabilities together
  - `float_heads`: the convs feeding each [yolo] stay float too (their linear outputs are the box logits)
Which calibration method, whether the head convs stay float and the weights' range were chosen by measured mAP:
see MEASURED.
onnx and onnxruntime are optional dependencies: a one-line DarkslimError when either is missing.
"""
import contextlib
import dataclasses
import io
import os
import tempfile
import time

import numpy as np

from utils.datasets import LoadImagesAndLabels
from utils.errors import DarkslimError
from utils.io import atomic_path

# calibration method -> onnxruntime CalibrationMethod name
METHODS = {'minmax': 'MinMax', 'entropy': 'Entropy', 'percentile': 'Percentile'}
DEFAULT_METHOD = 'minmax'    # measured: see MEASURED
FLOAT_HEADS = True           # measured: see MEASURED
REDUCE_RANGE = True          # 7-bit weights: see MEASURED
DEFAULT_CALIB = 100          # calibration images (all of the train split when it has fewer)
CHUNK = 16                   # images per calibration pass (at most)
MEASURED = """\
  mAP@0.5 / mAP@0.5:0.95 of the INT8 model (test.py --onnx) against the same weights' FP32 ONNX, calibrated on
  100 train images, onnxruntime 1.32 CPU (AMD EPYC, AVX2 without VNNI):
                                  COCO yolov3-tiny, 416         demo yolov3-tiny-demo, 192
                                  coco128 val2017 (128 images)  make_shapes val (200 images)
  FP32                            0.3015 / 0.1783               0.8677 / 0.5465
  minmax,     heads int8          0.2955 / 0.1616               0.8641 / 0.5141
  minmax,     heads float         0.2981 / 0.1742  (chosen)     0.8688 / 0.5467  (chosen)
  entropy,    heads int8          0.2964 / 0.1626               0.8653 / 0.5159
  entropy,    heads float         0.2950 / 0.1731               0.8687 / 0.5495
  percentile, heads int8          0.2825 / 0.1559               0.8648 / 0.5180
  percentile, heads float         0.2847 / 0.1628               0.8675 / 0.5476
  minmax, heads int8, 8-bit weights  0.2541 / 0.1351            0.8556 / 0.5122
  MinMax loses least on COCO (-0.0034 mAP@0.5) and nothing on the demo. Int8 head convs quantize the box
  logits to one 8-bit scale per head: mAP@0.5:0.95 drops by 0.007-0.034 (minmax: 0.013 and 0.033), so the
  convs feeding [yolo] stay float (2.4% of yolov3-tiny's BFLOPs; --no-float-heads quantizes them). Weights
  use 7 bits (reduce_range): with 8, the u8 x s8 kernels of AVX2 CPUs without VNNI saturate (last row; the
  same file run without onnxruntime's integer kernels scores 0.3039 / 0.1736 on COCO)."""

EXPORT_HELP = f"""Write cfg + weights as ONNX (BatchNorm folded; input images [B, 3, H, W] RGB 0..1 letterboxed; outputs
detections [B, N, 5 + classes] and the raw yolo_<layer> heads). Evaluate the file with
`python test.py --onnx M.onnx --data D` (the same letterbox, NMS and metrics as test.py).

--int8 --data D [--calib N]: a statically quantized model (onnxruntime quantize_static, QDQ format, int8
per-channel weights, uint8 activations) calibrated on N images (default {DEFAULT_CALIB}, all when fewer) of D's
train split, never its valid split, letterboxed as test.py letterboxes them. The box decoding after the head
convs stays float. Choices, measured:
{MEASURED}"""


def missing():
    """Why INT8 export cannot run here (a one-line reason), or None."""
    for module, pip in (('onnx', 'onnx'), ('onnxruntime', 'onnxruntime')):
        try:
            __import__(module)
        except ImportError:
            return f"INT8 export needs the {module} package; expected `pip install {pip}`"
    return None


@dataclasses.dataclass
class Int8Export:
    """What quantize_onnx wrote: the calibration, and which nodes stayed float."""
    path: str
    method: str
    calib_images: int
    quantized_convs: int
    float_convs: list      # conv node names left in float
    float_decode: int      # decode nodes left in float
    seconds: float

    def summary(self):
        heads = f", head convs float: {len(self.float_convs)}" if self.float_convs else ''
        return (f"{self.path}: INT8 (QDQ, per-channel int8 weights, uint8 activations), {self.method} calibration "
                f"on {self.calib_images} train images, {self.quantized_convs} convs quantized{heads}, "
                f"{self.float_decode} box-decoding nodes float ({self.seconds:.1f} s)")


def _reader_class():
    from onnxruntime.quantization import CalibrationDataReader

    class LetterboxReader(CalibrationDataReader):
        """Calibration inputs {'images': float32 [batch, 3, S, S]}: `files` letterboxed to an S square as
        evaluation letterboxes them; len() and set_range() in batches (onnxruntime's chunked calibration)."""

        def __init__(self, files, img_size, batch=1):
            self.dataset = LoadImagesAndLabels(files, img_size, augment=False)
            self.batch = batch
            self.n = len(files) // batch
            self.set_range(0, self.n)

        def __len__(self):
            return self.n

        def set_range(self, start_index, end_index):
            self._next, self._end = start_index, min(end_index, self.n)

        def get_next(self):
            if self._next >= self._end:
                return None
            first = self._next * self.batch
            imgs = [self.dataset[j][0].numpy() for j in range(first, first + self.batch)]
            self._next += 1
            return {'images': np.ascontiguousarray(np.stack(imgs), dtype=np.float32)}

        def rewind(self):
            self.set_range(0, self.n)

    return LetterboxReader


def head_convs(proto):
    """{raw output name 'yolo_<i>': name of the Conv node that computes it} of an exported detector: each raw
    head output is its conv's output reshaped (Reshape / Transpose), so walk back from it to the first Conv."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    heads = {}
    for out in proto.graph.output:
        if not out.name.startswith('yolo_'):
            continue
        node = producer.get(out.name)
        while node is not None and node.op_type != 'Conv':
            node = producer.get(node.input[0])
        if node is None:
            raise DarkslimError(f"{out.name}: no Conv computes this head output; expected a darkslim ONNX export")
        heads[out.name] = node.name
    return heads


def downstream_nodes(proto, tensors):
    """Names of every node that reads `tensors` or anything computed from them (the graph is topologically
    sorted, as ONNX requires)."""
    reached, names = set(tensors), []
    for n in proto.graph.node:
        if any(i in reached for i in n.input):
            names.append(n.name)
            reached.update(n.output)
    return names


def _float_nodes(proto, float_heads):
    """(decode node names, head conv names kept float): everything computed from a head conv's output stays
    float; the head convs too with `float_heads`."""
    by_name = {n.name: n for n in proto.graph.node}
    convs = list(head_convs(proto).values())
    decode = downstream_nodes(proto, [o for c in convs for o in by_name[c].output])
    return decode, (convs if float_heads else [])


def _chunk(n, most=CHUNK):
    """The largest divisor of n that is at most `most` (onnxruntime's chunked calibration needs one)."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def quantize_onnx(src, out, files, img_size, method=DEFAULT_METHOD, float_heads=FLOAT_HEADS, batch=1,
                  verbose=True, reduce_range=REDUCE_RANGE):
    """Write the INT8 (QDQ) model of FP32 ONNX export `src` to `out`, atomically; returns an Int8Export.

    files: calibration image paths (the train split: utils.datasets.list_images, e.g. via
    calibrate.calibration_files); img_size: the square side they are letterboxed to (the export's input size);
    method: a key of METHODS; float_heads: leave the convs feeding [yolo] in float; batch: the export's fixed
    batch size (1 for a dynamic-batch export); reduce_range: 7-bit weights (see MEASURED)."""
    why = missing()
    if why:
        raise DarkslimError(why)
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    if method not in METHODS:
        raise DarkslimError(f"calibration method {method!r}; expected one of {', '.join(METHODS)}",
                            param='method')
    n = len(files) // batch
    if n < 1:
        raise DarkslimError(f"{len(files)} calibration images for a batch-{batch} model; expected at least {batch}",
                            param='calib')
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='darkslim-int8-') as tmp:
        pre = os.path.join(tmp, 'pre.onnx')
        # onnxruntime's advice before quantizing: ONNX shape inference and constant folding (its symbolic shape
        # inference is for transformers, and gives up on the grid arithmetic of a dynamic-size export)
        quant_pre_process(os.fspath(src), pre, skip_symbolic_shape=True)
        proto = onnx.load(pre)
        decode, heads = _float_nodes(proto, float_heads)
        reader = _reader_class()(files[:n * batch], img_size, batch)
        # onnxruntime prints progress lines ("Collecting tensor data ...") while calibrating
        with atomic_path(out) as dst, contextlib.redirect_stdout(io.StringIO()):
            quantize_static(pre, dst, reader, quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                            nodes_to_exclude=decode + heads,
                            extra_options={'CalibStridedMinMax': _chunk(n)})
            _check_same_interface(onnx, src, dst)
    n_convs = sum(node.op_type == 'Conv' for node in proto.graph.node)
    res = Int8Export(os.fspath(out), method, n * batch, n_convs - len(heads), heads, len(decode),
                     time.perf_counter() - t0)
    if verbose:
        print(res.summary())
    return res


def _shapes(proto, values):
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def _check_same_interface(onnx, src, dst):
    """The quantized model's inputs and outputs (names, order, shapes) must be the FP32 export's."""
    a, b = onnx.load(os.fspath(src)), onnx.load(dst)
    for what in ('input', 'output'):
        sa, sb = _shapes(a, getattr(a.graph, what)), _shapes(b, getattr(b.graph, what))
        if list(sa.items()) != list(sb.items()):
            raise DarkslimError(f"quantized model {what}s {sb}; expected the FP32 export's {sa}")
    onnx.checker.check_model(b)

