"""Shared test helpers: small cfgs built in code, random-but-sane weights, the shared reference folder, the
reference runtimes (OpenCV's Darknet importer, libdarknet, pycocotools), pruning fixtures and oracle detectors."""
import contextlib
import copy
import math
import os
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.darknet_lib import darknet_cli_missing, darknet_missing
from utils.darknet_weights import save_weights
from utils.parse_config import infer_shapes, layer_inputs, parse_cfg, yolo_masks

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
SHARED_CFGS = sorted((SHARED / 'darknet-cfg').glob('*.cfg')) if (SHARED / 'darknet-cfg').is_dir() else []
OUR_CFGS = sorted((REPO / 'cfg').glob('*.cfg'))


def need_shared(sub):
    """Path under ../shared, or skip the test (a user's clone has no shared/)."""
    p = SHARED / sub
    if not p.exists():
        pytest.skip(f"{p} absent (reference data beside the developers' clone only)")
    return p


def need_darknet():
    """Skip the calling test unless libdarknet, its header and gcc are present (utils/darknet_lib.py)."""
    why = darknet_missing()
    if why:
        pytest.skip(why)


def need_darknet_cli():
    """Skip the calling test unless the darknet executable is present."""
    why = darknet_cli_missing()
    if why:
        pytest.skip(why)


def conv(filters, size=1, stride=1, bn=1, act='leaky'):
    return (f"[convolutional]\nbatch_normalize={bn}\nfilters={filters}\nsize={size}\nstride={stride}\n"
            f"pad=1\nactivation={act}\n")


def yolo(mask, anchors, nc):
    a = ', '.join(f"{w},{h}" for w, h in anchors)
    return (f"[yolo]\nmask={','.join(map(str, mask))}\nanchors={a}\nclasses={nc}\nnum={len(anchors)}\n"
            "jitter=.3\nignore_thresh=.7\ntruth_thresh=1\nrandom=1\n")


ANCHORS6 = [(7, 9), (15, 21), (30, 25), (33, 61), (70, 52), (90, 110)]  # not COCO's on purpose


def mini_yolov3(nc=3, width=96, height=64):
    """A Darknet-53-like cfg: residual stages, two heads, route + upsample. 23 layers."""
    s = f"[net]\nwidth={width}\nheight={height}\nchannels=3\n\n"
    s += conv(8, 3)                                            # 0
    s += conv(16, 3, 2)                                        # 1  /2
    s += conv(8, 1) + conv(16, 3) + "[shortcut]\nfrom=-3\nactivation=linear\n"   # 2 3 4
    s += conv(24, 3, 2)                                        # 5  /4
    s += conv(12, 1) + conv(24, 3) + "[shortcut]\nfrom=-3\nactivation=linear\n"   # 6 7 8
    s += conv(12, 1) + conv(24, 3) + "[shortcut]\nfrom=-3\nactivation=linear\n"   # 9 10 11
    s += conv(40, 3, 2)                                        # 12 /8
    s += conv(20, 1) + conv(40, 3) + "[shortcut]\nfrom=-3\nactivation=linear\n"   # 13 14 15
    s += conv(20, 1) + conv(40, 3)                             # 16 17
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')             # 18
    s += yolo([3, 4, 5], ANCHORS6, nc)                         # 19
    s += "[route]\nlayers=-4\n"                                # 20 -> 16
    s += conv(10, 1) + "[upsample]\nstride=2\n"                # 21 22
    s += "[route]\nlayers=-1,11\n"                             # 23
    s += conv(12, 1) + conv(24, 3)                             # 24 25
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')             # 26
    s += yolo([0, 1, 2], ANCHORS6, nc)                         # 27
    return s


