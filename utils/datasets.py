"""Darknet/YOLO detection data: .data/.names/list files, label validation, letterbox, augmentation, Dataset.

Conventions (Darknet/ultralytics):
- a label file sits at the image path with the last `/images/` replaced by `/labels/` and the extension by `.txt`;
  one row per object `class cx cy w h`, coordinates normalized to the image (0..1); no file = background image.
- images are read as stored (EXIF orientation ignored, as Darknet does), so labels refer to the stored pixels.
- letterbox: resize keeping aspect ratio, then pad centred with a constant colour.

Random augmentation draws from torch's generator, so `torch.manual_seed` makes it reproducible, in the main
process and (through DataLoader's per-worker seeding) in workers.
"""
import math
import numbers
import os
import re
import struct
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.errors import DarkslimError

IMG_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
DATA_REQUIRED_KEYS = ('classes', 'train', 'valid')
DATA_PATH_KEYS = ('train', 'valid', 'test', 'names', 'backup')
DEFAULT_HYP = {
    'hsv_h': 0.0138,  # hue gain (fraction)
    'hsv_s': 0.678,  # saturation gain (fraction)
    'hsv_v': 0.36,  # value gain (fraction)
    'degrees': 0.0,  # rotation (+/- deg)
    'translate': 0.1,  # translation (+/- fraction of output size)
    'scale': 0.25,  # scale gain (+/- fraction)
    'shear': 0.0,  # shear (+/- deg)
    'fliplr': 0.5,  # horizontal flip probability
}
_IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
PIXEL_MAX = 255  # 8-bit images: values 0..PIXEL_MAX become tensor values 0..1


# ----------------------------------------------------------------------------------------------------------------
# text files: .data, .names, list files, labels

