"""Shared test fixtures: small cfgs built in code, random-but-sane weights, the shared reference folder."""
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One intra-op thread for a test file that imports this fixture: on a busy 2-core machine two spinning
    OpenMP threads make small forwards ~100x slower. Restored after the file."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
