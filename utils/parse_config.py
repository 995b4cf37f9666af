"""Darknet `.cfg` text: parse, validate and write; parse and write are exact inverses.

`parse_cfg(path)` returns `[net, layer0, layer1, ...]`: one `Section` (a dict with `'type'` plus typed options)
per `[section]`. Every option a section may carry is listed in `RANGES` with its type and its valid range; a value
of the wrong type or outside the range is refused with one line naming file:line and what was expected. Values are
typed here, once:
  - integer options -> int; real options -> int when written as an integer, else float,
  - comma lists (`layers`, `from`, `mask`, `steps`, `scales`, ...) -> list of int/float,
  - `anchors` -> list of (w, h) pairs,
  - choices and text (`activation`, `policy`, `map`, ...) -> str.
A key given twice in one section keeps its first value, as darknet's option_find does, and prints one warning line
to stderr naming both lines (OpenCV's importer keeps the last value; the written cfg holds only the value in use,
so both read it alike).
`write_cfg(path, defs)` writes text that AlexeyAB darknet and OpenCV read, such that
`parse_cfg(write_cfg(p2, parse_cfg(p))) == parse_cfg(p)`; anchors and every other key are written back as given.

Layer indices follow darknet: layer i is `defs[i + 1]`; in `[route] layers` and `[shortcut] from` a negative index
is relative to the layer itself, a non-negative one absolute.
"""
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass

from utils.errors import DarkslimError
from utils.io import write_text_atomic

_INT = re.compile(r'[+-]?\d+')
_REAL = re.compile(r'[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?')


@dataclass(frozen=True)
class Option:
    """Type and valid range of one cfg option.

    kind: 'int', 'real', 'choice' or 'text' (one value); 'ints' or 'reals' (a non-empty comma list); 'anchors'
    (comma-separated w,h pairs, each > 0). `lo`/`hi` bound each number, inclusive, except `lo` when `above`.
    """
    kind: str
    lo: float = None
    hi: float = None
    above: bool = False
    choices: tuple = ()

    def expected(self):
        """What a valid value looks like, for error messages."""
        if self.kind == 'choice':
            return 'one of ' + ', '.join(sorted(self.choices))
        if self.kind == 'text':
            return 'a non-empty text'
        if self.kind == 'anchors':
            return 'comma-separated w,h pairs of numbers > 0'
        integer = self.kind in ('int', 'ints')
        if self.kind in ('ints', 'reals'):
            what = 'a comma list of integers' if integer else 'a comma list of numbers'
        elif integer and (self.lo, self.hi) == (0, 1):
            return '0 or 1'
        else:
            what = 'an integer' if integer else 'a number'
        if self.lo is not None and self.hi is not None:
            return f"{what} in {self.lo}..{self.hi}" if integer else f"{what} in [{self.lo}, {self.hi}]"
        if self.lo is not None:
            return f"{what} {'>' if self.above else '>='} {self.lo}"
        return what

    def parse(self, text):
        """The typed value of cfg text `text`; ValueError when it is not of this kind (range not checked)."""
        text = text.strip()
        if self.kind in ('choice', 'text'):
            return text
        if self.kind in ('int', 'real'):
            return self._scalar(text)
        return [self._scalar(v.strip()) for v in text.split(',') if v.strip()]  # lists, anchors (paired later)

    def _scalar(self, text):
        if _INT.fullmatch(text):
            return int(text)
        if self.kind in ('real', 'reals', 'anchors') and _REAL.fullmatch(text):
            return float(text)
        raise ValueError(text)

    def ok(self, value):
        """True when typed `value` is of this kind and inside the range."""
        if self.kind == 'choice':
            return value in self.choices
        if self.kind == 'text':
            return isinstance(value, str) and bool(value)
        if self.kind in ('int', 'real'):
            return self._number_ok(value)
        if not isinstance(value, (list, tuple)) or not value:
            return False
        if self.kind == 'anchors':
            return all(isinstance(p, (list, tuple)) and len(p) == 2 and all(self._number_ok(v) for v in p)
                       for p in value)
        return all(self._number_ok(v) for v in value)

    def _number_ok(self, v):
        integer = self.kind in ('int', 'ints')
        if isinstance(v, bool) or not isinstance(v, numbers.Integral if integer else numbers.Real):
            return False
        if not math.isfinite(v):
            return False
        if self.kind == 'anchors':
            return v > 0
        if self.lo is not None and (v <= self.lo if self.above else v < self.lo):
            return False
        return self.hi is None or v <= self.hi


