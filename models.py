"""Darknet-cfg YOLOv3-family models in PyTorch, their weights I/O, and the `python models.py` CLI.

    python models.py summary  --cfg C [--weights W] [--img-size N]
    python models.py convert  --cfg C --weights IN --out OUT       (.pt <-> .weights)
    python models.py make-cfg --base C --classes N --out OUT
    python models.py export   --cfg C --weights W --out M.onnx [--img-size S] [--batch B | --dynamic | --dynamic-size]
                              [--int8 --data D [--calib N] [--calib-method M] [--float-heads]]
"""
import argparse
import copy
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.darknet_weights import load_darknet_weights, read_header, save_weights
from utils.errors import DarkslimError, cli_main
from utils.io import atomic_path
from utils.parse_config import (cfg_text, conv_geometry, infer_shapes, layer_inputs, maxpool_geometry, parse_cfg,
                                parse_cfg_text, write_cfg, yolo_masks)

__all__ = ['Darknet', 'YOLOLayer', 'parse_cfg', 'write_cfg', 'load_darknet_weights', 'save_weights',
           'load_model', 'save_checkpoint', 'load_checkpoint', 'model_info']

BN_EPS = 1e-5       # darknet's batchnorm epsilon (OpenCV's importer uses 1e-6)
BN_MOMENTUM = 0.03  # running-stat update rate in training (ultralytics' value)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class Mish(nn.Module):
    def forward(self, x):
        return x * torch.tanh(F.softplus(x))


def activation(name):
    return {'leaky': lambda: nn.LeakyReLU(0.1), 'relu': nn.ReLU, 'mish': Mish, 'swish': Swish,
            'logistic': nn.Sigmoid, 'linear': nn.Identity}[name]()