def _read_lines(path, what):
    """Lines of a text file; a missing or unreadable file is a DarkslimError naming it."""
    try:
        with open(path, encoding='utf-8') as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise DarkslimError(f"{path}: not found; expected {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DarkslimError(f"{path}: cannot read ({e}); expected {what}") from None


def _resolve(path, folder):
    """`path` as an absolute path; a relative one is taken relative to `folder`."""
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = os.path.join(folder, path)
    return os.path.normpath(path)


class DataConfig(dict):
    """parse_data_cfg's result: a dict of the file's keys, plus `path` (the .data file) and `lines`
    ({key: 1-based line number}) for error messages."""

    def __init__(self, items, path, lines):
        super().__init__(items)
        self.path, self.lines = path, lines


def parse_data_cfg(path, need=DATA_REQUIRED_KEYS):
    """Parse a Darknet `.data` file into a DataConfig (a dict; `.lines[key]` = line of each key).

    `classes` becomes an int; `train`, `valid`, `test`, `names`, `backup` become absolute paths (relative ones
    resolve against the .data file's folder, not the cwd); any other key is kept as a stripped string.
    Full-line `#`/`;` comments and ` # ...` trailing comments are ignored. `need`: the keys the caller uses (a
    missing one is an error naming the file); evaluation needs only classes and valid, training also train.
    """
    path = os.fspath(path)
    lines = _read_lines(path, "a Darknet .data file (classes=, train=, valid=, names=)")
    folder = os.path.dirname(os.path.abspath(path))
    out, first_line = {}, {}
    for n, raw in enumerate(lines, 1):
        line = re.split(r'\s#', raw, maxsplit=1)[0].strip()
        if not line or line[0] in '#;':
            continue
        if '=' not in line:
            raise DarkslimError(f"{path}:{n}: found {raw.strip()!r}; expected 'key = value'")
        key, value = (s.strip() for s in line.split('=', 1))
        if not key or not value:
            raise DarkslimError(f"{path}:{n}: found {raw.strip()!r}; expected 'key = value' with both non-empty")
        if key in out:
            raise DarkslimError(f"{path}:{n}: found a second {key!r} (first at line {first_line[key]}); "
                                f"expected each key once")
        if key == 'classes':
            try:
                value = int(value)
            except ValueError:
                value = None
            if value is None or value <= 0:
                raise DarkslimError(f"{path}:{n}: found classes = {line.split('=', 1)[1].strip()!r}; "
                                    f"expected a positive integer")
        elif key in DATA_PATH_KEYS:
            value = _resolve(value, folder)
        out[key], first_line[key] = value, n
    for key in need:
        if key not in out:
            optional = '' if 'names' in need else ' (names optional)'
            raise DarkslimError(f"{path}:{len(lines) + 1}: end of file without a {key!r} line; "
                                f"expected keys {', '.join(need)}{optional}")
    return DataConfig(out, path, first_line)


def load_names(path):
    """Class names, one per line (surrounding whitespace and blank lines ignored)."""
    path = os.fspath(path)
    names = [s.strip() for s in _read_lines(path, "a .names file (one class name per line)")]
    names = [s for s in names if s]
    if not names:
        raise DarkslimError(f"{path}:1: found no class names; expected one class name per line")
    return names


def check_classes(data, nc, data_path, model_name='the model'):
    """Class names of parsed .data `data` (None without names=), or DarkslimError unless its `classes` and its
    names file agree with the model's class count `nc`."""
    if data['classes'] != nc:
        line = getattr(data, 'lines', {}).get('classes', 1)
        raise DarkslimError(f"{data_path}:{line}: classes = {data['classes']}, but {model_name} has {nc} classes; "
                            f"expected equal class counts")
    if 'names' not in data:
        return None
    names = load_names(data['names'])
    if len(names) != nc:
        raise DarkslimError(f"{data['names']}: found {len(names)} class names; expected classes = {nc} as in "
                            f"{data_path}")
    return names


def _is_image_name(p):
    return os.path.splitext(p)[1].lower() in IMG_EXTS


def list_images(spec):
    """Absolute image paths from `spec`: a list file (one path per line, relative to the list file's folder or
    absolute; blank and `#` lines ignored), a folder (its images, sorted by name), or a single image file."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        files = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                       if _is_image_name(f) and os.path.isfile(os.path.join(spec, f)))
    elif os.path.isfile(spec) and _is_image_name(spec):
        files = [spec]
    elif os.path.isfile(spec):
        folder = os.path.dirname(os.path.abspath(spec))
        files = []
        for n, raw in enumerate(_read_lines(spec, "a list file (one image path per line)"), 1):
            line = raw.strip()
            if not line or line.startswith('#'):
                continue
            p = _resolve(line, folder)
            if not os.path.isfile(p):
                raise DarkslimError(f"{spec}:{n}: image {line!r} not found (looked at {p}); expected an existing "
                                    f"image, absolute or relative to the list file's folder")
            files.append(p)
    else:
        raise DarkslimError(f"{spec}: not found; expected a list file (one image path per line) "
                            f"or a folder of images")
    if not files:
        raise DarkslimError(f"{spec}: empty dataset; expected at least one image "
                            f"({', '.join(e[1:] for e in IMG_EXTS)})")
    return [os.path.abspath(p) for p in files]


def img2label_path(p):
    """Label path of image `p`: last `/images/` -> `/labels/`, extension -> `.txt`."""
    p = os.fspath(p)
    i = p.rfind('/images/')
    if i >= 0:
        p = p[:i] + '/labels/' + p[i + len('/images/'):]
    return os.path.splitext(p)[0] + '.txt'


_LABEL_FORMAT = "5 numbers 'class cx cy w h'"
_COORD_NAMES = ('cx', 'cy', 'w', 'h')


def _label_row_problem(tokens, nc):
    """None if `tokens` is a valid label row, else 'found ...; expected ...'."""
    if len(tokens) != 5:
        return f"found {len(tokens)} values {' '.join(tokens)!r}; expected {_LABEL_FORMAT}"
    try:
        vals = [float(t) for t in tokens]
    except ValueError:
        return f"found non-number in {' '.join(tokens)!r}; expected {_LABEL_FORMAT}"
    if not all(math.isfinite(v) for v in vals):
        return f"found non-finite value in {' '.join(tokens)!r}; expected {_LABEL_FORMAT}"
    c = vals[0]
    if not c.is_integer() or c < 0 or (nc is not None and c >= nc):
        upper = f", {nc})" if nc is not None else ", inf)"
        return f"found class {tokens[0]}; expected an integer class id in [0{upper}"
    for name, v, tok in zip(_COORD_NAMES, vals[1:], tokens[1:]):
        if name in ('w', 'h') and v <= 0:
            return f"found {name} = {tok}; expected box width and height > 0"
        if not 0.0 <= v <= 1.0:
            return f"found {name} = {tok}; expected normalized coordinates in [0, 1]"
    return None


def load_labels(path, nc, skip_bad=False):
    """Rows `class cx cy w h` of label file `path` as float32 [n, 5], and the number of bad rows dropped.

    A missing file is a background image (zero rows). A bad row raises DarkslimError('file:line: ...'),
    or with skip_bad=True is dropped and counted. nc=None: class ids are not bounded above.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return np.zeros((0, 5), np.float32), 0
    rows, dropped = [], 0
    for n, raw in enumerate(_read_lines(path, "a label file (class cx cy w h per line)"), 1):
        tokens = raw.split()
        if not tokens:
            continue
        problem = _label_row_problem(tokens, nc)
        if problem is None:
            rows.append([float(t) for t in tokens])
        elif skip_bad:
            dropped += 1
        else:
            raise DarkslimError(f"{path}:{n}: {problem}")
    return np.array(rows, np.float32).reshape(-1, 5), dropped


def check_img_size(s):
    """`s` as int if it is a positive multiple of 32 (the largest stride), else DarkslimError."""
    if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0 or s % 32:
        raise DarkslimError(f"img-size {s!r}: expected a positive multiple of 32")
    return int(s)


# ----------------------------------------------------------------------------------------------------------------
# geometry

def _scaled_size(h, w, r):
    """(h, w) scaled by r and rounded, at least 1 pixel each."""
    return max(1, int(round(h * r))), max(1, int(round(w * r)))


def letterbox(img, new_shape, color=(114, 114, 114), auto=False, scaleup=True, stride=32):
    """Resize `img` (HWC) keeping its aspect ratio to fit `new_shape` (int or (h, w)), then pad centred.

    auto=True pads only up to the next multiple of `stride` (minimum rectangle) instead of to `new_shape`;
    scaleup=False never enlarges. Returns (img, ratio, (dw, dh)): ratio = (ratio_h, ratio_w) = resized / original
    size per axis, (dw, dh) = left and top padding in pixels, so x_new = x_old * ratio_w + dw. (For an odd total
    padding the extra pixel goes right/bottom; ultralytics reports half the total padding, equal when it is even.)
    """
    h, w = img.shape[:2]
    th, tw = (new_shape, new_shape) if isinstance(new_shape, numbers.Integral) else new_shape
    r = min(th / h, tw / w)
    if not scaleup:
        r = min(r, 1.0)
    nh, nw = _scaled_size(h, w, r)
    ph, pw = th - nh, tw - nw
    if auto:
        ph, pw = ph % stride, pw % stride
    if (nh, nw) != (h, w):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    if isinstance(color, numbers.Number):
        color = (color,) * 3
    top, left = ph // 2, pw // 2
    img = cv2.copyMakeBorder(img, top, ph - top, left, pw - left, cv2.BORDER_CONSTANT, value=tuple(color))
    return img, (nh / h, nw / w), (left, top)


def scale_coords(img1_shape, coords, img0_shape, ratio_pad=None, clip=True):
    """Map xyxy boxes [n, >=4] from a letterboxed image of shape img1_shape (h, w) back to the original image of
    shape img0_shape (h0, w0), clipped to it unless clip=False. Returns a new array/tensor (input not modified).

    ratio_pad = ((ratio_h, ratio_w), (dw, dh)) as given by LoadImagesAndLabels (shapes[i][1]) or letterbox; if
    None it is recomputed assuming letterbox(img0, img1_shape, scaleup=True) or its auto=True variant.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        nh, nw = _scaled_size(img0_shape[0], img0_shape[1], gain)
        (gy, gx), (dw, dh) = (nh / img0_shape[0], nw / img0_shape[1]), ((img1_shape[1] - nw) // 2,
                                                                         (img1_shape[0] - nh) // 2)
    else:
        (gy, gx), (dw, dh) = ratio_pad
    out = coords.clone() if isinstance(coords, torch.Tensor) else np.array(coords, dtype=np.float64)
    out[:, [0, 2]] = (out[:, [0, 2]] - dw) / gx
    out[:, [1, 3]] = (out[:, [1, 3]] - dh) / gy
    if clip:
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, img0_shape[1])
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, img0_shape[0])
    return out


@dataclass
class RectPlan:
    """Rectangular batches of a data set (see rect_batches): `batches` lists of image indices, `shapes` int
    [n_batches, 2] letterbox (h, w) of each batch, `shape_of` int [n_images, 2] the (h, w) of each image's
    batch."""
    batches: list
    shapes: np.ndarray
    shape_of: np.ndarray


def rect_batches(sizes, img_size, batch_size, pad=0.0, stride=32):
    """Group images into batches of similar aspect ratio, each letterboxed to its own rectangle.

    sizes [N, 2]: original (h, w) of each image. Images are sorted by aspect ratio h / w (stable: ties keep data
    set order) and cut into consecutive batches of `batch_size`. Each image is resized to long side `img_size`
    (as the data set does); a batch's shape (h, w) is the smallest multiple of `stride` holding every resized
    image of the batch plus `pad` strides (pad=0: the smallest rectangle; ultralytics' test.py uses 0.5, which
    also grows the long side, e.g. 416 -> 448). A batch mixing portrait and landscape images is square.
    """
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if batch_size < 1:
        raise DarkslimError(f"batch size {batch_size}; expected a positive integer")
    if pad < 0:
        raise DarkslimError(f"rect pad {pad}; expected >= 0 (in strides)")
    order = np.argsort(sizes[:, 0] / sizes[:, 1], kind='stable')
    resized = np.array([_scaled_size(int(h), int(w), img_size / max(h, w)) for h, w in sizes],
                       dtype=np.float64).reshape(-1, 2)
    batches, shapes = [], []
    shape_of = np.zeros((len(sizes), 2), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        shape = (np.ceil((resized[idx].max(0) + pad * stride) / stride) * stride).astype(np.int64)
        batches.append(idx.tolist())
        shapes.append(shape)
        shape_of[idx] = shape
    return RectPlan(batches, np.array(shapes, dtype=np.int64).reshape(-1, 2), shape_of)


def image_tensor(img):
    """BGR uint8 image [H, W, 3] -> RGB float32 tensor [3, H, W] with values 0..1 (the network's input)."""
    return torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))).float().div_(PIXEL_MAX)