def _choice(*names):
    return Option('choice', choices=tuple(names))


FLAG = Option('int', 0, 1)
COUNT = Option('int', 1)                    # a size, count or stride: >= 1
NONNEG = Option('int', 0)
ANY_INT = Option('int')
REAL = Option('real')
NONNEG_REAL = Option('real', 0)
POSITIVE = Option('real', 0, above=True)
FRACTION = Option('real', 0, 1)              # probabilities, thresholds, rates
LAYERS = Option('ints')                      # layer indices: checked against the network in infer_shapes
ACTIVATIONS = ('leaky', 'linear', 'relu', 'mish', 'swish', 'logistic')
ACTIVATION = _choice(*ACTIVATIONS)

# Every option each section may carry (AlexeyAB parser.c names), with its type and valid range.  Anything else is
# refused: a typo such as `filter=` silently ignored by darknet is the classic source of a broken model.  Ranges
# are what darknet can run: sizes, counts and strides >= 1; flags 0 or 1; probabilities and thresholds in [0, 1];
# scales and normalisers >= 0 (> 0 where darknet divides by them or multiplies boxes by them); choices as parser.c
# names them.  The graph-level rules (indices inside the network, groups dividing channels, mask inside the
# anchors, num = number of anchors, filters of the conv feeding a [yolo], ...) are checked by `infer_shapes`.
RANGES = {
    'net': {
        'batch': COUNT, 'subdivisions': COUNT, 'width': COUNT, 'height': COUNT, 'channels': COUNT,
        'inputs': COUNT, 'time_steps': COUNT, 'sequential_subdivisions': COUNT,
        'momentum': FRACTION, 'decay': NONNEG_REAL, 'learning_rate': NONNEG_REAL, 'burn_in': NONNEG,
        'max_batches': NONNEG, 'policy': _choice('constant', 'step', 'exp', 'poly', 'steps', 'sigmoid', 'random',
                                                 'sgdr'),
        'steps': Option('ints'), 'scales': Option('reals', 0), 'seq_scales': Option('reals', 0), 'step': COUNT,
        'gamma': NONNEG_REAL, 'power': REAL, 'burnin_update': NONNEG, 'rate': NONNEG_REAL,
        'angle': REAL, 'saturation': POSITIVE, 'exposure': POSITIVE, 'hue': NONNEG_REAL, 'jitter': NONNEG_REAL,
        'aspect': POSITIVE, 'min_crop': NONNEG, 'max_crop': NONNEG, 'random': NONNEG_REAL,
        'mosaic': FLAG, 'mosaic_bound': FLAG, 'cutmix': FLAG, 'mixup': NONNEG, 'blur': NONNEG,
        'gaussian_noise': NONNEG, 'flip': FLAG, 'letter_box': FLAG, 'label_smooth_eps': FRACTION,
        'resize_step': POSITIVE, 'max_chart_loss': POSITIVE, 'adam': FLAG, 'B1': FRACTION, 'B2': FRACTION,
        'eps': POSITIVE, 'loss_scale': POSITIVE, 'dynamic_minibatch': FLAG, 'optimized_memory': Option('int', 0, 3),
        'workspace_size_limit_MB': POSITIVE, 'ema_alpha': FRACTION, 'track': FLAG, 'augment_speed': NONNEG,
        'try_fix_nan': FLAG, 'contrastive': FLAG, 'unsupervised': FLAG, 'adversarial_lr': NONNEG_REAL,
        'attention': FLAG, 'use_cuda_graph': FLAG, 'show_receptive_field': FLAG,
    },
    'convolutional': {'batch_normalize': FLAG, 'filters': COUNT, 'size': COUNT, 'stride': COUNT, 'pad': FLAG,
                      'padding': NONNEG, 'groups': COUNT, 'activation': ACTIVATION},
    'shortcut': {'from': LAYERS, 'activation': ACTIVATION},
    'route': {'layers': LAYERS, 'groups': COUNT, 'group_id': NONNEG},
    'upsample': {'stride': COUNT},  # darknet's negative stride (downsampling) is not supported
    'maxpool': {'size': COUNT, 'stride': COUNT, 'padding': NONNEG},
    'yolo': {
        'mask': Option('ints', 0), 'anchors': Option('anchors'), 'classes': COUNT, 'num': COUNT,
        'scale_x_y': POSITIVE, 'new_coords': FLAG, 'jitter': NONNEG_REAL, 'ignore_thresh': FRACTION,
        'truth_thresh': FRACTION, 'iou_thresh': FRACTION, 'random': NONNEG_REAL, 'resize': POSITIVE,
        'iou_loss': _choice('mse', 'iou', 'giou', 'diou', 'ciou'),
        'iou_thresh_kind': _choice('iou', 'giou', 'diou', 'ciou'),
        'nms_kind': _choice('default', 'greedynms', 'diounms', 'cornersnms'), 'beta_nms': NONNEG_REAL,
        'iou_normalizer': NONNEG_REAL, 'cls_normalizer': NONNEG_REAL, 'obj_normalizer': NONNEG_REAL,
        'delta_normalizer': NONNEG_REAL, 'uc_normalizer': NONNEG_REAL, 'max_delta': POSITIVE,
        'label_smooth_eps': FRACTION, 'focal_loss': FLAG, 'objectness_smooth': FLAG,
        'counters_per_class': Option('ints', 0), 'max': COUNT, 'map': Option('text'),
        'track_history_size': COUNT, 'sim_thresh': FRACTION, 'dets_for_track': COUNT, 'dets_for_show': COUNT,
        'track_ciou_norm': NONNEG_REAL, 'embedding_layer': ANY_INT, 'show_details': FLAG,
        'equidistant_point': NONNEG,
    },
}
SECTION_ALIASES = {'network': 'net', 'conv': 'convolutional', 'max': 'maxpool'}  # darknet parser.c
# darknet layer types (parser.c string_to_layer_type) this project does not implement
DARKNET_ONLY = frozenset({
    'scale_channels', 'sam', 'crop', 'cost', 'detection', 'region', 'Gaussian_yolo', 'local', 'activation',
    'crnn', 'gru', 'lstm', 'conv_lstm', 'history', 'rnn', 'conn', 'connected', 'local_avg', 'local_avgpool',
    'reorg3d', 'reorg', 'avg', 'avgpool', 'dropout', 'lrn', 'normalization', 'batchnorm', 'soft', 'softmax',
    'contrastive', 'empty', 'silence', 'implicit'})


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


