"""Export a Darknet-cfg model to ONNX, for onnxruntime, TensorRT, OpenVINO and other deployment runtimes.

The graph takes `images` [B, 3, H, W] float32 RGB in 0..1 (the tensor the PyTorch model takes) and returns:
  detections   [B, N, 5+nc]  the eval forward's decoded boxes: centre x, y, w, h in input pixels, objectness,
                             class probabilities (sigmoid); rows ordered head by head, then (anchor, y, x)
  yolo_<i>     [B, na, H_i, W_i, 5+nc]  for each [yolo] layer i (its cfg layer index): our raw layout, the conv
                             output before any activation (for decoding elsewhere, or comparing with darknet)
BatchNorm is folded into the convs first (a copy of the model is fused; the caller's model is not changed), and
each darknet [maxpool] becomes one ONNX MaxPool with darknet's asymmetric padding (padded cells are ignored, as
darknet ignores them) rather than a -inf Pad and a MaxPool: the same values, one node, and nothing infinite for
INT8 calibration to see. The file's metadata holds `img_size` ("H,W", the traced input size).

`OnnxDetector` runs such a file in onnxruntime behind the interface utils/evaluate.py's evaluator takes, so an
exported model (FP32, or INT8 from utils/quantize.py) is scored by exactly the code that scores the PyTorch one.

The exporter is torch's TorchScript-based one (`dynamo=False`), which needs no package beyond torch (the
torch.export-based default needs onnxscript). Its declared output shapes are unreliable (symbolic, even mixed up
between axes), so the written graph's outputs are re-declared from the cfg's geometry and the model is checked
with the `onnx` package (required).
"""
import contextlib
import copy
import dataclasses
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import DarkslimError
from utils.io import atomic_path
from utils.parse_config import infer_shapes, maxpool_geometry

MIN_OPSET = 11  # Resize (nearest upsample) and Range (grid) as used here


@dataclasses.dataclass
class OnnxExport:
    """What `export_onnx` wrote: dims are ints, or names for dynamic axes."""
    path: str
    opset: int
    inputs: dict   # name -> shape
    outputs: dict  # name -> shape

    def summary(self):
        def fmt(shape):
            return 'x'.join(map(str, shape))
        outs = ', '.join(f"{k} {fmt(v)}" for k, v in self.outputs.items())
        return f"{self.path}: opset {self.opset}, input images {fmt(self.inputs['images'])} -> {outs}"


class _Heads(nn.Module):
    """The eval forward as a flat tuple (detections, raw head 0, raw head 1, ...): ONNX outputs are a list."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        detections, raw = self.model(x)
        return (detections, *raw)


class _MaxPoolFn(torch.autograd.Function):
    """Darknet maxpool (pad lo before, hi after, each spatial axis; padded cells never win) that exports as
    one ONNX MaxPool with pads [lo, lo, hi, hi] (ONNX MaxPool ignores padded cells)."""

    @staticmethod
    def forward(ctx, x, size, stride, lo, hi):
        return F.max_pool2d(F.pad(x, (lo, hi, lo, hi), value=float('-inf')), size, stride)

    @staticmethod
    def symbolic(g, x, size, stride, lo, hi):
        return g.op('MaxPool', x, kernel_shape_i=[size, size], strides_i=[stride, stride], pads_i=[lo, lo, hi, hi])


class _ExportMaxPool(nn.Module):
    def __init__(self, size, stride, padding):
        super().__init__()
        self.args = (size, stride, padding // 2, padding - padding // 2)   # darknet: floor of the padding first

    def forward(self, x):
        return _MaxPoolFn.apply(x, *self.args)


def _export_maxpools_(net):
    """Replace every [maxpool] module of `net` (a copy) by its one-node export form."""
    for i, d in enumerate(net.module_defs):
        if d['type'] == 'maxpool':
            net.module_list[i] = _ExportMaxPool(*maxpool_geometry(d))


def yolo_shapes(model, h, w):
    """[(layer index, na, ny, nx, 5+nc)] of the model's [yolo] heads at input h x w (from the cfg's geometry)."""
    shapes = infer_shapes(copy.deepcopy(model.defs), h, w)
    return [(i, model.module_list[i].na, shapes[i][1], shapes[i][2], model.module_list[i].no)
            for i in model.yolo_layers]


def _check_dynamic_hw(model, h, w):
    """Dynamic H/W keeps each head's stride (input / grid size) as traced: refuse a size where it is fractional."""
    for i, _, ny, nx, _ in yolo_shapes(model, h, w):
        if h % ny or w % nx:
            raise DarkslimError(f"img size {h}x{w}: [yolo] layer {i} has a {ny}x{nx} grid, stride not whole; "
                                "expected a size that every head's grid divides (e.g. a multiple of 32)")


