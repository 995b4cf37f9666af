"""Recovery by label-free distillation: train a pruned (compact) model to reproduce the original's outputs.

After a prune (and calibrated surgery, calibrate.py) the compact model -- the student -- is close to the
original -- the teacher -- but not equal to it.  Training the student to match the teacher's outputs needs no
labels: any images will do, and augmentation (mosaic, affine, HSV, flips) turns ~128 of them into many
different views.  Few-sample, label-free recovery of compressed networks by matching the teacher is
FSKD (Li et al. 2020, "Few Sample Knowledge Distillation for Efficient Network Compression": block outputs
matched on a few unlabeled images); MiR (Wang et al. 2022, "Compressing Models with Few Samples: Mimicking
then Replacing") mimics the teacher's penultimate features, which is the 'feature' loss here at the head convs'
inputs; PRACTISE (Wang et al. 2023, "Practical Network Acceleration with Tiny Sets") recovers networks with
blocks dropped by feature distillation on a tiny set.  All of them start the student from the pruned
teacher's weights, as here (after the folds and calibration of the prune).

Two losses, selectable by name (`LOSSES`; 'head+feature' is their sum):

    'head'     MSE on the raw head outputs (the [yolo] layers' inputs, before decoding), per element weighted by
               the teacher's objectness as in YOLO distillation (Mehta & Ozturk 2018, "Object detection at 200
               frames per second": objectness-scaled distillation); see `head_loss` for the formula.
    'feature'  MSE between the student's input of chosen convs (by default the head convs) and the SAME channels
               of the teacher's input of the corresponding convs; see `feature_loss` and `feature_pairs`.

The pieces are separate so that training can reuse them (train.py --teacher ... --kd W as a LossTerm):

    pairs = feature_pairs(teacher, student, plan.keep)              # for 'feature': which inputs to compare
    with torch.no_grad():
        t = run_model(teacher, imgs, [p.teacher for p in pairs], mode='eval')   # Outputs: raw heads, inputs
    with capturing(student, [p.student for p in pairs]) as feats:   # forward pre-hooks on those layers
        raw = student(imgs)                                         # train mode: the raw head outputs
    loss = distill_loss('head+feature', Outputs(raw, feats), t, pairs)

and `distill(student, teacher, images, iters)` is the whole loop (teacher in eval mode under no_grad, never
modified; the student trained with Adam or SGD, returned in eval mode).  Everything runs on the CPU unless a
`device` is given; for a seed the loop is deterministic on the CPU.
"""
import contextlib
import copy
import io
import math
import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from channels import channel_flow
from models import YOLOLayer
from utils.datasets import DEFAULT_HYP, LoadImagesAndLabels, list_images
from utils.errors import DarkslimError
from utils.parse_config import infer_shapes

LOSSES = ('head', 'feature', 'head+feature')
BN_MODES = ('frozen', 'train')       # student BatchNorms: running statistics kept | updated by the batches
OPTIMIZERS = ('adam', 'sgd')
HEAD_FLOOR = 0.01                    # box/class weight added to the teacher's objectness (see head_loss)
DEFAULT_LR = 1e-4                    # Adam; like batch and lrf, a placeholder until measured on real prunes
CACHE_MAX_IMAGES = 1024              # image files decoded once and kept in memory up to this many
PAD_VALUE = 114 / 255                # letterbox / border grey, as utils.datasets pads


# --- running a model and capturing what the losses compare ----------------------------------------------------

@dataclass
class Outputs:
    """What the losses compare, from one forward pass: `raw` per [yolo] layer [B, na, H, W, 5+nc] (the head
    conv's output in the per-anchor view, not decoded), `inputs` {layer: its input [B, C, H, W]} for the layers
    asked for, `obj_is_prob` per [yolo]: True where the head conv is logistic already (new_coords=1)."""
    raw: list
    inputs: dict = field(default_factory=dict)
    obj_is_prob: tuple = None