def mini_tiny(nc=2, width=96, height=96):
    """A yolov3-tiny-like cfg: maxpool backbone including size=2 stride=1, two heads."""
    s = f"[net]\nwidth={width}\nheight={height}\nchannels=3\n\n"
    s += conv(8, 3) + "[maxpool]\nsize=2\nstride=2\n"          # 0 1
    s += conv(16, 3) + "[maxpool]\nsize=2\nstride=2\n"         # 2 3
    s += conv(24, 3) + "[maxpool]\nsize=2\nstride=2\n"         # 4 5
    s += conv(32, 3) + "[maxpool]\nsize=2\nstride=1\n"         # 6 7
    s += conv(48, 3)                                           # 8
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')             # 9
    s += yolo([3, 4, 5], ANCHORS6, nc)                         # 10
    s += "[route]\nlayers=-3\n"                                # 11 -> 8
    s += conv(16, 1) + "[upsample]\nstride=2\n"                # 12 13
    s += "[route]\nlayers=-1,4\n"                              # 14
    s += conv(24, 3)                                           # 15
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')             # 16
    s += yolo([0, 1, 2], ANCHORS6, nc)                         # 17
    return s


def tiny_prn(nc=2):
    """A yolov3-tiny-prn-like cfg (AlexeyAB cfg/yolov3-tiny-prn.cfg at 1/8 of its channels): shortcuts that add a
    32-channel layer to 16-channel layers (from=8)."""
    s = "[net]\nwidth=96\nheight=96\nchannels=3\n"
    for i, f in enumerate([2, 4, 8, 16, 32, 64]):                      # 0..11: conv + maxpool pairs
        s += conv(f, 3) + f"[maxpool]\nsize=2\nstride={1 if i == 5 else 2}\n"
    s += conv(64, 3) + "[shortcut]\nactivation=leaky\nfrom=-3\n"       # 12 13
    s += conv(32, 1) + conv(32, 3) + "[shortcut]\nactivation=leaky\nfrom=-2\n"   # 14 15 16
    s += conv(3 * (nc + 5), 1, bn=0, act='linear') + yolo([3, 4, 5], ANCHORS6, nc)  # 17 18
    s += "[route]\nlayers=-4\n" + conv(16, 1) + "[upsample]\nstride=2\n"   # 19 20 21
    s += "[shortcut]\nactivation=leaky\nfrom=8\n"                     # 22: 16 + 32 channels
    s += conv(16, 3) + "[shortcut]\nactivation=leaky\nfrom=-3\n"      # 23 24
    s += "[shortcut]\nactivation=leaky\nfrom=8\n"                     # 25
    s += conv(3 * (nc + 5), 1, bn=0, act='linear') + yolo([1, 2, 3], ANCHORS6, nc)  # 26 27
    return s


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def randomize_(model, seed=0, var_range=(0.5, 2.0)):
    """Weights that keep activations O(1) through depth: conv ~ N(0, 1/fan_in); BN gamma in [0.5, 1.5],
    beta, mean ~ N(0, 0.1), running_var in `var_range` (>= 0.5 so OpenCV's eps 1e-6 vs our 1e-5 is noise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(*var_range, generator=g)
    return model


def cocoeval(gt, dets):
    """Reference metrics: pycocotools' COCOeval ('bbox') of `dets` (COCO result entries, or a JSON file of them)
    against COCO-format ground truth dict `gt`, with every detection evaluated (no per-image cap) and area range
    'all' only. Returns (mAP50, mAP50_95, {category: (AP50, AP50_95)}) over categories with ground truth."""
    import contextlib
    import copy
    import io
    import json

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    # pycocotools adds keys to the dicts it is given: work on copies
    dets = copy.deepcopy(dets) if isinstance(dets, list) else json.loads(Path(dets).read_text())
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), 'bbox')
        ev.params.maxDets = [len(dets) + 1]
        ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ['all']
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval['precision'][:, :, :, 0, 0]  # [T, R, K]; -1 for categories without ground truth
    per_class = {c: (prec[0, :, k].mean(), prec[:, :, k].mean())
                 for k, c in enumerate(ev.params.catIds) if (prec[:, :, k] > -1).all()}
    return prec[0][prec[0] > -1].mean(), prec[prec > -1].mean(), per_class


def counted_cost(model, height, width):
    """(trainable params, BFLOPs) of `model` counted from its own tensors, not from the cfg: params = the sum of
    its parameters' numel; BFLOPs from the shapes a forward at height x width actually produces, totalled as
    AlexeyAB darknet does: conv 2 * out_c * (in_c / groups) * kh * kw * out_h * out_w, maxpool
    size * size * c * out_h * out_w, shortcut out_c * out_h * out_w * (inputs - 1)."""
    from models import MaxPoolDarknet, Shortcut
    flops = []

    def conv_hook(m, inputs, out):
        flops.append(2 * m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                     * out.shape[2] * out.shape[3])

    def pool_hook(m, inputs, out):
        flops.append(m.size * m.size * out.shape[1] * out.shape[2] * out.shape[3])

    def shortcut_hook(m, inputs, out):
        flops.append(out[0].numel() * (len(inputs[0]) - 1))

    hooks = []
    for m in model.modules():
        hook = {torch.nn.Conv2d: conv_hook, MaxPoolDarknet: pool_hook, Shortcut: shortcut_hook}.get(type(m))
        if hook:
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, model.in_channels, height, width))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sum(p.numel() for p in model.parameters()), sum(flops) / 1e9


# --- our model vs OpenCV's Darknet importer -----------------------------------------------------------------------

def opencv_yolo_outputs(cfg, weights, x):
    """OpenCV's [yolo] outputs, reshaped to [na, H, W, 5+nc] per head, in cfg order."""
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.setInput(x.numpy())
    names = net.getUnconnectedOutLayersNames()
    order = sorted(range(len(names)), key=lambda k: int(names[k].split('_')[-1]))
    outs = net.forward(names)
    return [outs[k] for k in order]


