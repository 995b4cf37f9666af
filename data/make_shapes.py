"""Synthetic detection dataset of coloured shapes, in Darknet/YOLO format, deterministic in its arguments.

    python -m data.make_shapes --out data/shapes --n-train 800 --n-val 200 --img-size 256 --seed 0   # in the repo

Writes DIR/images/{train,val}/*.jpg, DIR/labels/{train,val}/*.txt (class cx cy w h, normalized; an empty file
for a background-only image), DIR/train.txt and DIR/val.txt (image paths relative to DIR), DIR/shapes.names and
DIR/shapes.data (relative paths, resolved against DIR). The tree is built in a temp folder beside DIR and renamed
onto it; an existing DIR is replaced only if it is empty or a previous make_shapes output.

Five classes that differ by geometry (circle, rectangle, triangle, cross, star), sizes 12-42% of the image side,
random colours/rotations, partial overlap, textured noisy backgrounds, thin distractor strokes, ~25% non-square
images and ~5% background-only images. Each image i of a split draws from its own generator seeded by
(seed, split, i), so the val images do not depend on n_train.
"""
import argparse
import math
import os
import shutil
import tempfile

import cv2
import numpy as np

from utils.errors import DarkslimError, cli_main

CLASSES = ('circle', 'rectangle', 'triangle', 'cross', 'star')
SIZE_RANGE = (0.12, 0.42)  # object bbox long side, fraction of the image's short side (log-uniform)
MAX_OBJECTS = 5  # objects per image: 1..MAX_OBJECTS
P_BACKGROUND = 0.05  # probability of an image with no objects
P_NON_SQUARE = 0.25  # probability of a 4:3-ish image instead of a square one
MAX_OCCLUDED = 0.3  # a new object may cover at most this fraction of an earlier object's box
MIN_CONTRAST = 110.0  # minimum RGB distance between an object's colour and the background under it
JPEG_QUALITY = 92
_MARKER = 'shapes.data'


# ----------------------------------------------------------------------------------------------------------------
# drawing

def _rot(pts, angle):
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _shape_polygon(cls, size, rng):
    """Polygon [k, 2] (float, centred at 0) of class `cls` whose extent is about `size` pixels; None = circle."""
    r = size / 2
    a = rng.uniform(0, 2 * math.pi)
    if cls == 0:  # circle
        return None
    if cls == 1:  # rectangle, aspect 1..1.8
        asp = rng.uniform(1.0, 1.8)
        hw, hh = r, r / asp
        pts = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        return _rot(pts, a) * (r / np.abs(_rot(pts, a)).max())  # rotated, rescaled to fit the size
    if cls == 2:  # triangle: jittered equilateral
        ang = np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.25, 0.25, 3) + a
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) * r
        return pts
    if cls == 3:  # cross (plus sign), arm width 0.3..0.45 of the size
        t = r * rng.uniform(0.3, 0.45)
        pts = np.array([[-t, -r], [t, -r], [t, -t], [r, -t], [r, t], [t, t], [t, r], [-t, r], [-t, t],
                        [-r, t], [-r, -t], [-t, -t]])
        return _rot(pts, a) * (r / np.abs(_rot(pts, a)).max())
    # star: 5 points, inner radius 0.38..0.5 of the outer
    inner = rng.uniform(0.38, 0.5)
    ang = a + np.arange(10) * math.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, r, r * inner)
    return np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 1)


def _draw(img, mask, cls, poly, center, size, color):
    """Draw the shape filled into img (anti-aliased) and mask (hard); both in place."""
    cx, cy = center
    if poly is None:
        rad = int(round(size / 2))
        c = (int(round(cx)), int(round(cy)))
        cv2.circle(img, c, rad, color, -1, cv2.LINE_AA)
        cv2.circle(mask, c, rad, 255, -1, cv2.LINE_8)
        return
    pts = np.round((poly + [cx, cy]) * 16).astype(np.int32)  # 4 fractional bits
    cv2.fillPoly(img, [pts], color, cv2.LINE_AA, shift=4)
    cv2.fillPoly(mask, [pts], 255, cv2.LINE_8, shift=4)