@contextlib.contextmanager
def capturing(model, layers):
    """{layer: input tensor}, filled during every forward pass of `model` inside the block by forward pre-hooks
    on `model.module_list[layer]` (a later pass overwrites).  Gradients flow through the captured tensors as
    through the model (no detach)."""
    store = {}

    def hook(i):
        def grab(module, inputs):
            store[i] = inputs[0]                     # [B, C, H, W]
        return grab

    handles = [model.module_list[i].register_forward_pre_hook(hook(i)) for i in sorted(set(layers))]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def model_mode(model, mode):
    """`model` in `mode` for the block: None (as it is), 'eval' or 'train'; every module's own mode (e.g. a
    frozen BatchNorm in a training model) restored after."""
    if mode not in (None, 'eval', 'train'):
        raise ValueError(f"mode {mode!r}; expected None, 'eval' or 'train'")
    saved = [(m, m.training) for m in model.modules()]
    if mode is not None:
        model.train(mode == 'train')
    try:
        yield model
    finally:
        for m, was in saved:
            m.training = was


def obj_is_prob(model):
    """Per [yolo] layer of a Darknet: whether its raw objectness is a probability (new_coords=1) or a logit."""
    return tuple(bool(model.module_list[i].new_coords) for i in model.yolo_layers)


def run_model(model, x, layers=(), mode=None):
    """Outputs of one forward pass of `model` on x [B, 3, H, W] in `mode` (see model_mode), capturing the
    inputs of `layers`.  Gradients as the caller's context says (wrap the teacher's call in torch.no_grad)."""
    with model_mode(model, mode), capturing(model, layers) as inputs:
        out = model(x)
    raw = out[1] if isinstance(out, tuple) else out  # eval: (decoded, raw); train: raw
    return Outputs(list(raw), dict(inputs), obj_is_prob(model))


def head_convs(model):
    """The conv layer feeding each [yolo] layer, in head order."""
    out = []
    for i in model.yolo_layers:
        src = model.inputs[i][0]
        if model.module_defs[src]['type'] != 'convolutional':
            raise DarkslimError(f"layer {i}: [yolo] is fed by [{model.module_defs[src]['type']}] {src}; "
                                "expected a [convolutional] head conv")
        out.append(src)
    return out


def head_shapes(model, img_hw):
    """Per [yolo] layer of a Darknet, at input size img_hw = (height, width): (anchors, H, W, 5 + classes,
    new_coords), the raw output's shape without the batch and how its objectness reads."""
    shapes = infer_shapes(model.defs, *img_hw)
    return [(model.module_list[i].na, *shapes[i][1:], model.module_list[i].no, model.module_list[i].new_coords)
            for i in model.yolo_layers]


def check_same_heads(student, teacher, img_hw):
    """DarkslimError (about {teacher}) unless both Darknets give equal head outputs at input img_hw: what
    head_loss compares. Widths inside the networks may differ (a pruned student)."""
    s, t = head_shapes(student, img_hw), head_shapes(teacher, img_hw)
    if s != t:
        raise DarkslimError(f"{{teacher}}: heads (anchors, H, W, 5+classes, new_coords) at input {img_hw[0]}x"
                            f"{img_hw[1]}: teacher {t}, student {s}; expected equal head outputs", param='teacher')


# --- the losses -------------------------------------------------------------------------------------------------

def _check_heads(student_raw, teacher_raw):
    if len(student_raw) != len(teacher_raw):
        raise DarkslimError(f"student has {len(student_raw)} [yolo] outputs, teacher {len(teacher_raw)}; "
                            "expected the same heads")
    for k, (s, t) in enumerate(zip(student_raw, teacher_raw)):
        if s.shape != t.shape or s.dim() != 5:
            raise DarkslimError(f"head {k}: student output {tuple(s.shape)}, teacher {tuple(t.shape)}; expected "
                                "equal shapes [B, anchors, H, W, 5+classes]")