def _shown(opt, value, text=None):
    """How a value appears in a message: numbers as written, anything else quoted."""
    if opt.kind in ('int', 'real') and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return _format(value)
    return repr(text if text is not None else _format(value))


def _typed(opt, key, text, where):
    """Type and range-check one option value read from a file; `where` is 'file:line'."""
    try:
        value = opt.parse(text)
    except ValueError:
        raise DarkslimError(f"{where}: {key}={text.strip()!r}; expected {opt.expected()}") from None
    if opt.kind == 'anchors':
        if len(value) % 2:
            raise DarkslimError(f"{where}: anchors has {len(value)} numbers; expected w,h pairs")
        value = [(value[i], value[i + 1]) for i in range(0, len(value), 2)]
    if not opt.ok(value):
        raise DarkslimError(f"{where}: {key}={_shown(opt, value, text.strip())}; expected {opt.expected()}")
    return value


def _section(kind, where, defs):
    """The canonical name of section header `[kind]` read at `where`, refusing what this project cannot build."""
    supported = ', '.join(f'[{k}]' for k in RANGES)
    name = SECTION_ALIASES.get(kind, kind)
    if name not in RANGES:
        if kind in DARKNET_ONLY:
            raise DarkslimError(f"{where}: [{kind}] is a darknet layer darkslim does not support; expected one of "
                                f"{supported}")
        raise DarkslimError(f"{where}: unknown section [{kind}]; expected one of {supported}")
    if (name == 'net') != (not defs):
        raise DarkslimError(f"{where}: [{kind}] here; expected [net] first and only once")
    return name


