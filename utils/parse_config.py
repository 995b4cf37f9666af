"""Darknet `.cfg` text: parse and write, exact inverses.

`parse_cfg(path)` returns `[net, layer0, layer1, ...]`: one `Section` (a dict with `'type'` plus typed options)
per `[section]`. Values are typed here, once:
  - comma lists (`layers`, `from`, `mask`, `steps`, `scales`, ...) -> list of int/float,
  - `anchors` -> list of (w, h) pairs,
  - numbers -> int when written as an integer, else float,
  - anything else -> str.
`write_cfg(path, defs)` writes text that AlexeyAB darknet and OpenCV read, such that
`parse_cfg(write_cfg(p2, parse_cfg(p))) == parse_cfg(p)`; anchors and every other key are written back as given.

Layer indices follow darknet: layer i is `defs[i + 1]`; in `[route] layers` and `[shortcut] from` a negative index
is relative to the layer itself, a non-negative one absolute.
"""
import os

from utils.errors import DarkslimError
from utils.io import write_text_atomic

# Keys each section may carry (darknet parser.c / AlexeyAB parser.c option names).  Anything else is refused:
# a typo such as `filter=` silently ignored by darknet is the classic source of a broken model.
NET_KEYS = {
    'batch', 'subdivisions', 'width', 'height', 'channels', 'momentum', 'decay', 'angle', 'saturation',
    'exposure', 'hue', 'learning_rate', 'burn_in', 'max_batches', 'policy', 'steps', 'scales', 'step', 'gamma',
    'power', 'mosaic', 'mosaic_bound', 'cutmix', 'mixup', 'blur', 'gaussian_noise', 'flip', 'letter_box',
    'jitter', 'aspect', 'min_crop', 'max_crop', 'max_chart_loss', 'adam', 'B1', 'B2', 'eps', 'loss_scale',
    'label_smooth_eps', 'resize_step', 'dynamic_minibatch', 'optimized_memory', 'workspace_size_limit_MB',
    'ema_alpha', 'track', 'time_steps', 'augment_speed', 'sequential_subdivisions', 'seq_scales',
    'try_fix_nan', 'inputs', 'contrastive', 'unsupervised', 'adversarial_lr', 'attention', 'use_cuda_graph',
    'show_receptive_field', 'burnin_update', 'rate', 'max_crop', 'random',
}
LAYER_KEYS = {
    'convolutional': {'batch_normalize', 'filters', 'size', 'stride', 'pad', 'padding', 'groups', 'activation'},
    'shortcut': {'from', 'activation'},
    'route': {'layers', 'groups', 'group_id'},
    'upsample': {'stride'},
    'maxpool': {'size', 'stride', 'padding'},
    'yolo': {'mask', 'anchors', 'classes', 'num', 'jitter', 'ignore_thresh', 'truth_thresh', 'random',
             'scale_x_y', 'iou_loss', 'iou_normalizer', 'cls_normalizer', 'obj_normalizer', 'delta_normalizer',
             'beta_nms', 'max_delta', 'nms_kind', 'iou_thresh', 'iou_thresh_kind', 'resize', 'new_coords',
             'label_smooth_eps', 'focal_loss', 'counters_per_class', 'objectness_smooth', 'max', 'map',
             'track_history_size', 'sim_thresh', 'dets_for_track', 'dets_for_show', 'track_ciou_norm',
             'embedding_layer', 'uc_normalizer', 'show_details', 'equidistant_point'},
}
# Always lists, even when one value is given (`layers=-4`, `from=-3`).
LIST_KEYS = {'layers', 'from', 'mask', 'steps', 'scales', 'seq_scales', 'counters_per_class'}
ACTIVATIONS = {'leaky', 'linear', 'relu', 'mish', 'swish', 'logistic'}


class Section(dict):
    """A cfg section: dict of typed options plus `type`; remembers where it was read (`file`, `line`)."""

    def __init__(self, *args, file=None, line=None, **kw):
        super().__init__(*args, **kw)
        self.file, self.line = file, line
        self.lines = {}  # key -> line number it was read from

    def where(self, key=None):
        """'file:line' of the section header, or of `key` when it was read from a file."""
        if not self.file:
            return f"[{self['type']}]"
        return f"{self.file}:{self.lines.get(key, self.line)}"


def _number(text):
    try:
        return int(text)
    except ValueError:
        return float(text)  # raises ValueError for non-numbers