def head_loss(student_raw, teacher_raw, floor=HEAD_FLOOR, obj_is_prob=None):
    """Objectness-weighted MSE between raw head outputs, summed over heads:

        L = sum_heads  mean_{b, a, y, x, k}  w[b, a, y, x, k] * (s[b, a, y, x, k] - t[b, a, y, x, k])^2

        w = 1                  for k = 4, the objectness (every cell teaches it: background cells and
                               images without objects teach the student where there is nothing)
        w = sigmoid(t_obj) + floor   for k != 4, box (0..3) and class (5..) values of that anchor and cell,
                               t_obj = t[b, a, y, x, 4] (its value itself where obj_is_prob, new_coords heads)

    s, t: per [yolo] layer [B, na, H, W, 5+nc] (the student's and the teacher's raw outputs, t detached).
    `floor` keeps a little weight on the box and class values of cells the teacher sees as background."""
    _check_heads(student_raw, teacher_raw)
    total = student_raw[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_raw, teacher_raw)):
        t = t.detach()
        obj = t[..., 4:5]                            # [B, na, H, W, 1]
        p = obj if obj_is_prob is not None and obj_is_prob[k] else torch.sigmoid(obj)
        w = (p + floor).expand_as(t).clone()         # [B, na, H, W, 5+nc]
        w[..., 4] = 1.0
        total = total + (w * (s - t).square()).mean()
    return total


class Pair(NamedTuple):
    """One 'feature' correspondence: the input of teacher conv `teacher` (its channels `channels`, a LongTensor
    of indices, or None for all) against the input of student conv `student`."""
    teacher: int
    student: int
    channels: torch.Tensor = None


def feature_loss(student_inputs, teacher_inputs, pairs):
    """MSE between layer inputs, summed over pairs:

        L = sum_pairs  mean_{b, c, y, x}  (s[b, c, y, x] - t[b, idx[c], y, x])^2

    s = student_inputs[pair.student] [B, C', H, W], t = teacher_inputs[pair.teacher] [B, C, H, W] (detached),
    idx = pair.channels (C' teacher channels; None: all, C' = C)."""
    if not pairs:
        raise DarkslimError("{pairs} empty; expected at least one (teacher layer, student layer, channels)",
                            param='pairs')
    total = None
    for p in map(lambda q: Pair(*q), pairs):
        s, t = student_inputs[p.student], teacher_inputs[p.teacher].detach()
        if p.channels is not None:
            t = t.index_select(1, p.channels.to(t.device))
        if s.shape != t.shape:
            raise DarkslimError(f"{{pairs}}: student layer {p.student} input {tuple(s.shape)} vs teacher layer "
                                f"{p.teacher} input {tuple(t.shape)} (its chosen channels); expected equal shapes",
                                param='pairs')
        term = F.mse_loss(s, t)
        total = term if total is None else total + term
    return total


def distill_loss(kind, student_out, teacher_out, pairs=None, floor=HEAD_FLOOR):
    """The loss `kind` ('head', 'feature' or 'head+feature', their sum) between two Outputs (see run_model):
    head_loss on their raw outputs (the objectness read as the teacher's obj_is_prob says) and/or feature_loss
    on their captured inputs for `pairs`."""
    parts = _kinds(kind)
    total = None
    if 'head' in parts:
        total = head_loss(student_out.raw, teacher_out.raw, floor, teacher_out.obj_is_prob)
    if 'feature' in parts:
        f = feature_loss(student_out.inputs, teacher_out.inputs, pairs)
        total = f if total is None else total + f
    return total


def _kinds(kind):
    if kind not in LOSSES:
        raise DarkslimError(f"{{loss}} {kind!r}; expected one of {', '.join(LOSSES)}", param='loss')
    return tuple(kind.split('+'))


# --- feature pairs ----------------------------------------------------------------------------------------------