def _background(rng, h, w):
    """Float32 HxWx3 smooth colour field with a texture."""
    g = int(rng.integers(2, 7))
    base = rng.uniform(30, 225, 3)
    low = base + (rng.uniform(0, 255, (g, g, 3)) - 127.5) * rng.uniform(0.15, 0.5)
    bg = cv2.resize(low.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    kind = rng.integers(3)
    if kind == 0:  # stripes
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        th = rng.uniform(0, math.pi)
        period = rng.uniform(6, 24)
        wave = np.sin((xx * math.cos(th) + yy * math.sin(th)) * 2 * math.pi / period)
        bg += wave[..., None] * rng.uniform(4, 14)
    elif kind == 1:  # blotches: upsampled coarse noise
        gg = int(rng.integers(8, 24))
        blot = cv2.resize(rng.normal(0, 1, (gg, gg)).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        bg += blot[..., None] * rng.uniform(5, 16)
    return bg


def _random_color(rng, under):
    """A saturated-ish colour at least MIN_CONTRAST away from `under` (best of a few tries)."""
    best, best_d = None, -1.0
    for _ in range(12):
        c = rng.uniform(0, 255, 3)
        d = float(np.linalg.norm(c - under))
        if d > best_d:
            best, best_d = c, d
        if d >= MIN_CONTRAST:
            break
    return tuple(float(v) for v in best)


def _clutter(rng, img, n, max_thickness):
    """n thin distractor strokes: lines, arcs and zig-zags (never closed filled shapes)."""
    h, w = img.shape[:2]
    for _ in range(n):
        color = tuple(float(v) for v in rng.uniform(0, 255, 3))
        t = int(rng.integers(1, max_thickness + 1))
        kind = rng.integers(3)
        if kind == 0:
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p1, p2, color, t, cv2.LINE_AA)
        elif kind == 1:
            c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            ax = (int(rng.integers(5, w // 3)), int(rng.integers(5, h // 3)))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(img, c, ax, float(rng.uniform(0, 180)), start, start + float(rng.uniform(40, 200)),
                        color, t, cv2.LINE_AA)
        else:
            k = int(rng.integers(3, 6))
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            steps = rng.normal(0, min(h, w) / 8, (k, 2)).cumsum(0) + [x0, y0]
            cv2.polylines(img, [np.round(steps).astype(np.int32)], False, color, t, cv2.LINE_AA)


def _overlap_ok(box, boxes):
    """The new box may cover at most MAX_OCCLUDED of each earlier box (earlier objects stay mostly visible)."""
    x1, y1, x2, y2 = box
    for bx1, by1, bx2, by2 in boxes:
        iw, ih = min(x2, bx2) - max(x1, bx1), min(y2, by2) - max(y1, by1)
        if iw > 0 and ih > 0 and iw * ih > MAX_OCCLUDED * (bx2 - bx1) * (by2 - by1):
            return False
    return True


def render_image(rng, img_size):
    """One sample: (BGR uint8 image, objects [(cls, x1, y1, x2, y2)] with inclusive pixel bounds)."""
    h = w = img_size
    if rng.random() < P_NON_SQUARE:
        short = int(round(img_size * rng.uniform(0.65, 0.85)))
        if rng.random() < 0.5:
            h = short
        else:
            w = short
    img = np.clip(_background(rng, h, w), 0, 255).astype(np.uint8)  # uint8: OpenCV anti-aliases only 8-bit
    short_side = min(h, w)
    _clutter(rng, img, int(rng.integers(1, 6)), max(1, short_side // 100))
    n_obj = 0 if rng.random() < P_BACKGROUND else int(rng.integers(1, MAX_OBJECTS + 1))
    objects, boxes = [], []
    mask = np.zeros((h, w), np.uint8)
    for _ in range(n_obj):
        for _try in range(30):
            cls = int(rng.integers(len(CLASSES)))
            size = short_side * math.exp(rng.uniform(math.log(SIZE_RANGE[0]), math.log(SIZE_RANGE[1])))
            poly = _shape_polygon(cls, size, rng)
            ext = np.array([size / 2] * 2) if poly is None else np.abs(poly).max(0)
            cx = rng.uniform(ext[0] + 2, w - ext[0] - 2)
            cy = rng.uniform(ext[1] + 2, h - ext[1] - 2)
            approx = (cx - ext[0], cy - ext[1], cx + ext[0], cy + ext[1])
            if _overlap_ok(approx, boxes):
                break
        else:
            continue  # no room left in this image
        x1, y1, x2, y2 = (int(round(v)) for v in approx)
        under = img[max(y1, 0):y2 + 1, max(x1, 0):x2 + 1].reshape(-1, 3).mean(0)  # colour under the object
        mask[:] = 0
        _draw(img, mask, cls, poly, (cx, cy), size, _random_color(rng, under))
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        boxes.append(approx)
        objects.append((cls, int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())))
    _clutter(rng, img, int(rng.integers(0, 3)), 1)  # a few strokes over the objects too
    noise = rng.normal(0, rng.uniform(2, 9), (h, w, 1) if rng.random() < 0.5 else (h, w, 3))
    img = np.clip(img + noise.astype(np.float32), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 1.0)))
    return img, objects


def _label_text(objects, h, w):
    """Darknet label rows for inclusive pixel boxes in an image of h x w."""
    rows = []
    for cls, x1, y1, x2, y2 in objects:
        bw, bh = (x2 + 1 - x1), (y2 + 1 - y1)
        rows.append(f"{cls} {(x1 + bw / 2) / w:.6f} {(y1 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}\n")
    return ''.join(rows)


# ----------------------------------------------------------------------------------------------------------------
# dataset

def _write_split(root, split, split_id, n, img_size, seed):
    """Write n images + labels of one split under root; return (list-file lines, per-class counts, n_background)."""
    os.makedirs(os.path.join(root, 'images', split))
    os.makedirs(os.path.join(root, 'labels', split))
    lines, counts, n_bg = [], [0] * len(CLASSES), 0
    for i in range(n):
        rng = np.random.default_rng([seed, split_id, i])
        img, objects = render_image(rng, img_size)
        ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError('JPEG encoding failed')
        rel = f"images/{split}/{i:06d}.jpg"
        with open(os.path.join(root, rel), 'wb') as f:
            f.write(buf.tobytes())
        with open(os.path.join(root, 'labels', split, f"{i:06d}.txt"), 'w') as f:
            f.write(_label_text(objects, *img.shape[:2]))
        lines.append(rel + '\n')
        for o in objects:
            counts[o[0]] += 1
        n_bg += not objects
    return lines, counts, n_bg


def make_shapes(out, n_train=800, n_val=200, img_size=256, seed=0, verbose=False):
    """Write the dataset to folder `out` (atomically: built beside it, then renamed); return the .data path."""
    for name, v, lo in (('n-train', n_train, 1), ('n-val', n_val, 1), ('img-size', img_size, 32), ('seed', seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise DarkslimError(f"--{name} {v!r}: expected an integer >= {lo}")
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise DarkslimError(f"{out}: exists and is not a folder; expected a new or empty folder, "
                                f"or a previous make_shapes output")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, _MARKER)):
            raise DarkslimError(f"{out}: folder not empty and not a make_shapes output (no {_MARKER}); "
                                f"expected a new or empty folder")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    try:
        summary = {}
        for split, split_id, n, list_name in (('train', 0, n_train, 'train.txt'), ('val', 1, n_val, 'val.txt')):
            lines, counts, n_bg = _write_split(tmp, split, split_id, n, img_size, seed)
            with open(os.path.join(tmp, list_name), 'w') as f:
                f.writelines(lines)
            summary[split] = (n, counts, n_bg)
        with open(os.path.join(tmp, 'shapes.names'), 'w') as f:
            f.write(''.join(c + '\n' for c in CLASSES))
        with open(os.path.join(tmp, _MARKER), 'w') as f:
            f.write(f"# synthetic shapes: make_shapes(n_train={n_train}, n_val={n_val}, img_size={img_size}, "
                    f"seed={seed}); paths relative to this file's folder\n"
                    f"classes = {len(CLASSES)}\ntrain = train.txt\nvalid = val.txt\nnames = shapes.names\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        # swap into place: an old output is moved aside first, then removed
        old = None
        if os.path.isdir(out):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.old-")
            os.replace(out, os.path.join(old, 'x'))
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        for split, (n, counts, n_bg) in summary.items():
            per = ', '.join(f"{c} {k}" for c, k in zip(CLASSES, counts))
            print(f"{split}: {n} images ({n_bg} background), {sum(counts)} objects: {per}")
        print(f"wrote {out}")
    return os.path.join(out, _MARKER)


def get_args_parser():
    p = argparse.ArgumentParser(description='Write a synthetic shapes detection dataset (Darknet/YOLO format).')
    p.add_argument('--out', default='data/shapes', help='output folder (replaced if it is a make_shapes output)')
    p.add_argument('--n-train', type=int, default=800)
    p.add_argument('--n-val', type=int, default=200)
    p.add_argument('--img-size', type=int, default=256, help='image long side in pixels')
    p.add_argument('--seed', type=int, default=0)
    return p


def main(args):
    return make_shapes(args.out, args.n_train, args.n_val, args.img_size, args.seed, verbose=True)


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