def _repeated(sec, key, value, where):
    """Darknet reads the first of a repeated key (option_find walks the list from the front): keep it, and say so."""
    print(f"warning: {where}: {key}={value} repeats {key}= of line {sec.lines[key]} in [{sec['type']}]; darknet "
          f"uses the first ({key}={_format(sec[key])}), and so does darkslim (OpenCV's importer takes the last)",
          file=sys.stderr)


def parse_cfg_text(text, path='<cfg>'):
    """Parse cfg text into typed, range-checked sections (graph rules: see `infer_shapes`)."""
    defs = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split('#', 1)[0].split(';', 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{n}"
        if line.startswith('['):
            if not line.endswith(']'):
                raise DarkslimError(f"{where}: {raw.strip()!r} is not a section header; expected [name]")
            defs.append(Section(type=_section(line[1:-1].strip(), where, defs), file=path, line=n))
            continue
        if '=' not in line:
            raise DarkslimError(f"{where}: {raw.strip()!r} has no '='; expected key=value")
        if not defs:
            raise DarkslimError(f"{where}: {raw.strip()!r} comes before the first section; expected [net] first")
        key, value = (s.strip() for s in line.split('=', 1))
        sec = defs[-1]
        opts = RANGES[sec['type']]
        if key not in opts:
            raise DarkslimError(f"{where}: unknown key {key!r} in [{sec['type']}]; expected one of "
                                + ', '.join(sorted(opts)))
        if key in sec:
            _repeated(sec, key, value, where)
            continue
        sec[key] = _typed(opts[key], key, value, where)
        sec.lines[key] = n
    if not defs:
        raise DarkslimError(f"{path}: no sections; expected [net] followed by layers")
    return defs


_COMMENT = re.compile(rb'[#;]')


def _decode(data, path):
    """cfg bytes -> text. Option lines must be UTF-8 (a BOM is allowed); comments may hold bytes of any other
    encoding, which darknet skips as it skips comments (cfgs annotated in GBK or Latin-1 exist). A NUL or
    non-UTF-8 byte outside a comment means the file is no cfg at all (a .weights file given as --cfg, say)."""
    if data.startswith(b'\xef\xbb\xbf'):
        data = data[3:]
    out = []
    for n, raw in enumerate(data.split(b'\n'), 1):
        m = _COMMENT.search(raw)
        code, comment = (raw, b'') if m is None else (raw[:m.start()], raw[m.start():])
        try:
            text = code.decode('utf-8')
        except UnicodeDecodeError as e:
            raise DarkslimError(f"{path}:{n}: byte 0x{code[e.start]:02x} is not UTF-8 text; expected a Darknet "
                                ".cfg text file") from None
        if '\x00' in text:
            raise DarkslimError(f"{path}:{n}: NUL byte (a binary file?); expected a Darknet .cfg text file")
        out.append(text + comment.decode('utf-8', 'replace'))
    return '\n'.join(out)


def parse_cfg(path):
    """Read a Darknet cfg file -> `[net, layer0, ...]`, validated (option ranges, then the graph)."""
    path = os.fspath(path)
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise DarkslimError(f"{path}: cannot read cfg ({e.strerror})") from None
    defs = parse_cfg_text(_decode(data, path), path)
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


def _at(d, i, key=None):
    return f"{d.where(key)} (layer {i})"


def check_options(d, i=None):
    """Refuse a section (one built in code, say) holding an unknown key or a value outside `RANGES`."""
    if d['type'] not in RANGES:
        raise DarkslimError(f"{d.where()}: unknown section [{d['type']}]; expected one of "
                            + ', '.join(f'[{k}]' for k in RANGES))
    opts = RANGES[d['type']]
    for key, value in d.items():
        at = d.where(key) if i is None else _at(d, i, key)
        if key == 'type':
            continue
        if key not in opts:
            raise DarkslimError(f"{at}: unknown key {key!r} in [{d['type']}]; expected one of "
                                + ', '.join(sorted(opts)))
        if not opts[key].ok(value):
            raise DarkslimError(f"{at}: {key}={_shown(opts[key], value)}; expected {opts[key].expected()}")


def _out_size(d, i, hi, wi, size, stride, pad):
    """Output height, width of a `size`/`stride` window over an input padded by `pad` in all (both sides)."""
    ho, wo = (hi + pad - size) // stride + 1, (wi + pad - size) // stride + 1
    if ho < 1 or wo < 1:
        raise DarkslimError(f"{_at(d, i, 'size')}: input {hi}x{wi} too small for size={size} stride={stride}; "
                            "expected an output of at least 1x1")
    return ho, wo


def _conv_shape(defs, i, in_shapes):
    d = defs[i + 1]
    (ci, hi, wi), = in_shapes
    if 'filters' not in d:
        raise DarkslimError(f"{_at(d, i)}: [convolutional] without filters=; expected its output channels")
    size, stride, pad, groups = conv_geometry(d)
    if ci % groups:
        raise DarkslimError(f"{_at(d, i, 'groups')}: groups={groups} does not divide the {ci} input channels")
    if d['filters'] % groups:
        raise DarkslimError(f"{_at(d, i, 'groups')}: groups={groups} does not divide filters={d['filters']}")
    return (d['filters'], *_out_size(d, i, hi, wi, size, stride, 2 * pad))


def _maxpool_shape(defs, i, in_shapes):
    d = defs[i + 1]
    (ci, hi, wi), = in_shapes
    return (ci, *_out_size(d, i, hi, wi, *maxpool_geometry(d)))


def _upsample_shape(defs, i, in_shapes):
    (ci, hi, wi), = in_shapes
    s = defs[i + 1].get('stride', 2)
    return ci, hi * s, wi * s


def _route_shape(defs, i, in_shapes):
    d, ins = defs[i + 1], layer_inputs(defs, i)
    if len({s[1:] for s in in_shapes}) != 1:
        raise DarkslimError(f"{_at(d, i, 'layers')}: route inputs {ins} have sizes {[s[1:] for s in in_shapes]}; "
                            "expected equal height x width")
    groups, group_id = d.get('groups', 1), d.get('group_id', 0)
    if group_id >= groups:
        raise DarkslimError(f"{_at(d, i, 'group_id')}: group_id={group_id}; expected 0..{groups - 1} "
                            f"(groups={groups})")
    for j, s in zip(ins, in_shapes):
        if s[0] % groups:
            raise DarkslimError(f"{_at(d, i, 'groups')}: groups={groups} does not divide the {s[0]} channels of "
                                f"layer {j}")
    return (sum(s[0] // groups for s in in_shapes), *in_shapes[0][1:])


def _shortcut_shape(defs, i, in_shapes):
    """darknet shortcut_layer.c: the output has the previous layer's shape; inputs may differ in channels (the
    overlapping channels are added, see models.Shortcut) but not in height x width."""
    d, ins = defs[i + 1], layer_inputs(defs, i)
    prev = in_shapes[0]
    for j, s in zip(ins[1:], in_shapes[1:]):
        if s[1:] != prev[1:]:
            raise DarkslimError(f"{_at(d, i, 'from')}: from={_format(d['from'])}: layer {j} is {s[1]}x{s[2]}, the "
                                f"previous layer {prev[1]}x{prev[2]}; expected equal height x width")
    return prev


def _yolo_shape(defs, i, in_shapes):
    d = defs[i + 1]
    ci = in_shapes[0][0]
    anchors = d.get('anchors')
    if not anchors:
        raise DarkslimError(f"{_at(d, i)}: [yolo] without anchors=; expected w,h pairs")
    if 'num' in d and d['num'] != len(anchors):
        raise DarkslimError(f"{_at(d, i, 'num')}: num={d['num']} but anchors= holds {len(anchors)} pairs; "
                            "expected equal")
    mask = yolo_masks(d)
    outside = [m for m in mask if m >= len(anchors)]
    if outside:
        raise DarkslimError(f"{_at(d, i, 'mask')}: mask={_format(mask)} refers to anchor {outside[0]}; expected "
                            f"indices 0..{len(anchors) - 1} of the {len(anchors)} anchors")
    nc = d.get('classes', 20)
    if len(d.get('counters_per_class', [0] * nc)) != nc:
        raise DarkslimError(f"{_at(d, i, 'counters_per_class')}: counters_per_class has "
                            f"{len(d['counters_per_class'])} values; expected classes={nc} of them")
    if ci != len(mask) * (nc + 5):
        raise DarkslimError(f"{_at(d, i)}: [yolo] input has {ci} channels; expected len(mask)*(classes+5) = "
                            f"{len(mask)}*({nc}+5) = {len(mask) * (nc + 5)}")
    src = defs[i]  # layer i-1, the head conv
    if d.get('new_coords', 0) and (src['type'] != 'convolutional' or src.get('activation', 'logistic') != 'logistic'):
        got = f"activation={src.get('activation', 'logistic')}" if src['type'] == 'convolutional' else src['type']
        raise DarkslimError(f"{_at(d, i, 'new_coords')}: [yolo] new_coords=1 decodes its input as already "
                            f"logistic-activated; expected activation=logistic on the [convolutional] feeding it "
                            f"(layer {i - 1} has {got})")
    return in_shapes[0]


SHAPE_RULES = {'convolutional': _conv_shape, 'maxpool': _maxpool_shape, 'upsample': _upsample_shape,
               'route': _route_shape, 'shortcut': _shortcut_shape, 'yolo': _yolo_shape}


def infer_shapes(defs, height=None, width=None):
    """Per-layer output shapes `[(c, h, w), ...]`, checking the network as it goes.

    Raises DarkslimError naming the layer's file:line for an option outside `RANGES` (sections built in code),
    an index outside the network, groups that do not divide the channels, a window larger than its input,
    route inputs or shortcut inputs of different height x width, a [yolo] whose mask leaves its anchors, whose num
    differs from its anchor count or whose input conv has filters != len(mask)*(classes+5). Height/width default
    to the [net] values.
    """
    net = defs[0]
    check_options(net)
    c = net.get('channels', 3)
    h, w = height or net.get('height'), width or net.get('width')
    if not h or not w:
        raise DarkslimError(f"{net.where()}: [net] sets no width/height; expected both (darknet needs them too)")
    shapes = []
    for i, d in enumerate(defs[1:]):
        check_options(d, i)
        if d['type'] not in SHAPE_RULES:
            raise DarkslimError(f"{_at(d, i)}: [{d['type']}] here; expected [net] first and only once")
        ins = layer_inputs(defs, i)
        for j in ins:
            if not 0 <= j < i:
                key = 'layers' if d['type'] == 'route' else 'from'
                raise DarkslimError(f"{_at(d, i, key)}: {key}={_format(d[key])} refers to layer {j}; expected "
                                    f"a layer in 0..{i - 1} (negative indices count back from this layer)")
        in_shapes = [shapes[j] for j in ins] if d['type'] in ('route', 'shortcut') else \
            [shapes[i - 1] if i else (c, h, w)]
        shapes.append(SHAPE_RULES[d['type']](defs, i, in_shapes))
    return shapes