def feature_pairs(teacher, student, keep=None):
    """The default 'feature' pairs: the input of each head conv (the conv feeding each [yolo], matched in head
    order, so removed blocks may renumber layers) against the teacher's kept channels of it.  `keep`: a channel
    prune's masks ({teacher conv layer: bool mask}, prune_utils.Plan.keep): the kept input channels come from
    channels.channel_flow.  Without `keep` the widths must be equal (channels None)."""
    t_heads, s_heads = head_convs(teacher), head_convs(student)
    if len(t_heads) != len(s_heads):
        raise DarkslimError(f"student has {len(s_heads)} heads, teacher {len(t_heads)}; expected the same heads")
    flow = channel_flow(teacher, keep) if keep else None
    pairs = []
    for t, s in zip(t_heads, s_heads):
        idx, c_t, c_s = None, _in_channels(teacher, t, 'teacher'), _in_channels(student, s, 'student')
        if flow is not None and not bool(flow[t - 1][0].all()):
            idx = flow[t - 1][0].nonzero().flatten()          # the teacher's kept input channels of conv t
        elif flow is None and c_t != c_s:
            raise DarkslimError(f"{{pairs}}: head conv {t} reads {c_t} channels in the teacher, {c_s} in the "
                                "student; expected the prune's keep masks (feature_pairs(teacher, student, "
                                "plan.keep))", param='pairs')
        pairs.append(Pair(t, s, idx))
    return check_pairs(teacher, student, pairs)


def _in_channels(model, layer, who):
    if not 0 <= layer < len(model.module_defs) or model.module_defs[layer]['type'] != 'convolutional':
        raise DarkslimError(f"{{pairs}}: {who} layer {layer} is no [convolutional] layer; expected conv layer "
                            "indices", param='pairs')
    return model.module_list[layer][0].in_channels


def check_pairs(teacher, student, pairs):
    """`pairs` as Pair tuples, each naming a conv of both models with as many chosen teacher channels as the
    student conv reads; else a DarkslimError about {pairs}."""
    out = []
    for q in pairs:
        p = Pair(*q)
        c_t, c_s = _in_channels(teacher, p.teacher, 'teacher'), _in_channels(student, p.student, 'student')
        idx = None if p.channels is None else torch.as_tensor(p.channels, dtype=torch.long).flatten()
        n = c_t if idx is None else len(idx)
        if n != c_s or (idx is not None and len(idx) and not 0 <= int(idx.min()) <= int(idx.max()) < c_t):
            raise DarkslimError(f"{{pairs}}: teacher layer {p.teacher} ({c_t} input channels, {n} chosen) vs "
                                f"student layer {p.student} ({c_s}); expected as many chosen teacher channels, "
                                f"each in 0..{c_t - 1}, as the student conv reads", param='pairs')
        out.append(Pair(p.teacher, p.student, idx))
    if not out:
        raise DarkslimError("{pairs} empty; expected at least one (teacher layer, student layer, channels)",
                            param='pairs')
    return out


# --- images: batches of augmented views ---------------------------------------------------------------------------

def _index_stream(n, batch, g):
    """Endless batches of `batch` image indices: seeded random permutations of 0..n-1, one after another."""
    buf = []
    while True:
        while len(buf) < batch:
            buf += torch.randperm(n, generator=g).tolist()
        yield buf[:batch]
        buf = buf[batch:]