OPENCV_CLASS_THRESH = 0.2  # OpenCV's region layer zeroes obj*cls scores under this (darknet's -thresh default)


def opencv_max_diff(model, cfg, weights, x, tol=2e-3):
    """Largest difference between our decoded output for input x [1, 3, h, w], mapped to darknet's yolo output
    space (x, y, w, h / input size; obj; obj*cls), and OpenCV's for the files cfg + weights. w, h =
    exp(t)*anchor are compared as log ratios (i.e. in t), since exp turns the BN-eps residue (1e-5 vs 1e-6) into
    a relative error; class scores where OpenCV kept them (where it zeroed one, ours must be under its
    threshold, within tol)."""
    h, w = x.shape[-2:]
    with torch.no_grad():
        inf, raw = model.eval()(x)
    ref = opencv_yolo_outputs(cfg, weights, x)
    assert len(ref) == len(raw)
    worst, start = 0.0, 0
    for r, o in zip(raw, ref):
        _, na, ny, nx, no = r.shape
        ours = inf[0, start:start + na * ny * nx].view(na, ny, nx, no).clone()
        start += na * ny * nx
        ours[..., [0, 2]] /= w
        ours[..., [1, 3]] /= h
        ours[..., 5:] *= ours[..., 4:5]
        theirs = torch.from_numpy(o).view(ny, nx, na, no).permute(2, 0, 1, 3)  # OpenCV rows: y, x, anchor
        d_xy_obj = (ours[..., [0, 1, 4]] - theirs[..., [0, 1, 4]]).abs().max()
        d_wh = (ours[..., 2:4].log() - theirs[..., 2:4].log()).abs().max()
        kept = theirs[..., 5:] > 0
        d_cls = (ours[..., 5:][kept] - theirs[..., 5:][kept]).abs().max() if kept.any() else torch.tensor(0.)
        assert (ours[..., 5:][~kept] < OPENCV_CLASS_THRESH + tol).all()
        worst = max(worst, d_xy_obj.item(), d_wh.item(), d_cls.item())
    return worst


def assert_matches_opencv(model, cfg, tmp_path, h, w, tol=2e-3):
    """Our model (its weights written here) equals OpenCV's import of cfg + those weights on a random h x w
    input, within tol (see opencv_max_diff). Returns the max difference."""
    weights = save_weights(model, tmp_path / 'w.weights')
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    worst = opencv_max_diff(model, cfg, weights, x, tol)
    assert worst < tol
    return worst


# --- pruning: narrow real graphs, 1x1-only graphs, sparse BN ------------------------------------------------------

def narrow_defs(path, nc=3, div=8, height=96, width=128):
    """`path`'s cfg for `nc` classes with every non-head conv's filters divided by `div` (rounded up, so equal
    widths stay equal and shortcuts still add), at height x width: the same graph, a fraction of the compute."""
    defs = copy.deepcopy(parse_cfg(path))
    defs[0]['height'], defs[0]['width'] = height, width
    heads = set()
    for i, d in enumerate(defs[1:]):
        if d['type'] == 'yolo':
            src = layer_inputs(defs, i)[0]
            heads.add(src)
            defs[src + 1]['filters'] = len(yolo_masks(d)) * (nc + 5)
            d['classes'] = nc
    for i, d in enumerate(defs[1:]):
        if d['type'] == 'convolutional' and i not in heads:
            d['filters'] = max(2, math.ceil(d['filters'] / div))
    infer_shapes(defs)
    return defs