def export_onnx(model, path, img_size=None, batch=1, dynamic=False, dynamic_hw=False, opset=17, fuse=True):
    """Write `model` (a models.Darknet) as ONNX to `path`, atomically. Returns an OnnxExport.

    img_size: (h, w) or an int, the traced input size (default: the model's). batch: the traced batch size.
    dynamic: batch is a dynamic axis. dynamic_hw: height and width are dynamic too; other sizes must keep each
    head's stride whole (multiples of the largest stride). fuse: fold BatchNorm into the convs (outputs agree
    with the unfused model to float rounding).
    """
    try:
        import onnx
    except ImportError:
        raise DarkslimError("ONNX export needs the onnx package; expected `pip install onnx`") from None
    if opset < MIN_OPSET:
        raise DarkslimError(f"opset {opset}; expected {MIN_OPSET} or higher")
    if batch < 1:
        raise DarkslimError(f"batch {batch}; expected a positive batch size")
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size or model.img_size)
    if dynamic_hw:
        _check_dynamic_hw(model, h, w)
    net = copy.deepcopy(model).cpu().eval()
    if fuse:
        net.fuse()
    _export_maxpools_(net)
    for m in net.modules():  # drop cached grids so the trace builds them from the input's shape
        if getattr(m, 'grid', None) is not None:
            m.grid = None
    heads = yolo_shapes(model, h, w)
    names = ['detections'] + [f'yolo_{i}' for i, *_ in heads]
    axes = {}
    if dynamic or dynamic_hw:
        axes = {'images': {0: 'batch'}, 'detections': {0: 'batch'}, **{n: {0: 'batch'} for n in names[1:]}}
    if dynamic_hw:
        axes['images'].update({2: 'height', 3: 'width'})
        axes['detections'][1] = 'boxes'
        for n, (i, *_) in zip(names[1:], heads):
            axes[n].update({2: f'grid_h_{i}', 3: f'grid_w_{i}'})
    x = torch.zeros(batch, model.in_channels, h, w)

    def dims(name, shape):
        return [axes.get(name, {}).get(k, d) for k, d in enumerate(shape)]
    n_boxes = sum(na * ny * nx for _, na, ny, nx, _ in heads)
    outputs = {'detections': dims('detections', [batch, n_boxes, heads[0][4]])}
    outputs.update({n: dims(n, [batch, na, ny, nx, no]) for n, (_, na, ny, nx, no) in zip(names[1:], heads)})
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            # the tracer warns that strides become constants: they are, for sizes that keep them whole
            warnings.simplefilter('ignore')
            torch.onnx.export(_Heads(net), (x,), tmp, dynamo=False, opset_version=opset, input_names=['images'],
                              output_names=names, dynamic_axes=axes or None, do_constant_folding=True)
        _declare_outputs(onnx, tmp, outputs, {'img_size': f"{h},{w}"})
    return OnnxExport(str(path), opset, {'images': dims('images', list(x.shape))}, outputs)


def _declare_outputs(onnx, path, outputs, metadata):
    """Set the ONNX file's output shapes to `outputs` (name -> dims: int or axis name) and its metadata
    (key -> text), then check the model."""
    proto = onnx.load(path)
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    for out in proto.graph.output:
        shape = out.type.tensor_type.shape
        del shape.dim[:]
        for d in outputs[out.name]:
            dim = shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def onnxruntime_session(path, threads=None):
    """An onnxruntime CPU InferenceSession of ONNX file `path`; threads: intra-op threads (None: onnxruntime's
    default, one per physical core). A one-line DarkslimError when onnxruntime is missing or the file is bad."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DarkslimError("running an ONNX model needs the onnxruntime package; expected "
                            "`pip install onnxruntime`") from None
    path = str(path)
    if not os.path.isfile(path):
        raise DarkslimError(f"{path}: no such ONNX file")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    try:
        return ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for every bad file
        raise DarkslimError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


class OnnxDetector:
    """An exported detector (export_onnx, FP32 or INT8) in onnxruntime, with the interface of
    utils.evaluate.TorchDetector: `nc`, `device` (the CPU), `img_size` (h, w), `fixed_hw` ((h, w) of a
    fixed-size input, None when height and width are dynamic), `running()` and `detections(imgs)`.

    detections(imgs [B, 3, H, W]) -> [B, N, 5 + nc] float32, the `detections` output. A fixed batch size b is
    served in slices of b (the last one padded with zero images, whose rows are dropped)."""

    def __init__(self, path, threads=None):
        self.path = str(path)
        self.session = onnxruntime_session(self.path, threads)
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if 'images' not in inputs or 'detections' not in outputs or len(inputs['images']) != 4:
            raise DarkslimError(f"{self.path}: inputs {inputs}, outputs {list(outputs)}; expected a darkslim "
                                "export (input images [B, 3, H, W], output detections)")
        b, _, h, w = inputs['images']
        no = outputs['detections'][-1]
        if not isinstance(no, int) or no < 6:
            raise DarkslimError(f"{self.path}: detections {outputs['detections']}; expected [B, N, 5 + classes]")
        self.nc = no - 5
        self.batch = b if isinstance(b, int) else None
        self.fixed_hw = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        meta = self.session.get_modelmeta().custom_metadata_map.get('img_size')
        self.img_size = self.fixed_hw or (tuple(int(v) for v in meta.split(',')) if meta else None)
        self.device = torch.device('cpu')

    def __repr__(self):
        return f"OnnxDetector({self.path!r})"

    @contextlib.contextmanager
    def running(self):
        """The evaluation context (a session needs none)."""
        yield self

    def detections(self, imgs):
        x = np.ascontiguousarray(imgs.detach().cpu().numpy(), dtype=np.float32)
        if self.batch is None:
            return torch.from_numpy(self.session.run(['detections'], {'images': x})[0])
        out = []
        for s in range(0, len(x), self.batch):
            part = x[s:s + self.batch]
            n = len(part)
            if n < self.batch:
                part = np.concatenate([part, np.zeros((self.batch - n, *part.shape[1:]), np.float32)])
            out.append(self.session.run(['detections'], {'images': part})[0][:n])
        return torch.from_numpy(np.concatenate(out))