def _uniform(g, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment_tensor(x, g, hyp=None):
    """Random views of x [B, 3, H, W] (RGB 0..1) drawn from generator `g` (CPU), with utils.datasets' `hyp`
    keys: horizontal flip (probability fliplr), zoom 1 +/- scale and shift +/- translate (of the size) with grey
    borders, saturation 1 +/- hsv_s and value (brightness) 1 +/- hsv_v gains (no hue: tensors carry RGB)."""
    hyp = {**DEFAULT_HYP, **(hyp or {})}
    b = len(x)
    flip = torch.rand(b, generator=g) < hyp['fliplr']
    zoom = _uniform(g, b, 1 - hyp['scale'], 1 + hyp['scale'])
    shift = _uniform(g, (b, 2), -hyp['translate'], hyp['translate']) * 2      # normalized coordinates: 2 = size
    sat = _uniform(g, b, 1 - hyp['hsv_s'], 1 + hyp['hsv_s'])
    val = _uniform(g, b, 1 - hyp['hsv_v'], 1 + hyp['hsv_v'])
    theta = torch.zeros(b, 2, 3)                     # output (x, y) -> input: (out - shift) / zoom, x mirrored
    theta[:, 0, 0] = torch.where(flip, -1.0, 1.0) / zoom
    theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = -shift / zoom[:, None]
    theta = theta.to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)          # [B, H, W, 2]
    x = F.grid_sample(x - PAD_VALUE, grid, mode='bilinear', padding_mode='zeros', align_corners=False) + PAD_VALUE
    gray = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)   # [B, 1, H, W]
    x = gray + (x - gray) * sat.to(x).view(b, 1, 1, 1)
    return (x * val.to(x).view(b, 1, 1, 1)).clamp_(0, 1)


def file_dataset(files, img_size, augment=True, mosaic=True, hyp=None):
    """LoadImagesAndLabels over image `files` with label files ignored: a missing one is a background image,
    rows it cannot parse are skipped (silently), and the labels read are dropped (no box reaches the loss)."""
    with contextlib.redirect_stdout(io.StringIO()):  # skip_bad_labels prints a count we do not need
        ds = LoadImagesAndLabels(list(files), img_size, augment=augment, mosaic=mosaic, hyp=hyp,
                                 cache=len(files) <= CACHE_MAX_IMAGES, skip_bad_labels=True)
    ds.labels = [np.zeros((0, 5), np.float32) for _ in ds.labels]
    return ds


def _views(images, batch, g, augment, mosaic, hyp, img_size, device):
    """Endless batches [batch, 3, S, S] on `device`: from image files through LoadImagesAndLabels (its
    augmentation draws from torch's default generator), or from a tensor through augment_tensor (from `g`)."""
    if torch.is_tensor(images):
        for idx in _index_stream(len(images), batch, g):
            x = images[idx]
            yield (augment_tensor(x, g, hyp) if augment else x).to(device)
        return
    ds = file_dataset(images, img_size, augment, mosaic, hyp)
    for idx in _index_stream(len(ds), batch, g):
        yield torch.stack([ds[j][0] for j in idx]).to(device)


# --- the loop ---------------------------------------------------------------------------------------------------

@dataclass
class DistillRow:
    """A window of iterations: the last one (1-based), the mean loss over the window, the learning rate of
    its last step, seconds since the start."""
    iter: int
    loss: float
    lr: float
    seconds: float


@dataclass
class DistillReport:
    """What distill did: options, images, img_size (None for a tensor), a DistillRow per `log_every`
    iterations (and the last), total seconds."""
    loss: str
    iters: int
    batch: int
    bn: str
    optimizer: str
    lr: float
    images: int
    img_size: int
    augment: bool
    rows: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def first_loss(self):
        return self.rows[0].loss if self.rows else None

    @property
    def last_loss(self):
        return self.rows[-1].loss if self.rows else None


def _positive(value, name, integer=False):
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not value > 0 or (not integer and not math.isfinite(value)):
        what = 'a positive integer' if integer else 'a positive number'
        raise DarkslimError(f"{{{name}}} {value!r}; expected {what}", param=name)