# ----------------------------------------------------------------------------------------------------------------
# augmentation (random numbers from torch's generator)

def _uniform(lo, hi):
    return lo + (hi - lo) * torch.rand(()).item()


def augment_hsv(img, hgain=0.5, sgain=0.5, vgain=0.5):
    """New BGR uint8 image with hue/saturation/value multiplied by random gains in [1-g, 1+g]."""
    r = [_uniform(-1, 1) * g + 1 for g in (hgain, sgain, vgain)]
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(PIXEL_MAX + 1, dtype=np.float32)
    lut_hue = ((x * r[0]) % 180).astype(np.uint8)  # OpenCV's 8-bit hue range is 0..179
    lut_sat = np.clip(x * r[1], 0, PIXEL_MAX).astype(np.uint8)
    lut_val = np.clip(x * r[2], 0, PIXEL_MAX).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def random_affine(img, targets, degrees=0.0, translate=0.1, scale=0.25, shear=0.0, border=0,
                  color=(114, 114, 114), visible=None):
    """Random rotation/scale/shear about the image centre plus translation; output size = input + 2*border.

    targets: [n, 5] (cls, x1, y1, x2, y2) pixels. Boxes are transformed (corners -> enclosing box), clipped to
    the output and dropped when tiny: <= 2 px wide/high, aspect > 20, or < 20% of the box still visible
    (`visible` [n] = fraction already visible before this step, default 1). Returns (img, targets).
    """
    height, width = img.shape[0] + 2 * border, img.shape[1] + 2 * border
    C = np.eye(3)  # image centre -> origin
    C[0, 2], C[1, 2] = -img.shape[1] / 2, -img.shape[0] / 2
    R = np.eye(3)
    s = _uniform(1 - scale, 1 + scale)
    R[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=_uniform(-degrees, degrees), scale=s)
    S = np.eye(3)
    S[0, 1] = math.tan(math.radians(_uniform(-shear, shear)))
    S[1, 0] = math.tan(math.radians(_uniform(-shear, shear)))
    T = np.eye(3)  # origin -> output centre +/- translate
    T[0, 2] = _uniform(0.5 - translate, 0.5 + translate) * width
    T[1, 2] = _uniform(0.5 - translate, 0.5 + translate) * height
    M = T @ S @ R @ C
    if border != 0 or not np.allclose(M, np.eye(3)):
        img = cv2.warpAffine(img, M[:2], dsize=(width, height), flags=cv2.INTER_LINEAR,
                             borderValue=tuple(color))
    n = len(targets)
    if n == 0:
        return img, targets
    xy = np.ones((n * 4, 3))
    xy[:, :2] = targets[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # 4 corners per box
    xy = (xy @ M.T)[:, :2].reshape(n, 8)
    x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
    box = np.stack((x.min(1), y.min(1), x.max(1), y.max(1)), 1)
    area0 = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    box[:, [0, 2]] = box[:, [0, 2]].clip(0, width)
    box[:, [1, 3]] = box[:, [1, 3]].clip(0, height)
    w, h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    vis = w * h / (area0 + 1e-16) * (1.0 if visible is None else visible)
    keep = (w > 2) & (h > 2) & (np.maximum(w / (h + 1e-16), h / (w + 1e-16)) < 20) & (vis > 0.2)
    out = targets[keep].astype(np.float32).copy()
    out[:, 1:5] = box[keep]
    return img, out


# ----------------------------------------------------------------------------------------------------------------
# image sizes without decoding (PNG/JPEG headers); other formats are decoded

def header_size(path):
    """(h, w) read from a PNG or JPEG header, or None if not recognised."""
    try:
        with open(path, 'rb') as f:
            head = f.read(26)
            if head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR':
                w, h = struct.unpack('>II', head[16:24])
                return h, w
            if head[:2] != b'\xff\xd8':
                return None
            f.seek(2)
            while True:
                b = f.read(1)
                while b and b != b'\xff':
                    b = f.read(1)
                while b == b'\xff':
                    b = f.read(1)
                if not b:
                    return None
                marker = b[0]
                if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
                    continue
                seg = f.read(2)
                if len(seg) < 2:
                    return None
                length = struct.unpack('>H', seg)[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                    data = f.read(5)
                    if len(data) < 5:
                        return None
                    h, w = struct.unpack('>HH', data[1:5])
                    return (h, w) if h > 0 and w > 0 else None
                f.seek(length - 2, os.SEEK_CUR)
    except OSError:
        return None


def imread(path):
    """BGR uint8 image as stored (EXIF orientation ignored, as Darknet does), or DarkslimError naming the file."""
    img = cv2.imread(path, _IMREAD_FLAGS)
    if img is None:
        raise DarkslimError(f"{path}: cannot read image; expected a readable image file "
                            f"({', '.join(e[1:] for e in IMG_EXTS)})")
    return img


# ----------------------------------------------------------------------------------------------------------------
# dataset

class LoadImagesAndLabels(Dataset):
    """Images + Darknet labels for training and evaluation.

    Item i: (img float32 [3, H, W] RGB 0..1, labels float32 [n, 6] (0, cls, cx, cy, w, h) normalized to the
    H x W output, path, shapes); shapes = ((h0, w0), ((ratio_h, ratio_w), (dw, dh))) maps the output back to
    original pixels (scale_coords(img.shape[1:], boxes, *shapes)); shapes is None for a mosaic. Geometric
    augmentation (affine, flip) is not reflected in shapes. H = W = self.img_size, or with rect=True the shape of
    the image's rectangular batch (rect_plan(); not with mosaic): iterate such a data set with
    `DataLoader(ds, batch_sampler=RectBatchSampler(ds), ...)` so that each batch holds images of one shape.

    Attributes: img_files, label_files, labels (list of float32 [n, 5] cls,cx,cy,w,h normalized to the original
    image), shapes (int [N, 2] original (h, w)), n_dropped (bad label rows dropped with skip_bad_labels).
    `img_size` may be changed between epochs (multi-scale); with num_workers > 0 the DataLoader must not use
    persistent_workers for the change to reach the workers. `mosaic` applies only when `augment` is true.
    """

    def __init__(self, path_or_list, img_size, batch_size=16, augment=False, hyp=None, cache=False,
                 mosaic=False, nc=None, skip_bad_labels=False, pad_color=114, rect=False, rect_pad=0.0):
        if isinstance(path_or_list, (list, tuple)):
            files = [os.path.abspath(os.fspath(p)) for p in path_or_list]
            for p in files:
                if not os.path.isfile(p):
                    raise DarkslimError(f"{p}: image not found; expected an existing image file")
            if not files:
                raise DarkslimError("image list: empty dataset; expected at least one image")
        else:
            files = list_images(path_or_list)
        self.img_files = files
        self.label_files = [img2label_path(p) for p in files]
        self.img_size = img_size
        self.batch_size = batch_size
        self.augment = augment
        self.mosaic = mosaic
        self.hyp = {**DEFAULT_HYP, **(hyp or {})}
        self.nc = nc
        self.pad_color = (pad_color,) * 3 if isinstance(pad_color, numbers.Number) else tuple(pad_color)
        if rect and augment and mosaic:
            raise DarkslimError("rect=True with mosaic augmentation; expected one of them (a mosaic is square)")
        self.rect, self.rect_pad, self._rect_plans = rect, rect_pad, {}

        # all labels up front so that a bad file fails before training starts
        self.labels, self.n_dropped, bad_files = [], 0, 0
        for lf in self.label_files:
            lab, dropped = load_labels(lf, nc, skip_bad=skip_bad_labels)
            self.labels.append(lab)
            self.n_dropped += dropped
            bad_files += dropped > 0
        if skip_bad_labels:
            where = os.fspath(path_or_list) if not isinstance(path_or_list, (list, tuple)) else 'image list'
            print(f"skip_bad_labels: {where}: dropped {self.n_dropped} bad label rows in {bad_files} of "
                  f"{len(self.label_files)} label files")

        # cache: images resized to the current img_size, decoded once here (shared with forked workers)
        self.imgs = [None] * len(files)
        shapes = []
        for i, p in enumerate(files):
            if cache:
                self.imgs[i], hw0, _ = self._load_resized(i)
            else:
                hw0 = header_size(p) or imread(p).shape[:2]
            shapes.append(hw0)
        self.shapes = np.array(shapes, dtype=np.int64).reshape(-1, 2)

    @property
    def img_size(self):
        return self._img_size

    @img_size.setter
    def img_size(self, s):
        self._img_size = check_img_size(s)

    def __len__(self):
        return len(self.img_files)

    def rect_plan(self):
        """RectPlan of the rectangular batches for the current img_size and batch_size (computed once each)."""
        key = (self.img_size, self.batch_size)
        if key not in self._rect_plans:
            self._rect_plans[key] = rect_batches(self.shapes, self.img_size, self.batch_size, self.rect_pad)
        return self._rect_plans[key]

    def _load_resized(self, i):
        """Image i from disk resized so that its long side is img_size: (BGR uint8, (h0, w0), (h, w))."""
        img = imread(self.img_files[i])
        h0, w0 = img.shape[:2]
        h, w = _scaled_size(h0, w0, self.img_size / max(h0, w0))
        if (h, w) != (h0, w0):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if h < h0 else cv2.INTER_LINEAR)
        return img, (h0, w0), (h, w)

    def load_image(self, i):
        """(BGR uint8 image with long side img_size, (h0, w0), (h, w)); do not modify the returned image."""
        cached = self.imgs[i]
        if cached is not None:
            h0, w0 = (int(v) for v in self.shapes[i])
            ch, cw = cached.shape[:2]
            if max(ch, cw) == self.img_size:
                return cached, (h0, w0), (ch, cw)
            if max(ch, cw) > self.img_size:  # multi-scale below the cached size: shrink the cached copy
                h, w = _scaled_size(h0, w0, self.img_size / max(h0, w0))
                return cv2.resize(cached, (w, h), interpolation=cv2.INTER_AREA), (h0, w0), (h, w)
        return self._load_resized(i)

    def _load_mosaic(self, index):
        """2x2 mosaic of image `index` and 3 random others around a random centre, then a random affine crop to
        img_size. Returns (BGR uint8 [S, S, 3], targets [n, 5] cls,x1,y1,x2,y2 pixels)."""
        s = self.img_size
        xc, yc = int(_uniform(0.5 * s, 1.5 * s)), int(_uniform(0.5 * s, 1.5 * s))
        indices = [index] + torch.randint(len(self), (3,)).tolist()
        img4 = np.empty((2 * s, 2 * s, 3), np.uint8)
        img4[:] = self.pad_color
        targets, visible = [], []
        for k, idx in enumerate(indices):
            img, _, (h, w) = self.load_image(idx)
            # canvas region a (x1a..x2a, y1a..y2a) <- image region b, each image touching the centre
            if k == 0:  # top left
                x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
                x1b, y1b = w - (x2a - x1a), h - (y2a - y1a)
            elif k == 1:  # top right
                x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
                x1b, y1b = 0, h - (y2a - y1a)
            elif k == 2:  # bottom left
                x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(yc + h, 2 * s)
                x1b, y1b = w - (x2a - x1a), 0
            else:  # bottom right
                x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(yc + h, 2 * s)
                x1b, y1b = 0, 0
            img4[y1a:y2a, x1a:x2a] = img[y1b:y1b + (y2a - y1a), x1b:x1b + (x2a - x1a)]
            lab = self.labels[idx]
            if len(lab):
                box = xywhn2xyxy(lab[:, 1:], w, h, x1a - x1b, y1a - y1b)
                area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
                # clip to the pasted region: the rest of the box is not on the canvas
                box[:, [0, 2]] = box[:, [0, 2]].clip(x1a, x2a)
                box[:, [1, 3]] = box[:, [1, 3]].clip(y1a, y2a)
                vis = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]) / (area + 1e-16)
                keep = vis > 0
                targets.append(np.concatenate((lab[keep, :1], box[keep]), 1))
                visible.append(vis[keep])
        targets = np.concatenate(targets, 0) if targets else np.zeros((0, 5), np.float32)
        visible = np.concatenate(visible, 0) if visible else np.zeros(0)
        hyp = self.hyp
        return random_affine(img4, targets, degrees=hyp['degrees'], translate=hyp['translate'], scale=hyp['scale'],
                             shear=hyp['shear'], border=-s // 2, color=self.pad_color, visible=visible)

    def __getitem__(self, index):
        hyp, s = self.hyp, self.img_size
        if self.augment and self.mosaic:
            img, targets = self._load_mosaic(index)
            shapes = None
        else:
            img, (h0, w0), (h, w) = self.load_image(index)
            shape = tuple(int(v) for v in self.rect_plan().shape_of[index]) if self.rect else s
            img, _, pad = letterbox(img, shape, color=self.pad_color, auto=False, scaleup=self.augment)
            shapes = (h0, w0), ((h / h0, w / w0), pad)
            lab = self.labels[index]
            targets = np.concatenate((lab[:, :1], xywhn2xyxy(lab[:, 1:], w, h, pad[0], pad[1])), 1)
            if self.augment:
                img, targets = random_affine(img, targets, degrees=hyp['degrees'], translate=hyp['translate'],
                                             scale=hyp['scale'], shear=hyp['shear'], color=self.pad_color)
        if self.augment:
            img = augment_hsv(img, hgain=hyp['hsv_h'], sgain=hyp['hsv_s'], vgain=hyp['hsv_v'])

        n = len(targets)
        labels_out = torch.zeros((n, 6), dtype=torch.float32)
        if n:
            labels_out[:, 1] = torch.from_numpy(np.ascontiguousarray(targets[:, 0], dtype=np.float32))
            labels_out[:, 2:] = torch.from_numpy(xyxy2xywhn(targets[:, 1:5], img.shape[1], img.shape[0]))
        if self.augment and torch.rand(()).item() < hyp['fliplr']:
            img = img[:, ::-1]
            labels_out[:, 2] = 1 - labels_out[:, 2]

        return image_tensor(img), labels_out, self.img_files[index], shapes

    @staticmethod
    def collate_fn(batch):
        """(imgs [B, 3, H, W], targets [N, 6] with column 0 = index in batch, paths tuple, shapes tuple)."""
        imgs, labels, paths, shapes = zip(*batch)
        targets = []
        for i, lab in enumerate(labels):
            lab = lab.clone()
            lab[:, 0] = i
            targets.append(lab)
        return torch.stack(imgs, 0), torch.cat(targets, 0), paths, shapes


class RectBatchSampler(Sampler):
    """Batches of LoadImagesAndLabels(rect=True) `dataset`: its rect_plan() batches, in order of aspect ratio.
    Read when iteration starts, so an img_size changed between epochs is followed."""

    def __init__(self, dataset):
        super().__init__()
        if not getattr(dataset, 'rect', False):
            raise DarkslimError("RectBatchSampler needs a LoadImagesAndLabels data set built with rect=True")
        self.dataset = dataset

    def __iter__(self):
        return iter([list(b) for b in self.dataset.rect_plan().batches])

    def __len__(self):
        return len(self.dataset.rect_plan().batches)