def one_by_one_cfg(nc=2, width=64, height=64):
    """Every consumer of a prunable conv is 1x1 (or a shortcut / route / maxpool / upsample leading to 1x1), so
    folding the constant act(beta) of removed channels is exact everywhere, borders included.

    layer: 0 conv3x3/2 (reads the image) | 1 conv | 2 conv | 3 shortcut 0+2 | 4 maxpool 2/2 | 5 conv | 6 conv |
    7 upsample | 8 route 7,3 | 9 conv | 10 head | 11 yolo | 12 route 5 | 13 maxpool 2/1 | 14 conv | 15 head |
    16 yolo
    """
    s = f"[net]\nwidth={width}\nheight={height}\nchannels=3\n\n"
    s += conv(16, 3, 2)                                            # 0
    s += conv(8, 1) + conv(16, 1)                                  # 1 2
    s += "[shortcut]\nfrom=-3\nactivation=linear\n"                # 3 = 0 + 2
    s += "[maxpool]\nsize=2\nstride=2\n"                           # 4
    s += conv(24, 1) + conv(12, 1)                                 # 5 6
    s += "[upsample]\nstride=2\n"                                  # 7
    s += "[route]\nlayers=-1,3\n"                                  # 8: 12 + 16 channels
    s += conv(16, 1)                                               # 9
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')                 # 10
    s += yolo([0, 1, 2], ANCHORS6, nc)                             # 11
    s += "[route]\nlayers=5\n"                                     # 12
    s += "[maxpool]\nsize=2\nstride=1\n"                           # 13
    s += conv(20, 1)                                               # 14
    s += conv(3 * (nc + 5), 1, bn=0, act='linear')                 # 15
    s += yolo([3, 4, 5], ANCHORS6, nc)                             # 16
    return s


def sparsify_(model, layer_set, share=0.4, seed=0, beta=0.0):
    """Zero gamma of a random `share` of each prunable layer's channels (never all of them) and set their beta
    to `beta` (a float, or 'random' for N(0, 1)). Shortcut groups get the same channels in every member, so
    the union mask removes them. Returns {layer: zeroed channel indices}."""
    g = torch.Generator().manual_seed(seed)
    grouped = {i for grp in layer_set.groups for i in grp}
    units = [list(grp) for grp in layer_set.groups] + [[i] for i in layer_set.prunable if i not in grouped]
    zeroed = {}
    with torch.no_grad():
        for unit in units:
            n = model.module_list[unit[0]][1].num_features
            k = min(n - 1, max(1, round(share * n)))
            idx = torch.randperm(n, generator=g)[:k].sort().values
            for i in unit:
                bn = model.module_list[i][1]
                bn.weight[idx] = 0
                if beta == 'random':
                    bn.bias[idx] = torch.randn(k, generator=g)
                else:
                    bn.bias[idx] = beta
                zeroed[i] = idx
    return zeroed


def raw_outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)[1]


def max_diff(a, b):
    """Largest |difference| over two lists of raw yolo outputs of equal shapes."""
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((u - v).abs().max().item() for u, v in zip(a, b))


# --- oracle detectors: noisy ground truth as detections -----------------------------------------------------------

def _original_xyxy(lab, h0, w0):
    """Normalised labels [m, 5] -> [m, 5] cls, x1, y1, x2, y2 in the pixels of the h0 x w0 original image."""
    return np.stack([lab[:, 0], (lab[:, 1] - lab[:, 3] / 2) * w0, (lab[:, 2] - lab[:, 4] / 2) * h0,
                     (lab[:, 1] + lab[:, 3] / 2) * w0, (lab[:, 2] + lab[:, 4] / 2) * h0], 1)