def _check_options(o):
    """DarkslimError for the first bad option of distill (a dict of its arguments)."""
    _positive(o['iters'], 'iters', integer=True)
    _positive(o['batch'], 'batch', integer=True)
    _positive(o['log_every'], 'log_every', integer=True)
    _positive(o['lr'], 'lr')
    _kinds(o['loss'])
    if o['bn'] not in BN_MODES:
        raise DarkslimError(f"{{bn}} {o['bn']!r}; expected 'frozen' (BatchNorm statistics kept) or 'train' "
                            "(updated by the batches)", param='bn')
    if o['optimizer'] not in OPTIMIZERS:
        raise DarkslimError(f"{{optimizer}} {o['optimizer']!r}; expected one of {', '.join(OPTIMIZERS)}",
                            param='optimizer')
    if not 0 <= o['lrf'] <= 1:
        raise DarkslimError(f"{{lrf}} {o['lrf']!r}; expected the final learning rate as a share of lr, in [0, 1]",
                            param='lrf')
    if not o['floor'] >= 0:
        raise DarkslimError(f"{{floor}} {o['floor']!r}; expected a weight >= 0", param='floor')


def _check_images(images, img_size, model):
    """The image count and the size of the views (None for a tensor, used at its own size)."""
    if torch.is_tensor(images):
        if images.dim() != 4 or images.shape[1] != model.in_channels or not images.is_floating_point() \
                or not len(images):
            raise DarkslimError(f"{{images}} a {images.dtype} tensor {tuple(images.shape)}; expected float "
                                f"[N >= 1, {model.in_channels}, H, W] (RGB 0..1) or a list of image files",
                                param='images')
        if img_size is not None:
            raise DarkslimError(f"{{img_size}} {img_size}: applies to image files; a tensor of images is used at "
                                f"its size {tuple(images.shape[2:])}", param='img_size')
        return len(images), None
    if not len(images):
        raise DarkslimError("{images} empty; expected image files (a list, a folder or a list file) or a tensor "
                            "[N, 3, H, W]", param='images')
    size = max(model.img_size) if img_size is None else img_size
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 32:
        raise DarkslimError(f"{{img_size}} {size!r}; expected a positive multiple of 32", param='img_size')
    return len(images), size


def _check_models(student, teacher):
    if student is teacher:
        raise DarkslimError("{teacher} is the student itself; expected the original model and a separate "
                            "(compact) copy", param='teacher')
    heads = [(m.na, m.nc, m.new_coords) for m in student.modules() if isinstance(m, YOLOLayer)]
    t_heads = [(m.na, m.nc, m.new_coords) for m in teacher.modules() if isinstance(m, YOLOLayer)]
    if heads != t_heads:
        raise DarkslimError(f"student heads (anchors, classes, new_coords) {heads}, teacher {t_heads}; expected "
                            "the same heads", param='teacher')


def _device_of(model):
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device('cpu')


def _optimizer(student, o):
    params = [p for p in student.parameters() if p.requires_grad]
    if o['optimizer'] == 'adam':
        opt = torch.optim.Adam(params, lr=o['lr'], weight_decay=o['weight_decay'])
    else:
        opt = torch.optim.SGD(params, lr=o['lr'], momentum=o['momentum'], nesterov=o['momentum'] > 0,
                              weight_decay=o['weight_decay'])
    iters, lrf = o['iters'], o['lrf']             # cosine from lr to lr * lrf over the iterations
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: lrf + (1 - lrf) * (1 + math.cos(math.pi * min(i, iters) / iters)) / 2)
    return opt, sched