class MaxPoolDarknet(nn.Module):
    """Darknet maxpool: padding `size-1` split floor-left, out-of-range cells ignored (padded with -inf)."""

    def __init__(self, size, stride, padding):
        super().__init__()
        self.size, self.stride = size, stride
        self.pads = (padding // 2, padding - padding // 2) * 2  # (left, right, top, bottom)

    def forward(self, x):
        if any(self.pads):
            x = F.pad(x, self.pads, value=float('-inf'))
        return F.max_pool2d(x, self.size, self.stride)


class Upsample(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.stride, mode='nearest')


class Route(nn.Module):
    """Concatenate inputs along channels; with `groups`, take slice `group_id` of each input first."""

    def __init__(self, groups=1, group_id=0):
        super().__init__()
        self.groups, self.group_id = groups, group_id

    def forward(self, xs):
        if self.groups > 1:
            xs = [x.chunk(self.groups, 1)[self.group_id] for x in xs]
        return xs[0] if len(xs) == 1 else torch.cat(xs, 1)


class Shortcut(nn.Module):
    """Darknet [shortcut]: act(previous layer + each `from` layer), inputs of equal height x width.

    Inputs may differ in channels, as in AlexeyAB shortcut_layer.c (and OpenCV's importer): the output has the
    previous layer's C channels; an input of C_j channels is added to channels 0..min(C, C_j)-1 only, so the
    previous layer's channels past C_j pass unchanged and the input's channels past C are ignored.
    """

    def __init__(self, act):
        super().__init__()
        self.act = activation(act)

    def forward(self, xs):
        out = xs[0]
        c = out.shape[1]
        for x in xs[1:]:
            if x.shape[1] > c:
                x = x[:, :c]
            elif x.shape[1] < c:
                x = F.pad(x, (0, 0, 0, 0, 0, c - x.shape[1]))  # zeros for the channels x lacks
            out = out + x
        return self.act(out)


class YOLOLayer(nn.Module):
    """Darknet [yolo] head: reshape the conv output and decode boxes as darknet's yolo_layer.c does.

    raw:  [B, na, H, W, 5+nc], the conv output.
    decoded (eval): [B, na*H*W, 5+nc] with centre x, y and w, h in input pixels, objectness and class
    probabilities. s = scale_x_y, grid = the cell's column/row, stride = input size / grid size:
      default:        xy = (sigmoid(t)*s - (s-1)/2 + grid) * stride, wh = exp(t) * anchor, obj/cls = sigmoid(t)
      new_coords=1:   the head conv is logistic-activated already (scaled-YOLOv4), so with p the raw output
                      xy = (p*s - (s-1)/2 + grid) * stride, wh = (2p)^2 * anchor, obj/cls = p.
    utils.loss decodes and scores both kinds the same way (new_coords: BCE on the probabilities p).
    """

    def __init__(self, anchors, nc, scale_x_y=1.0, new_coords=False):
        super().__init__()
        self.anchor_list = [tuple(a) for a in anchors]  # pixels; the buffer below is rebuilt from it
        self.register_buffer('anchors', torch.tensor(anchors, dtype=torch.float32).view(-1, 2), persistent=False)
        self.na, self.nc, self.no = len(anchors), nc, nc + 5
        self.scale_x_y = float(scale_x_y)
        self.new_coords = bool(new_coords)
        self.grid = None

    def forward(self, p, img_hw):
        b, _, ny, nx = p.shape
        p = p.view(b, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
        if self.training:
            return p, None
        stride = torch.tensor([img_hw[1] / nx, img_hw[0] / ny], device=p.device, dtype=p.dtype)
        if self.grid is None or self.grid.shape[2:4] != (ny, nx) or self.grid.device != p.device:
            yv, xv = torch.meshgrid(torch.arange(ny, device=p.device), torch.arange(nx, device=p.device),
                                    indexing='ij')
            self.grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).to(p.dtype)
        s = self.scale_x_y
        anchors = self.anchors.to(p.dtype).view(1, self.na, 1, 1, 2)
        if self.new_coords:
            xy = (p[..., :2] * s - (s - 1) / 2 + self.grid) * stride
            wh = (2 * p[..., 2:4]) ** 2 * anchors
            rest = p[..., 4:]
        else:
            xy = (torch.sigmoid(p[..., :2]) * s - (s - 1) / 2 + self.grid) * stride
            wh = torch.exp(p[..., 2:4]) * anchors
            rest = torch.sigmoid(p[..., 4:])
        return p, torch.cat((xy, wh, rest), -1).view(b, -1, self.no)


def create_modules(module_defs, in_channels):
    """nn.ModuleList matching the layer sections. Conv layers are Sequential(Conv2d[, BatchNorm2d], act),
    indexable as m[0] conv, m[1] bn (when batch_normalize)."""
    module_list = nn.ModuleList()
    channels = []
    for i, d in enumerate(module_defs):
        t = d['type']
        c_in = channels[-1] if channels else in_channels
        if t == 'convolutional':
            size, stride, pad, groups = conv_geometry(d)
            bn = d.get('batch_normalize', 0)
            m = nn.Sequential()
            m.add_module('Conv2d', nn.Conv2d(c_in, d['filters'], size, stride, pad, groups=groups, bias=not bn))
            if bn:
                m.add_module('BatchNorm2d', nn.BatchNorm2d(d['filters'], eps=BN_EPS, momentum=BN_MOMENTUM))
            m.add_module('activation', activation(d.get('activation', 'logistic')))
            c_out = d['filters']
        elif t == 'maxpool':
            m = MaxPoolDarknet(*maxpool_geometry(d))
            c_out = c_in
        elif t == 'upsample':
            m = Upsample(d.get('stride', 2))
            c_out = c_in
        elif t == 'route':
            groups = d.get('groups', 1)
            m = Route(groups, d.get('group_id', 0))
            c_out = sum(channels[j] // groups for j in layer_inputs([None] + module_defs, i))
        elif t == 'shortcut':
            m = Shortcut(d.get('activation', 'linear'))
            c_out = c_in  # the previous layer's channels, whatever the `from` layers hold (see Shortcut)
        elif t == 'yolo':
            anchors = [d['anchors'][k] for k in yolo_masks(d)]
            m = YOLOLayer(anchors, d.get('classes', 20), d.get('scale_x_y', 1.0), d.get('new_coords', 0))
            c_out = c_in
        module_list.append(m)
        channels.append(c_out)
    return module_list


class Darknet(nn.Module):
    """A YOLOv3-family model built from a Darknet cfg (path, or the `parse_cfg` list of sections).

    eval: `model(x)` -> (inference [B, N, 5+nc], raw [per yolo layer: B, na, H, W, 5+nc]); train: raw.
    """

    def __init__(self, cfg, img_size=None, init_weights=True):
        """`init_weights=False` skips PyTorch's random init (tensors hold garbage until loaded): for callers
        that load every parameter and running statistic next, as `load_model` does."""
        super().__init__()
        if isinstance(cfg, (str, os.PathLike)):
            defs = parse_cfg(cfg)
        else:
            defs = copy.deepcopy(list(cfg))
            infer_shapes(defs)
        self.hyperparams, self.module_defs = defs[0], defs[1:]
        net = self.hyperparams
        if img_size is None:
            img_size = (net['height'], net['width'])  # infer_shapes has checked both are set
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_channels = net.get('channels', 3)
        if init_weights:
            self.module_list = create_modules(self.module_defs, self.in_channels)
        else:
            with torch.device('meta'):
                self.module_list = create_modules(self.module_defs, self.in_channels)
            self.module_list.to_empty(device='cpu')
            with torch.no_grad():
                for m in self.module_list:
                    if isinstance(m, YOLOLayer):
                        m.anchors.copy_(torch.tensor(m.anchor_list, dtype=torch.float32))
                    elif isinstance(m, nn.Sequential) and isinstance(m[1], nn.BatchNorm2d):
                        m[1].num_batches_tracked.zero_()
        self.inputs = [layer_inputs([None] + self.module_defs, i) for i in range(len(self.module_defs))]
        # keep only outputs some later layer reads out of order (route/shortcut sources)
        self.keep = sorted({j for i, ins in enumerate(self.inputs) for j in ins
                            if self.module_defs[i]['type'] in ('route', 'shortcut')})
        self.yolo_layers = [i for i, d in enumerate(self.module_defs) if d['type'] == 'yolo']
        self.header = None  # darknet .weights header read by load_darknet_weights

    @property
    def defs(self):
        """[net] + layer sections (what `write_cfg` takes)."""
        return [self.hyperparams] + self.module_defs

    def cfg_text(self):
        return cfg_text(self.defs)

    def forward(self, x):
        img_hw = x.shape[-2:]
        keep, saved = set(self.keep), {}
        raw, decoded = [], []
        for i, (d, m) in enumerate(zip(self.module_defs, self.module_list)):
            t = d['type']
            if t in ('route', 'shortcut'):
                x = m([x if j == i - 1 and j not in saved else saved[j] for j in self.inputs[i]])
            elif t == 'yolo':
                p, dec = m(x, img_hw)
                raw.append(p)
                decoded.append(dec)
            else:
                x = m(x)
            if i in keep:
                saved[i] = x
        if self.training:
            return raw
        return torch.cat(decoded, 1), raw

    def fuse(self):
        """Fold each BatchNorm into its conv (inference only); returns self."""
        for i, d in enumerate(self.module_defs):
            m = self.module_list[i]
            if d['type'] != 'convolutional' or not d.get('batch_normalize', 0) or len(m) < 3:
                continue
            conv, bn = m[0], m[1]
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              groups=conv.groups, bias=True).to(conv.weight.device)
            with torch.no_grad():
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
                fused.bias.copy_(bn.bias - bn.running_mean * scale)
            self.module_list[i] = nn.Sequential(fused, m[2])
        return self

    @property
    def nc(self):
        return self.module_list[self.yolo_layers[0]].nc


# --- checkpoints ----------------------------------------------------------------------------------------------

def is_torch_file(path):
    """True when `path` is a PyTorch checkpoint (zip archive or legacy pickle), by content."""
    with open(path, 'rb') as f:
        head = f.read(4)
    return head[:4] == b'PK\x03\x04' or head[:1] == b'\x80'


def save_checkpoint(path, model, **extra):
    """Write {'model': state_dict, 'cfg': cfg text, **extra} atomically (plain data only)."""
    ckpt = {'model': {k: v.detach().cpu() for k, v in model.state_dict().items()}, 'cfg': model.cfg_text(), **extra}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def read_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise DarkslimError(f"{path}: not a readable darkslim checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise DarkslimError(f"{path}: checkpoint has no 'model' state_dict; expected a darkslim .pt")
    return ckpt


def checkpoint_args(path):
    """The training options stored in a train.py checkpoint ({} when it stores none), read without loading
    its tensors into memory (memory-mapped)."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError:                             # a legacy (non-zip) file cannot be memory-mapped
        ckpt = read_checkpoint(path)
    return dict(ckpt.get('args') or {}) if isinstance(ckpt, dict) else {}


def load_state_checked(model, state, path):
    """load_state_dict, refusing (with the first offending tensor and both shapes) any mismatch."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            raise DarkslimError(f"{path}: tensor {k} missing from checkpoint; cfg needs shape {tuple(v.shape)}")
        if tuple(state[k].shape) != tuple(v.shape):
            raise DarkslimError(f"{path}: tensor {k} has shape {tuple(state[k].shape)}; "
                                f"the cfg needs {tuple(v.shape)}")
    for k in state:
        if k not in own:
            raise DarkslimError(f"{path}: tensor {k} {tuple(state[k].shape)} is not in the cfg's model")
    model.load_state_dict(state)


def load_checkpoint(model, path):
    ckpt = read_checkpoint(path)
    load_state_checked(model, ckpt['model'], path)
    return ckpt


def checkpoint_cfg(ckpt, path):
    """The cfg sections stored in a checkpoint dict read from `path`."""
    if 'cfg' not in ckpt:
        raise DarkslimError(f"{path}: checkpoint stores no cfg; expected a cfg file given with it")
    return parse_cfg_text(ckpt['cfg'], f"{path}[cfg]")


def check_weights_path(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DarkslimError(f"{path}: no such weights file")
    return path


def load_weights_any(model, path, cutoff=None):
    """Load `.pt` or darknet `.weights` into `model`, deciding by content."""
    path = check_weights_path(path)
    if is_torch_file(path):
        if cutoff is not None:
            raise DarkslimError(f"{path}: a layer cutoff applies to darknet .weights, not .pt checkpoints")
        return load_checkpoint(model, path)
    return load_darknet_weights(model, path, cutoff)


def load_model(cfg, weights=None, device='cpu', img_size=None, cutoff=None):
    """Build a Darknet from `cfg` (path or sections; None = the cfg stored in a .pt `weights`), load
    `weights` (.weights or .pt, by content) and return it on `device` in eval mode."""
    if weights is None:
        if cfg is None:
            raise DarkslimError("no cfg given; expected a cfg, or a .pt checkpoint that stores one")
        return Darknet(cfg, img_size).to(device).eval()
    weights = check_weights_path(weights)
    full = cutoff is None  # every tensor comes from the file: skip the random init
    if is_torch_file(weights):
        if cutoff is not None:
            raise DarkslimError(f"{weights}: a layer cutoff applies to darknet .weights, not .pt checkpoints")
        ckpt = read_checkpoint(weights)
        model = Darknet(checkpoint_cfg(ckpt, weights) if cfg is None else cfg, img_size, init_weights=False)
        load_state_checked(model, ckpt['model'], weights)
    else:
        if cfg is None:
            raise DarkslimError(f"{weights}: darknet .weights store no cfg; expected a cfg file given with them")
        model = Darknet(cfg, img_size, init_weights=not full)
        load_darknet_weights(model, weights, cutoff)
    return model.to(device).eval()


def resolve_model(model_or_cfg, weights=None, device='cpu', img_size=None):
    """(model, name): a model object as it is (on its own device), or one built from a cfg path (None: the
    cfg stored in a .pt `weights`) + `weights` with load_model on `device`."""
    if isinstance(model_or_cfg, nn.Module):
        return model_or_cfg, type(model_or_cfg).__name__
    model = load_model(model_or_cfg, weights, device=device, img_size=img_size)
    return model, os.fspath(model_or_cfg if model_or_cfg is not None else weights)


def stored_cfg(path):
    """The cfg sections a darkslim .pt at `path` stores (shapes checked), read without loading its tensors into
    memory (memory-mapped); a DarkslimError for a darknet .weights file or a .pt without a cfg."""
    path = check_weights_path(path)
    if not is_torch_file(path):
        raise DarkslimError(f"{path}: darknet .weights store no cfg; expected a cfg file given with them")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError:                             # a legacy (non-zip) file cannot be memory-mapped
        ckpt = read_checkpoint(path)
    defs = checkpoint_cfg(ckpt if isinstance(ckpt, dict) else {}, path)
    infer_shapes(defs)
    return defs


# --- transfer: weights of the same network with another class count (or partly other shapes) -------------------

def with_classes(defs, nc):
    """A copy of cfg sections `defs` ([net] + layers) for `nc` classes: every conv feeding a [yolo] gets
    len(mask) * (nc + 5) filters and the [yolo] classes=nc; shapes checked (infer_shapes)."""
    defs = copy.deepcopy(list(defs))
    for i, d in enumerate(defs[1:]):
        if d['type'] != 'yolo':
            continue
        src = layer_inputs(defs, i)[0]
        if defs[src + 1]['type'] != 'convolutional':
            where = f"{d.where()} (layer {i})" if hasattr(d, 'where') else f"layer {i}"
            raise DarkslimError(f"{where}: [yolo] is fed by [{defs[src + 1]['type']}] {src}; expected a "
                                "[convolutional] head conv")
        defs[src + 1]['filters'] = len(yolo_masks(d)) * (nc + 5)
        d['classes'] = nc
    infer_shapes(defs)
    return defs


def conv_floats(defs):
    """[(conv layer index, floats)] a darknet .weights body holds for the network `defs`, in file order
    (utils.darknet_weights' layout: per conv, 4 x filters with batch_normalize (beta, gamma, mean, var) else
    filters (bias), then the weights)."""
    shapes = infer_shapes(defs)
    out = []
    for i, d in enumerate(defs[1:]):
        if d['type'] != 'convolutional':
            continue
        size, _, _, groups = conv_geometry(d)
        c_in = shapes[i - 1][0] if i else defs[0].get('channels', 3)
        f = d['filters']
        out.append((i, f * (c_in // groups) * size * size + f * (4 if d.get('batch_normalize', 0) else 1)))
    return out


def darknet_floats(defs):
    """Floats a darknet .weights body holds for the whole network `defs` (see conv_floats)."""
    return sum(n for _, n in conv_floats(defs))


def _prefix_hint(defs, n):
    """'; layers 0..K-1 of this cfg need exactly that many (...: read it with a layer cutoff of K)' when the
    first K layers of `defs` hold exactly n floats (a partial file such as darknet53.conv.74), else ''."""
    total = 0
    for i, k in conv_floats(defs):
        total += k
        if total == n:
            return (f"; layers 0..{i} of this cfg need exactly that many (a partial file such as "
                    f"darknet53.conv.74: read it with a layer cutoff of {i + 1})")
        if total > n:
            break
    return ''


def _weights_body_floats(path):
    with open(path, 'rb') as f:
        read_header(f)
        return (os.fstat(f.fileno()).st_size - f.tell()) // 4


def darknet_classes(defs, path):
    """The class count nc for which the darknet .weights file `path` holds exactly the floats of network `defs`
    with nc classes (with_classes): a .weights file stores no cfg, so the class count of the network that wrote
    it is solved from the file's length. The float count is affine in nc, A + B * nc (B: the head convs' floats
    per class), so nc = (n - A) / B, accepted only when it is a whole number >= 1 and the network with nc
    classes needs exactly n floats. Raises one DarkslimError when no class count fits."""
    n = _weights_body_floats(path)
    own = darknet_floats(defs)
    if n == own:
        return max([d.get('classes', 20) for d in defs[1:] if d['type'] == 'yolo'] or [None])
    f1, f2 = darknet_floats(with_classes(defs, 1)), darknet_floats(with_classes(defs, 2))
    per = f2 - f1
    nc = 1 + (n - f1) // per if per > 0 and n >= f1 and (n - f1) % per == 0 else None
    if nc is None or darknet_floats(with_classes(defs, nc)) != n:
        raise DarkslimError(
            f"{path}: holds {n} floats after the header; this cfg's network needs {f1} + {per} x (classes - 1) "
            f"({own} for its own class count), and no class count fits{_prefix_hint(defs, n)}; expected the darknet "
            ".weights of this network with any class count, or a layer cutoff to read only the first layers")
    return nc


@dataclass
class Transfer:
    """What load_transfer took from a weights file: `loaded` the layers whose every tensor came from it,
    `kept` {layer: why} the layers with parameters left at their initialisation, `unused` the file's other
    layers with tensors that went nowhere (the cfg has no such layer), `source_nc` the class count of the file's
    network (None when the file does not say)."""
    path: str
    loaded: list
    kept: dict
    source_nc: int = None
    nc: int = None
    unused: list = field(default_factory=list)

    @property
    def exact(self):
        """Every tensor of the model came from the file and every tensor of the file went into the model."""
        return not self.kept and not self.unused

    def line(self, types):
        """One line for a user: what was loaded and which layers (index + type, from `types` {layer: type})
        were left at their initialisation, and why."""
        classes = '' if self.source_nc in (None, self.nc) else f" ({self.source_nc} classes -> {self.nc})"
        kept = ', '.join(f"{i} {types[i]} ({why})" for i, why in sorted(self.kept.items()))
        unused = f"; not in the cfg, unused: the file's layers {_spans(self.unused)}" if self.unused else ''
        return (f"transfer {self.path}{classes}: loaded {len(self.loaded)} of {len(self.loaded) + len(self.kept)} "
                f"layers with parameters; left at their initialisation: {kept or 'none'}{unused}")


def _spans(indices):
    """'3, 7..9' for [3, 7, 8, 9]."""
    out, run = [], []
    for i in sorted(indices):
        if run and i != run[-1] + 1:
            out.append(run)
            run = []
        run.append(i)
    out += [run] if run else []
    return ', '.join(str(r[0]) if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in out)


def _by_layer(state):
    """{layer index: {tensor name after 'module_list.<i>.': tensor}} of a Darknet state_dict."""
    out = {}
    for k, v in state.items():
        head, _, rest = k.partition('.')
        idx, _, name = rest.partition('.')
        if head == 'module_list' and idx.isdigit():
            out.setdefault(int(idx), {})[name] = v
    return out


def _shape(t):
    return 'x'.join(map(str, t.shape)) or 'scalar'


def _layer_mismatch(own, theirs):
    """Why a layer's tensors in the file (`theirs`, None: no such layer) cannot replace `own`; None when every
    tensor is there with its shape and the file holds no other tensor for the layer."""
    if not theirs:
        return 'not in the file'
    for name, t in own.items():
        if name not in theirs:
            return f"no {name} in the file"
        if theirs[name].shape != t.shape:
            return f"{name} {_shape(theirs[name])} in the file, {_shape(t)} here"
    extra = sorted(set(theirs) - set(own))
    return f"{extra[0]} in the file, none here" if extra else None


def transfer_state(model, state, path, source_nc=None):
    """Copy into `model` every layer of Darknet state_dict `state` whose tensors all fit (same names, same
    shapes): all or nothing per layer, so that a conv never runs with another layer's BatchNorm (a conv whose
    weight fits but whose batch_normalize differs is left at its initialisation). Returns a Transfer; a
    DarkslimError when no layer with parameters fits."""
    own, theirs = _by_layer(model.state_dict()), _by_layer(state)
    loaded, kept = [], {}
    with torch.no_grad():
        for i, tensors in sorted(own.items()):
            why = _layer_mismatch(tensors, theirs.get(i))
            if why is not None:
                kept[i] = why
                continue
            for name, t in tensors.items():
                t.copy_(theirs[i][name])
            loaded.append(i)
    if not loaded and kept:
        i = min(kept)
        raise DarkslimError(f"{path}: no layer of the file fits the cfg (layer {i}: {kept[i]}); expected weights "
                            "of this network (any class count)")
    unused = sorted(set(theirs) - set(own))
    return Transfer(os.fspath(path), loaded, kept, source_nc, model.nc if model.yolo_layers else None, unused)


def load_transfer(model, path):
    """Load `.pt` or darknet `.weights` (by content) into `model` layer by layer where the shapes fit, for
    training a network from weights of another class count (see transfer_state); returns a Transfer.

    A .pt gives its tensors by name. A .weights file is read with the shapes of the network that wrote it:
    the model's own network with the class count darknet_classes solves from the file's length (all heads
    share it), so the head convs (and only layers whose shapes depend on the class count) are left out."""
    path = check_weights_path(path)
    if is_torch_file(path):
        ckpt = read_checkpoint(path)
        nc = None
        if 'cfg' in ckpt:
            heads = [d for d in checkpoint_cfg(ckpt, path) if d['type'] == 'yolo']
            nc = heads[0].get('classes', 20) if heads else None
        return transfer_state(model, ckpt['model'], path, nc)
    nc = darknet_classes(model.defs, path)
    if nc is None or nc == model.nc:
        load_darknet_weights(model, path)
        return Transfer(path, [i for i in _by_layer(model.state_dict())], {}, nc, nc)
    source = Darknet(with_classes(model.defs, nc), model.img_size, init_weights=False)
    load_darknet_weights(source, path)
    return transfer_state(model, source.state_dict(), path, nc)


# --- summary --------------------------------------------------------------------------------------------------

@dataclass
class LayerRow:
    """One layer as darknet prints it at start-up: shapes are 'CxHxW' text, geometry e.g. '3x3/2' or '-1,61'."""
    layer: int
    type: str
    filters: object
    geometry: str
    input: str
    output: str
    params: int
    bflops: float


def layer_table(defs, height, width):
    """One LayerRow per layer (index, type, filters, size/stride, input shape, output shape, params, BFLOPs) as
    darknet prints them. BFLOPs as AlexeyAB darknet totals them: conv 2*MACs (convolutional_layer.c),
    maxpool size*size*c*out_h*out_w (maxpool_layer.c), shortcut out_w*out_h*out_c*n (shortcut_layer.c)."""
    shapes = infer_shapes(defs, height, width)
    net = defs[0]
    rows = []
    for i, d in enumerate(defs[1:]):
        ins = layer_inputs(defs, i)
        in_shape = shapes[i - 1] if i else (net.get('channels', 3), height, width)
        out = shapes[i]
        params, bflops, geom, filters = 0, 0.0, '', ''
        if d['type'] == 'convolutional':
            size, stride, pad, groups = conv_geometry(d)
            c_in = in_shape[0]
            params = d['filters'] * c_in // groups * size * size + d['filters'] * (2 if d.get('batch_normalize') else 1)
            bflops = 2 * d['filters'] * (c_in // groups) * size * size * out[1] * out[2] / 1e9
            geom, filters = f"{size}x{size}/{stride}", d['filters']
        elif d['type'] == 'maxpool':
            size, stride, _ = maxpool_geometry(d)
            bflops = size * size * in_shape[0] * out[1] * out[2] / 1e9  # darknet maxpool_layer.c
            geom = f"{size}x{size}/{stride}"
        elif d['type'] == 'upsample':
            geom = f"x{d.get('stride', 2)}"
        elif d['type'] in ('route', 'shortcut'):
            geom = ','.join(str(j) for j in ins)
            if d['type'] == 'shortcut':  # darknet shortcut_layer.c: out_w*out_h*out_c*n, n = len(from)
                bflops = out[0] * out[1] * out[2] * (len(ins) - 1) / 1e9
        rows.append(LayerRow(i, d['type'], filters, geom, 'x'.join(map(str, in_shape)), 'x'.join(map(str, out)),
                             params, bflops))
    return rows


def model_info(defs, height=None, width=None):
    """(trainable params as PyTorch counts them, BFLOPs as darknet counts them)."""
    net = defs[0]
    rows = layer_table(defs, height or net['height'], width or net['width'])
    return sum(r.params for r in rows), sum(r.bflops for r in rows)


def summary(cfg, weights=None, img_size=None):
    """Print the per-layer table and `total: <params> params, <X.XXX> BFLOPs`; returns (params, bflops).
    With `weights`, they are checked against the cfg first: a file that does not fit prints nothing."""
    from terminaltables import AsciiTable
    defs = parse_cfg(cfg) if not isinstance(cfg, list) else cfg
    h = img_size or defs[0]['height']
    w = img_size or defs[0]['width']
    if weights is not None:
        load_weights_any(Darknet(defs, (h, w)), weights)
    rows = layer_table(defs, h, w)
    table = [['layer', 'type', 'filters', 'size/stride', 'input', 'output', 'params', 'BFLOPs']]
    table += [[r.layer, r.type, r.filters, r.geometry, r.input, r.output, r.params,
               f"{r.bflops:.3f}" if r.bflops else ''] for r in rows]
    print(AsciiTable(table).table)
    if weights is not None:
        print(f"weights: {weights} fits the cfg")
    params, bflops = sum(r.params for r in rows), sum(r.bflops for r in rows)
    print(f"total: {params} params, {bflops:.3f} BFLOPs")
    return params, bflops


def refuse_overwrite(out, *inputs):
    """Inputs are never modified: refuse an output path that names one of them."""
    for p in inputs:
        if p is not None and os.path.exists(out) and os.path.exists(p) and os.path.samefile(out, p):
            raise DarkslimError(f"--out {out} is the input {p}; expected a new path (inputs are never modified)")


def convert(cfg, weights, out):
    """`.pt` <-> `.weights`: the output format follows `out`'s extension."""
    refuse_overwrite(out, weights, cfg)
    model = load_model(cfg, weights)
    if os.path.splitext(out)[1] == '.pt':
        save_checkpoint(out, model)
    else:
        save_weights(model, out)
    print(f"{weights} -> {out}")
    return out


def make_cfg(base, classes, out):
    """The same network for `classes` classes: each conv feeding a [yolo] gets len(mask)*(classes+5) filters."""
    if classes < 1:
        raise DarkslimError(f"{{classes}} {classes}; expected a positive class count", param='classes')
    refuse_overwrite(out, base)
    defs = with_classes(parse_cfg(base), classes)
    write_cfg(out, defs)
    print(f"wrote {out} for {classes} classes")
    return out


def export(cfg, weights, out, img_size=None, batch=1, dynamic=False, opset=17, dynamic_size=False, int8=False,
           data=None, calib=None, calib_method=None, float_heads=None):
    """ONNX file of cfg + weights (BN fused; outputs `detections` and the raw `yolo_<layer>` tensors; see
    utils/onnx_export.py). Needs the `onnx` package (and onnxruntime to run the result). dynamic_size: height
    and width are dynamic axes (with the batch). int8: statically quantized (utils/quantize.py), calibrated on
    `calib` images (default quantize.DEFAULT_CALIB; all when fewer) of .data file `data`'s train split, never
    its valid split, with `calib_method` (default quantize.DEFAULT_METHOD); float_heads: the convs feeding
    [yolo] stay float (default quantize.FLOAT_HEADS)."""
    import tempfile

    from utils.onnx_export import export_onnx
    refuse_overwrite(out, weights, cfg, data)
    hw = (img_size, img_size) if img_size else None
    kw = dict(img_size=hw, batch=batch, dynamic=dynamic, dynamic_hw=dynamic_size, opset=opset)
    if not int8:
        print(export_onnx(load_model(cfg, weights), out, **kw).summary())
        return out
    from calibrate import calibration_files
    from utils import quantize
    if quantize.missing():
        raise DarkslimError(quantize.missing())
    if data is None:
        raise DarkslimError("INT8 export without a .data file; expected one whose train images calibrate it",
                            param='data')
    model = load_model(cfg, weights)
    h, w = hw or model.img_size
    if h != w:
        raise DarkslimError(f"INT8 export at {h}x{w}; expected a square input size (calibration letterboxes to a "
                            "square, as evaluation does)", param='img_size')
    files = calibration_files(data, calib or quantize.DEFAULT_CALIB)
    with tempfile.TemporaryDirectory(prefix='darkslim-export-') as tmp:
        fp32 = export_onnx(model, os.path.join(tmp, 'fp32.onnx'), **kw)
        quantize.quantize_onnx(fp32.path, out, files, h, method=calib_method or quantize.DEFAULT_METHOD,
                               float_heads=quantize.FLOAT_HEADS if float_heads is None else float_heads,
                               batch=1 if dynamic or dynamic_size else batch)
    return out


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    s = sub.add_parser('summary', help='per-layer table, params and BFLOPs; validate weights')
    s.add_argument('--cfg', required=True)
    s.add_argument('--weights')
    s.add_argument('--img-size', type=int)
    c = sub.add_parser('convert', help='.pt <-> .weights')
    c.add_argument('--cfg', help='cfg (optional for a .pt that stores one)')
    c.add_argument('--weights', required=True)
    c.add_argument('--out', required=True)
    m = sub.add_parser('make-cfg', help='the same network for another class count')
    m.add_argument('--base', required=True)
    m.add_argument('--classes', type=int, required=True)
    m.add_argument('--out', required=True)
    from utils import quantize
    e = sub.add_parser('export', help='ONNX for onnxruntime / TensorRT / OpenVINO (needs the onnx package)',
                       description=quantize.EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument('--cfg', help='cfg (optional for a .pt that stores one)')
    e.add_argument('--weights', required=True)
    e.add_argument('--out', required=True, help='the .onnx file to write')
    e.add_argument('--img-size', type=int, help="input side (default: the cfg's width x height)")
    size = e.add_mutually_exclusive_group()
    size.add_argument('--batch', type=int, default=1, help='fixed batch size (default 1)')
    size.add_argument('--dynamic', action='store_true', help='dynamic batch axis')
    size.add_argument('--dynamic-size', action='store_true',
                      help='dynamic batch, height and width (sizes that keep every head stride whole)')
    e.add_argument('--opset', type=int, default=17)
    e.add_argument('--int8', action='store_true',
                   help='statically quantized INT8 model (QDQ; needs onnxruntime too; calibrated on --data train)')
    e.add_argument('--data', help='--int8: .data file whose train= images calibrate (its valid= is never read)')
    e.add_argument('--calib', type=int, default=quantize.DEFAULT_CALIB,
                   help=f'--int8: calibration images (default {quantize.DEFAULT_CALIB}; all when fewer)')
    e.add_argument('--calib-method', choices=list(quantize.METHODS), default=quantize.DEFAULT_METHOD,
                   help=f'--int8: activation range calibration (default {quantize.DEFAULT_METHOD}, chosen by '
                        'measured mAP: see above)')
    e.add_argument('--float-heads', action=argparse.BooleanOptionalAction, default=quantize.FLOAT_HEADS,
                   help='--int8: keep the convs feeding [yolo] in float (default: '
                        f'{"yes" if quantize.FLOAT_HEADS else "no"}, measured: see above)')
    return p


def main(args):
    if args.command == 'summary':
        summary(args.cfg, args.weights, args.img_size)
    elif args.command == 'convert':
        convert(args.cfg, args.weights, args.out)
    elif args.command == 'make-cfg':
        try:
            make_cfg(args.base, args.classes, args.out)
        except DarkslimError as e:                      # the library names its parameter; show the flag
            raise DarkslimError(e.shown({'classes': '--classes'}), param=e.param) from None
    elif args.command == 'export':
        if args.batch < 1:
            raise DarkslimError(f"--batch {args.batch}; expected a positive batch size")
        if args.calib < 1:
            raise DarkslimError(f"--calib {args.calib}; expected a positive number of images")
        if args.int8 and args.data is None:
            raise DarkslimError("--int8 without --data; expected --data D (its train images calibrate)")
        export(args.cfg, args.weights, args.out, args.img_size, args.batch, args.dynamic, args.opset,
               dynamic_size=args.dynamic_size, int8=args.int8, data=args.data, calib=args.calib,
               calib_method=args.calib_method, float_heads=args.float_heads)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