def _typed(key, text, where):
    """Type one option value. `where` is 'file:line' for the error message."""
    try:
        if key == 'anchors':
            vals = [_number(v) for v in text.split(',') if v.strip()]
            if len(vals) % 2:
                raise DarkslimError(f"{where}: anchors has {len(vals)} numbers; expected w,h pairs")
            return [(vals[i], vals[i + 1]) for i in range(0, len(vals), 2)]
        if key in LIST_KEYS:
            return [_number(v) for v in text.split(',') if v.strip()]
        if ',' in text:
            return [_number(v) for v in text.split(',') if v.strip()]
        return _number(text)
    except ValueError:
        if key in LIST_KEYS or key == 'anchors':
            raise DarkslimError(f"{where}: {key}={text!r} is not a comma list of numbers") from None
        return text


def parse_cfg_text(text, path='<cfg>'):
    """Parse cfg text into sections (no graph validation; see `parse_cfg`)."""
    defs = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split('#', 1)[0].split(';', 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{n}"
        if line.startswith('['):
            if not line.endswith(']'):
                raise DarkslimError(f"{where}: {raw.strip()!r} is not a section header; expected [name]")
            kind = line[1:-1].strip()
            if kind == 'network':
                kind = 'net'
            if kind != 'net' and kind not in LAYER_KEYS:
                raise DarkslimError(f"{where}: unknown section [{kind}]; expected one of "
                                    f"[net], " + ', '.join(f'[{k}]' for k in LAYER_KEYS))
            if (kind == 'net') != (not defs):
                raise DarkslimError(f"{where}: [{kind}] here; expected [net] first and only once")
            defs.append(Section(type=kind, file=path, line=n))
            continue
        if '=' not in line:
            raise DarkslimError(f"{where}: {raw.strip()!r} has no '='; expected key=value")
        if not defs:
            raise DarkslimError(f"{where}: {raw.strip()!r} comes before the first section; expected [net] first")
        key, value = (s.strip() for s in line.split('=', 1))
        sec = defs[-1]
        allowed = NET_KEYS if sec['type'] == 'net' else LAYER_KEYS[sec['type']]
        if key not in allowed:
            raise DarkslimError(f"{where}: unknown key {key!r} in [{sec['type']}]; expected one of "
                                + ', '.join(sorted(allowed)))
        if key in sec:
            raise DarkslimError(f"{where}: {key!r} given twice in [{sec['type']}] (line {sec.line})")
        if key == 'activation' and value not in ACTIVATIONS:
            raise DarkslimError(f"{where}: activation={value!r}; expected one of " + ', '.join(sorted(ACTIVATIONS)))
        sec[key] = _typed(key, value, where)
        sec.lines[key] = n
    if not defs:
        raise DarkslimError(f"{path}: no sections; expected [net] followed by layers")
    return defs


def parse_cfg(path):
    """Read a Darknet cfg file -> `[net, layer0, ...]`, validated (indices, activations, yolo channels)."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise DarkslimError(f"{path}: cannot read cfg ({e.strerror})") from None
    defs = parse_cfg_text(text, path)
    infer_shapes(defs)
    return defs


def _format(value):
    if isinstance(value, list):
        if value and isinstance(value[0], tuple):
            return ', '.join(f"{w},{h}" for w, h in value)
        return ','.join(str(v) for v in value)
    return str(value)


def cfg_text(defs):
    """Sections -> cfg text (the exact inverse of `parse_cfg_text` on values)."""
    out = []
    for sec in defs:
        out.append(f"[{sec['type']}]")
        out.extend(f"{k}={_format(v)}" for k, v in sec.items() if k != 'type')
        out.append('')
    return '\n'.join(out)


def write_cfg(path, defs):
    """Write sections as a Darknet cfg (atomically); returns `path`."""
    write_text_atomic(path, cfg_text(defs))
    return path


# --- graph --------------------------------------------------------------------------------------------------

def layer_inputs(defs, i):
    """Absolute indices of the layers feeding layer i (i counts layers, `defs[i + 1]`); [] means the image
    (or, for a layer without explicit inputs, layer i-1 when i > 0)."""
    d = defs[i + 1]
    if d['type'] == 'route':
        return [j if j >= 0 else i + j for j in d['layers']]
    if d['type'] == 'shortcut':
        return [i - 1] + [j if j >= 0 else i + j for j in d['from']]
    return [i - 1] if i > 0 else []


def conv_geometry(d):
    """(size, stride, padding, groups) of a [convolutional] section with darknet defaults."""
    size, stride = d.get('size', 1), d.get('stride', 1)
    pad = size // 2 if d.get('pad', 0) else d.get('padding', 0)
    return size, stride, pad, d.get('groups', 1)


def maxpool_geometry(d):
    """(size, stride, padding) with darknet defaults: padding = size - 1, split floor-left."""
    stride = d.get('stride', 1)
    size = d.get('size', stride)
    return size, stride, d.get('padding', size - 1)


def yolo_masks(d):
    """The anchor indices of a [yolo] layer (darknet default: all of them)."""
    return d.get('mask', list(range(d.get('num', len(d['anchors'])))))


def infer_shapes(defs, height=None, width=None):
    """Per-layer output shapes `[(c, h, w), ...]`, checking the graph as it goes.

    Raises DarkslimError naming the layer's file:line for an index outside the network, a conv feeding a
    [yolo] with filters != len(mask)*(classes+5), shortcut inputs of different shapes, unknown activations.
    Height/width default to the [net] values.
    """
    net = defs[0]
    c = net.get('channels', 3)
    h, w = height or net.get('height'), width or net.get('width')
    if not h or not w:
        raise DarkslimError(f"{net.where()}: [net] sets no width/height; expected both (darknet needs them too)")
    shapes = []
    for i, d in enumerate(defs[1:]):
        where = f"{d.where()} (layer {i})"
        ins = layer_inputs(defs, i)
        for j in ins:
            if not 0 <= j < i:
                key = 'layers' if d['type'] == 'route' else 'from'
                given = ','.join(map(str, d[key]))
                raise DarkslimError(f"{d.where(key)} (layer {i}): {key}={given} refers to layer {j}; expected "
                                    f"a layer in 0..{i - 1} (negative indices count back from this layer)")
        t = d['type']
        if d.get('activation', 'logistic') not in ACTIVATIONS:  # sections built in code, not parsed
            raise DarkslimError(f"{where}: activation={d['activation']!r}; expected one of "
                                + ', '.join(sorted(ACTIVATIONS)))
        if t in ('route', 'shortcut'):
            in_shapes = [shapes[j] for j in ins]
        else:
            in_shapes = [shapes[i - 1] if i else (c, h, w)]
        ci, hi, wi = in_shapes[0]
        if t == 'convolutional':
            size, stride, pad, groups = conv_geometry(d)
            if 'filters' not in d:
                raise DarkslimError(f"{where}: [convolutional] without filters=")
            if ci % groups or d['filters'] % groups:
                raise DarkslimError(f"{where}: groups={groups} does not divide {ci} inputs / {d['filters']} filters")
            ho, wo = (hi + 2 * pad - size) // stride + 1, (wi + 2 * pad - size) // stride + 1
            if ho < 1 or wo < 1:
                raise DarkslimError(f"{where}: input {hi}x{wi} too small for size={size}")
            shape = (d['filters'], ho, wo)
        elif t == 'maxpool':
            size, stride, pad = maxpool_geometry(d)
            shape = (ci, (hi + pad - size) // stride + 1, (wi + pad - size) // stride + 1)
        elif t == 'upsample':
            shape = (ci, hi * d.get('stride', 2), wi * d.get('stride', 2))
        elif t == 'route':
            if len({s[1:] for s in in_shapes}) != 1:
                raise DarkslimError(f"{where}: route inputs {ins} have sizes {[s[1:] for s in in_shapes]}; "
                                    "expected equal height x width")
            groups = d.get('groups', 1)
            if any(s[0] % groups for s in in_shapes):
                raise DarkslimError(f"{where}: groups={groups} does not divide input channels")
            shape = (sum(s[0] // groups for s in in_shapes), hi, wi)
        elif t == 'shortcut':
            if any(s != in_shapes[0] for s in in_shapes):
                raise DarkslimError(f"{where}: shortcut inputs {ins} have shapes {in_shapes}; expected equal")
            shape = in_shapes[0]
        elif t == 'yolo':
            mask, anchors = yolo_masks(d), d.get('anchors')
            if not anchors:
                raise DarkslimError(f"{where}: [yolo] without anchors=")
            if any(not 0 <= m < len(anchors) for m in mask):
                raise DarkslimError(f"{where}: mask {mask} refers past the {len(anchors)} anchors")
            nc = d.get('classes', 20)
            if ci != len(mask) * (nc + 5):
                raise DarkslimError(f"{where}: [yolo] input has {ci} channels; expected len(mask)*(classes+5) = "
                                    f"{len(mask)}*({nc}+5) = {len(mask) * (nc + 5)}")
            shape = (ci, hi, wi)
        shapes.append(shape)
    return shapes