def _student_mode(student, bn):
    """Training mode; with bn='frozen' every BatchNorm in eval mode (normalizes with its running statistics,
    which stay as they are; gamma and beta still train)."""
    student.train()
    if bn == 'frozen':
        for m in student.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def distill(student, teacher, images, iters, *, loss='head', pairs=None, lr=DEFAULT_LR, lrf=0.01, batch=8,
            optimizer='adam', momentum=0.9, weight_decay=0.0, bn='frozen', augment=True, mosaic=True, hyp=None,
            img_size=None, floor=HEAD_FLOOR, seed=0, device=None, log=None, log_every=10):
    """Train `student` (in place) for `iters` steps to reproduce `teacher`'s outputs on `images`; returns a
    DistillReport.  No labels are read: a folder of images without label files is enough.

    images      image files (a list, a folder or a list file): views through utils.datasets'
                LoadImagesAndLabels at `img_size` (default: the student's larger input side), with its mosaic
                (`mosaic`), affine, HSV and flip augmentation from `hyp` when `augment`; or a float tensor
                [N, 3, H, W] (RGB 0..1) used at its size, views through augment_tensor when `augment`.
    loss        'head', 'feature' or 'head+feature' (head_loss with `floor`, feature_loss).  `pairs` for
                'feature': default feature_pairs(teacher, student) (equal head-conv widths); after a channel
                prune pass feature_pairs(teacher, student, plan.keep).
    bn          'frozen': the student's BatchNorms normalize with their running statistics, which stay as they
                are (gamma and beta still train); 'train': they use and update batch statistics.
    optimizer   'adam' or 'sgd' (Nesterov `momentum`), `weight_decay`; learning rate cosine from lr to lr * lrf.
                Adam steps each weight by about lr whatever the gradient's size (even at an exact solution): a
                student that starts close to its teacher wants a small lr.
    device      default: the student's; the student is moved there (a teacher elsewhere is copied there).

    The teacher runs in eval mode under torch.no_grad and is not modified (its modules' modes are restored);
    the student is returned in eval mode.  `log(line)` gets a line at iteration 1, every `log_every` and the
    last.  Deterministic for a `seed` on the CPU; the caller's random state is left as it was."""
    o = dict(locals())
    _check_options(o)
    kinds = _kinds(loss)
    _check_models(student, teacher)
    if isinstance(images, (str, os.PathLike)):      # a folder, a list file or one image
        images = list_images(images)
    n_images, size = _check_images(images, img_size, student)
    device = torch.device(device) if device is not None else _device_of(student)
    student.to(device)
    if _device_of(teacher) != device:                # a copy: the caller's teacher stays where it is
        teacher = copy.deepcopy(teacher).to(device)
    if 'feature' in kinds:
        pairs = check_pairs(teacher, student, feature_pairs(teacher, student) if pairs is None else pairs)
    report = DistillReport(loss, iters, batch, bn, optimizer, lr, n_images, size, augment)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)    # LoadImagesAndLabels' augmentation draws from it
        g = torch.Generator().manual_seed(seed)
        views = _views(images, batch, g, augment, mosaic, hyp, size, device)
        _loop(student, teacher, views, kinds, pairs, o, report)
    student.eval()
    return report


def _loop(student, teacher, views, kinds, pairs, o, report):
    """The optimization steps; fills report.rows and report.seconds."""
    t_layers = [p.teacher for p in pairs] if 'feature' in kinds else []
    s_layers = [p.student for p in pairs] if 'feature' in kinds else []
    opt, sched = _optimizer(student, o)
    _student_mode(student, o['bn'])
    t0, window = time.perf_counter(), []
    for it in range(1, o['iters'] + 1):
        x = next(views)                              # [B, 3, S, S]
        with torch.no_grad():
            t_out = run_model(teacher, x, t_layers, mode='eval')
        s_out = run_model(student, x, s_layers)
        value = distill_loss(o['loss'], s_out, t_out, pairs, o['floor'])
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        lr = opt.param_groups[0]['lr']
        sched.step()
        window.append(value.detach())
        if it == 1 or it % o['log_every'] == 0 or it == o['iters']:
            row = DistillRow(it, float(torch.stack(window).mean()), lr, time.perf_counter() - t0)
            report.rows.append(row)
            window = []
            if o['log'] is not None:
                o['log'](f"distill {row.iter}/{o['iters']}: {o['loss']} loss {row.loss:.4g}, lr {row.lr:.3g}, "
                         f"{row.seconds:.1f} s")
    report.seconds = time.perf_counter() - t0