def _noisy_detections(lab_xyxy, s, nc, seed):
    """Rows [n, 5 + nc] (cx, cy, w, h, obj, class probs) in letterboxed pixels: each GT box missed (15%) or found
    with jitter of random size (tight, loose or poor), a wrong class now and then, a weaker second class, random
    scores; plus a few false positives. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    rows = []

    def row(cx, cy, w, h, score, c, p2):
        probs = np.zeros(nc)
        probs[c] = 1.0
        probs[(c + 1) % nc] = p2  # also a candidate of another class, score * p2 (multi-label NMS)
        rows.append(np.concatenate([[cx, cy, w, h, score], probs]))

    for c, x1, y1, x2, y2 in lab_xyxy.tolist():
        if rng.random() < 0.15:
            continue
        w, h = x2 - x1, y2 - y1
        sigma = rng.choice([0.02, 0.08, 0.25])
        c = int(c) if rng.random() < 0.85 else int(rng.integers(nc))
        row((x1 + x2) / 2 + rng.normal(0, sigma * w), (y1 + y2) / 2 + rng.normal(0, sigma * h),
            w * np.exp(rng.normal(0, sigma)), h * np.exp(rng.normal(0, sigma)), rng.uniform(0.05, 1.0), c,
            rng.uniform(0, 0.5))
    for _ in range(int(rng.integers(0, 4))):
        row(rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.05, 0.5) * s, rng.uniform(0.05, 0.5) * s,
            rng.uniform(0.01, 0.6), int(rng.integers(nc)), rng.uniform(0, 0.5))
    return np.array(rows, dtype=np.float32).reshape(-1, 5 + nc)


class RectOracle(torch.nn.Module):
    """Eval contract of models.Darknet (decoded [B, N, 5 + nc]: cx, cy, w, h in input pixels, objectness,
    class probabilities). images: original BGR arrays; dets[k]: [n, 4 + 1 + nc] x1, y1, x2, y2 in image k's
    pixels, objectness, class probabilities; s: the letterbox long side."""

    def __init__(self, images, dets, nc, s):
        super().__init__()
        self.images, self.dets, self.nc, self.s = images, dets, nc, s
        self.img_size = (s, s)
        self.banks, self.shapes_seen = {}, []

    def _geometry(self, k, hw):
        """(scale x, scale y, left, top) of image k letterboxed into an hw input: long side s, centred."""
        h0, w0 = self.images[k].shape[:2]
        r = self.s / max(h0, w0)
        nh, nw = max(1, round(h0 * r)), max(1, round(w0 * r))
        return nw / w0, nh / h0, (hw[1] - nw) // 2, (hw[0] - nh) // 2, nh, nw

    def _bank(self, hw):
        if hw not in self.banks:
            bank = []
            for k, img in enumerate(self.images):
                _, _, left, top, nh, nw = self._geometry(k, hw)
                if left < 0 or top < 0:  # does not fit this shape: never matches
                    bank.append(torch.full((3, *hw), -1.0))
                    continue
                small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if nh < img.shape[0] else
                                   cv2.INTER_LINEAR)
                canvas = np.full((*hw, 3), 114, np.uint8)
                canvas[top:top + nh, left:left + nw] = small
                bank.append(torch.from_numpy(canvas[:, :, ::-1].transpose(2, 0, 1).copy()).float() / 255)
            self.banks[hw] = torch.stack(bank)
        return self.banks[hw]

    def forward(self, x):
        hw = tuple(x.shape[2:])
        self.shapes_seen.append(hw)
        bank, out = self._bank(hw), []
        for img in x:
            d = (bank - img[None]).abs().flatten(1).mean(1)
            k = int(d.argmin())
            assert float(d[k]) < 1e-3, f"oracle does not know this image (mean abs diff {float(d[k])})"
            sx, sy, left, top, _, _ = self._geometry(k, hw)
            det = self.dets[k]
            x1, y1, x2, y2 = det[:, 0] * sx + left, det[:, 1] * sy + top, det[:, 2] * sx + left, det[:, 3] * sy + top
            rows = np.concatenate([np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1), det[:, 4:]], 1)
            out.append(torch.from_numpy(rows.astype(np.float32)))
        batch = torch.zeros(len(out), max(len(r) for r in out), 5 + self.nc)  # zero rows: below any threshold
        for b, r in enumerate(out):
            batch[b, :len(r)] = r
        return batch, []


def _oracle_dets(labels, sizes, nc):
    """Noisy detections (misses, jitter, wrong classes, false positives) in original pixels, per image."""
    dets = []
    for i, (lab, (h0, w0)) in enumerate(zip(labels, sizes)):
        rows = _noisy_detections(_original_xyxy(lab, h0, w0), max(h0, w0), nc, seed=i)  # cx, cy, w, h, obj, p
        xyxy = np.stack([rows[:, 0] - rows[:, 2] / 2, rows[:, 1] - rows[:, 3] / 2, rows[:, 0] + rows[:, 2] / 2,
                         rows[:, 1] + rows[:, 3] / 2], 1)
        dets.append(np.concatenate([xyxy, rows[:, 4:]], 1).astype(np.float64))
    return dets


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One intra-op thread for a test file that imports this fixture: on a busy 2-core machine two spinning
    OpenMP threads make small forwards ~100x slower. Restored after the file."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- AlexeyAB darknet (built from ../shared/darknet-src/alexeyab by utils/darknet_build.py) -----------------------

def need_alexeyab(source=None, cache=None):
    """AlexeyAB darknet's DarknetRuntime, built once into the cache (utils/darknet_build.py), or skip the calling
    test with why it cannot be built here (no source tree, a missing tool, or make's last lines)."""
    from utils import darknet_build
    runtime, why = darknet_build.alexeyab(source or darknet_build.ALEXEYAB_SRC, cache)
    why = why or runtime.missing()   # gcc for the accessor shim
    if why:
        pytest.skip(f"AlexeyAB darknet unavailable: {why}")
    return runtime


def head_decoding(model):
    """Per [yolo] head of a models.Darknet, its (scale_x_y, new_coords): how the [yolo] layer maps its input
    (utils.darknet_lib.to_darknet_space)."""
    return [(model.module_list[i].scale_x_y, model.module_list[i].new_coords) for i in model.yolo_layers]


@contextlib.contextmanager
def interrupted_after_first_last_pt(monkeypatch):
    """Inside: a training run stops with KeyboardInterrupt ("Ctrl-C") right after its first last.pt is on disk
    (expected: the block raises it); afterwards models.save_checkpoint is the real one again."""
    import models
    real_save = models.save_checkpoint

    def save_then_interrupt(path, model, **extra):
        real_save(path, model, **extra)
        if os.path.basename(path) == 'last.pt':
            raise KeyboardInterrupt

    monkeypatch.setattr(models, 'save_checkpoint', save_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(models, 'save_checkpoint', real_save)


def free_port():
    """A TCP port free on 127.0.0.1 now (for a torchrun rendezvous), or None where sockets cannot be bound."""
    try:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            return s.getsockname()[1]
    except OSError:
        return None


# --- a toy Pascal VOC dataset -------------------------------------------------------------------------------

VOC_SPLITS = {'train': 4, 'val': 2, 'test': 2}


def voc_root(root, size=96):
    """JPEGImages/Annotations/ImageSets/Main for VOC_SPLITS: grey images with a bright box and a dark disc each."""
    for sub in ('JPEGImages', 'Annotations', 'ImageSets/Main'):
        (root / sub).mkdir(parents=True)
    k = 0
    for split, n in VOC_SPLITS.items():
        stems = []
        for _ in range(n):
            stem = f"img{k:02d}"
            img = np.full((size, size, 3), 120, np.uint8)
            x = 10 + 7 * k % 40
            cv2.rectangle(img, (x, 20), (x + 30, 50), (250, 250, 250), -1)
            cv2.circle(img, (70, 70), 10, (10, 10, 10), -1)
            cv2.imwrite(str(root / 'JPEGImages' / f"{stem}.jpg"), img)
            objs = [('cell', (x, 20, x + 30, 50)), ('dot', (60, 60, 80, 80))]
            xml = ''.join(f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
                          f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                          for c, b in objs)
            (root / 'Annotations' / f"{stem}.xml").write_text(
                f"<annotation><filename>{stem}.jpg</filename><size><width>{size}</width><height>{size}</height>"
                f"<depth>3</depth></size>{xml}</annotation>")
            stems.append(stem)
            k += 1
        (root / 'ImageSets' / 'Main' / f"{split}.txt").write_text('\n'.join(stems) + '\n')
    return root
