"""Calibrated surgery: prune a model that was NOT sparse-trained, using a few real images.

A prune removes the channels with small |BN gamma|.  After sparsity training such a channel outputs about the
constant act(beta), which prune_utils folds into its consumers ("beta fold").  In a normally trained model the
removed channels are alive, and the beta fold loses most of the accuracy.  With N calibration images (the
train split of a .data file) three repairs, each optional, run in this order:

1. 'mean':  a removed channel's constant is its measured mean activation (over images and positions, in the
   original model) instead of act(beta); it is folded into every consumer exactly as the beta constant is.
2. 'refit': every conv that lost input channels is refit, in forward order, by ridge least squares on
   sampled output positions: its weights on the kept inputs plus an offset, so that its raw output (before BN)
   in the compact model matches the original model's (He et al. 2017, "Channel pruning"; ThiNet).  The inputs
   are taken from the compact model with earlier consumers already refit, so errors do not compound.  The
   ridge shrinks towards the folded weights (not towards 0), its strength chosen per output channel on
   held-out images: with few images per feature a refit then stays near the weights the model was trained
   with instead of overfitting.
3. 'bn':    the BatchNorm running mean/var of the convs the prune affects (affected_layers) re-estimated on
   the images; the others keep the statistics they were trained with.

    images = calibration_images('data/coco.data', 128, 416)
    compact, report = calibrated_compact(model, plan, images, steps=('mean', 'refit', 'bn'))

Everything runs on the device of the models given (the CPU unless the caller moved them).
"""
import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import channels
from channels import channel_flow
from prune_utils import compact_model, loose_model
from utils.datasets import LoadImagesAndLabels, list_images, parse_data_cfg
from utils.errors import DarkslimError

STEPS = ('mean', 'refit', 'bn')                 # the order calibrated_compact runs them in
DEFAULT_STEPS = ('mean', 'refit', 'bn')
# ridge strengths tried by refit_consumers, relative to the mean variance of the features (the offset is not
# penalized); the one with the least error on held-out images is used for the final fit on all images.  The
# large ones matter when shrinking towards the folded weights (an infinite strength is the fold itself)
RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)


# --- images -----------------------------------------------------------------------------------------------------

def calibration_files(data_path, n=None, seed=0):
    """Image paths for calibration: the .data file's TRAIN split only (never `valid`, so that evaluation stays
    apart), all of it when `n` is None or at least its size, else a seeded random `n` of it, in file order."""
    data = parse_data_cfg(data_path)
    files = list_images(data['train'])
    if n is not None and n < 1:
        raise DarkslimError(f"calibration images {n}; expected a positive count")
    if n is None or n >= len(files):
        return files
    pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:n]
    return [files[j] for j in sorted(pick.tolist())]


def calibration_images(data_path, n, img_size, seed=0, verbose=True):
    """Float tensor [n', 3, S, S] (RGB 0..1) of calibration images, letterboxed to S = img_size as in
    evaluation (no augmentation): see calibration_files; n' = min(n, size of the train split)."""
    data = parse_data_cfg(data_path)
    files = calibration_files(data_path, n, seed)
    dataset = LoadImagesAndLabels(files, img_size, augment=False, nc=data['classes'])
    images = torch.stack([dataset[j][0] for j in range(len(dataset))])
    if verbose:
        total = len(list_images(data['train']))
        print(f"calibration: {len(files)} of {total} train images ({data['train']}) at {dataset.img_size}")
    return images


def _batches(images, batch, device):
    """Consecutive float slices [b, 3, H, W] of `images` (a tensor, or a list of such batches) on `device`; uint8
    images (0..255, a quarter of the memory) are scaled to 0..1 one batch at a time."""
    chunks = images if isinstance(images, (list, tuple)) else images.split(batch)
    for x in chunks:
        x = x.to(device)
        yield x.float() / 255 if x.dtype == torch.uint8 else x


def count_images(images):
    """How many images a tensor [N, 3, H, W] or a list of such batches holds."""
    return sum(len(x) for x in images) if isinstance(images, (list, tuple)) else len(images)


def _device(model):
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device('cpu')


@contextlib.contextmanager
def _eval_mode(*nets):
    """Nets in eval mode for the block; every module's own mode restored after."""
    modes = [(m, m.training) for net in nets for m in net.modules()]
    for net in nets:
        net.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


# --- step 1: mean activations -----------------------------------------------------------------------------------

def _check_convs(model, layers):
    for i in layers:
        t = model.module_defs[i]['type'] if 0 <= i < len(model.module_defs) else None
        if t != 'convolutional':
            raise DarkslimError(f"layer {i}: a [{t}] layer; expected a [convolutional] layer index")


def mean_activations(model, layers, images, batch=8):
    """{conv layer: float tensor [filters]}: each channel's mean output (after BN and activation) over all
    images and positions, accumulated in float64, on the CPU."""
    layers = sorted(set(layers))
    _check_convs(model, layers)
    sums, counts = {}, {i: 0 for i in layers}

    def hook(i):
        def record(module, inputs, out):            # out [B, C, H, W]
            s = out.detach().double().sum((0, 2, 3))
            sums[i] = s if i not in sums else sums[i] + s
            counts[i] += out.shape[0] * out.shape[2] * out.shape[3]
        return record

    handles = [model.module_list[i].register_forward_hook(hook(i)) for i in layers]
    try:
        with _eval_mode(model), torch.no_grad():
            for x in _batches(images, batch, _device(model)):
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {i: (sums[i] / counts[i]).float().cpu() for i in layers}


# --- step 2: least-squares refit of consumers -------------------------------------------------------------------

@dataclass
class RefitRow:
    """One refit consumer conv.

    features: kept inputs x kh x kw + 1 (the offset); rows: sampled output positions over all images;
    gram_mb: memory of one float64 Gram matrix; ridge: the chosen strength (relative to the mean feature
    variance; the median over channels when chosen per channel; None when every channel kept the folded
    weights); fold_channels: output channels that kept the folded weights (no refit beat them); err_*: mean
    over output channels of squared error / variance of the original output
    (1 - R^2): before = the folded weights, after = the refit, both on all rows; heldout = the refit from
    the other images, on the held-out ones (None without held-out images)."""
    layer: int
    kernel: str
    outputs: int
    features: int
    rows: int
    gram_mb: float
    ridge: float
    fold_channels: int
    err_before: float
    err_after: float
    err_heldout: float
    seconds: float


@dataclass
class _Sums:
    """Least-squares sufficient statistics over rows: G = A^T A [F, F], B = A^T Y [F, O], yy = sum Y^2 [O]."""
    G: torch.Tensor
    B: torch.Tensor
    yy: torch.Tensor
    n: int = 0

    @classmethod
    def zeros(cls, features, outputs, device):
        z = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(features, features, **z), torch.zeros(features, outputs, **z),
                   torch.zeros(outputs, **z))

    def add(self, a, y):                            # a [R, F], y [R, O] float64
        self.G += a.T @ a
        self.B += a.T @ y
        self.yy += (y * y).sum(0)
        self.n += len(a)

    def __add__(self, other):
        return _Sums(self.G + other.G, self.B + other.B, self.yy + other.yy, self.n + other.n)

    def errors(self, w):
        """Per output channel: sum of squared error of A @ w [F, O] / centred sum of squares of Y."""
        sse = self.yy - 2 * (w * self.B).sum(0) + (w * (self.G @ w)).sum(0)
        ss = self.yy - self.B[-1] ** 2 / max(self.n, 1)          # the last feature is the constant 1
        return sse.clamp_min(0) / ss.clamp_min(1e-12 * float(self.yy.max()) + 1e-30)


def ridge_solve(G, B, ridge, prior=None):
    """argmin_W ||A W - Y||^2 + lam ||W[:-1] - prior[:-1]||^2 from G = A^T A, B = A^T Y: least squares shrunk
    towards `prior` [F, O] (None: towards 0).  The last column of A is the constant 1; its row of W (the
    offset) is not penalized.  lam = ridge x rows x the mean variance of the other features, so `ridge` is
    independent of scale and row count.  None when the system is numerically singular."""
    n = G[-1, -1]
    s = G[:-1, -1]
    var_sum = (torch.diagonal(G)[:-1] - s * s / n).mean()         # mean centred diagonal = rows x variance
    lam = ridge * float(var_sum.clamp_min(1e-30))
    M = G.clone()
    idx = torch.arange(len(G) - 1, device=G.device)
    M[idx, idx] += lam
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        return None
    rhs = B if prior is None else torch.cat([B[:-1] + lam * prior[:-1], B[-1:]])
    return torch.cholesky_solve(rhs, L)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (everything needed has been captured)."""


def _positions(seed, layer, image, total, count, device):
    """`count` distinct random output positions (flat indices < total), the same for a layer and an image in
    every pass (its own seeded generator)."""
    if count >= total:
        return torch.arange(total, device=device)
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + image)
    return torch.randperm(total, generator=g)[:count].sort().values.to(device)


@dataclass
class _Consumer:
    """A conv whose input lost channels: masks and sampling of its refit."""
    layer: int
    keep_in: torch.Tensor
    keep_out: torch.Tensor
    features: int
    per_image: int = 0                              # sampled positions per image
    rows: dict = field(default_factory=dict)        # image -> positions (flat output indices)


def _consumers(original, compact, plan):
    """_Consumer per conv that reads removed channels, in forward order."""
    flow = channel_flow(original, plan.keep)
    out = []
    for i in channels.convs(original.module_defs):
        if i == 0 or bool(flow[i - 1][0].all()):
            continue
        conv = compact.module_list[i][0]
        if conv.groups != 1:
            raise DarkslimError(f"layer {i}: a grouped [convolutional] reads removed channels; expected a plan "
                                "from prune_utils.make_plan (layer sets never thin the inputs of grouped convs)")
        k_in, k_out = flow[i - 1][0], flow[i][0]
        if conv.in_channels != int(k_in.sum()) or conv.out_channels != int(k_out.sum()):
            raise DarkslimError(f"layer {i}: compact conv has {conv.in_channels} -> {conv.out_channels} "
                                f"channels; the plan keeps {int(k_in.sum())} -> {int(k_out.sum())}; expected "
                                "the compact model of this plan")
        out.append(_Consumer(i, k_in, k_out, conv.in_channels * math.prod(conv.kernel_size) + 1))
    return out


def _output_sizes(model, layers, image):
    """{conv layer: H x W of its output} from one forward pass of one image."""
    sizes = {}
    hooks = [model.module_list[i].register_forward_hook(
        lambda m, inp, out, i=i: sizes.__setitem__(i, out.shape[2] * out.shape[3])) for i in layers]
    try:
        with _eval_mode(model), torch.no_grad():
            model(image)
    finally:
        for h in hooks:
            h.remove()
    return sizes


@dataclass
class RefitOptions:
    """How refit_consumers samples and solves.

    rows: per consumer, rows_per_feature x its features sampled output positions, at least min_rows and as
    many as a Gram matrix of gram_macs multiply-adds takes (more rows for convs with few features, where
    they are cheap), at most max_rows and never more than the images have; spread evenly over the images,
    each image's at seeded random positions.  holdout: share of the images whose error picks the ridge
    strength from ridge_grid (per output channel with per_channel), shrinking towards the folded weights
    (shrink_to='fold') or towards 0 ('zero'); the final fit uses all images.  target_mb: memory for the
    original model's sampled outputs kept at once (consumers are processed in groups that fit)."""
    batch: int = 8
    rows_per_feature: int = 16
    min_rows: int = 4096
    max_rows: int = 262144
    gram_macs: float = 2e10
    holdout: float = 0.2
    ridge_grid: tuple = RIDGE_GRID
    shrink_to: str = 'fold'
    per_channel: bool = True
    target_mb: float = 1024
    seed: int = 0


def _plan_rows(consumers, sizes, n_images, opt):
    """Set each consumer's positions per image from its output size and the options."""
    for c in consumers:
        cheap = opt.gram_macs / c.features ** 2     # rows whose Gram update costs gram_macs multiply-adds
        want = min(max(opt.rows_per_feature * c.features, opt.min_rows, cheap), opt.max_rows)
        c.per_image = max(1, min(sizes[c.layer], math.ceil(want / n_images)))


def _groups(consumers, n_images, budget_mb):
    """Consecutive consumers whose sampled original outputs (float32) fit in budget_mb together."""
    groups, cur, used = [], [], 0.0
    for c in consumers:
        mb = c.per_image * n_images * int(c.keep_out.sum()) * 4 / 2 ** 20
        if cur and used + mb > budget_mb:
            groups.append(cur)
            cur, used = [], 0.0
        cur.append(c)
        used += mb
    return groups + [cur] if cur else groups


def _original_targets(original, group, images, opt):
    """{layer: {image: (positions [P], Y rows [P, kept outputs] float32)}}: the original model's raw conv
    outputs (before BN) at each consumer's sampled positions, from one (early-stopped) pass."""
    targets = {c.layer: {} for c in group}
    dev = _device(original)
    start = [0]

    def hook(c, last):
        def record(module, inputs, out):            # out [B, O, H, W]
            y = out.detach()[:, c.keep_out.to(dev)].flatten(2)          # [B, O', H*W]
            for b in range(len(y)):
                img = start[0] + b
                pos = _positions(opt.seed, c.layer, img, y.shape[2], c.per_image, dev)
                targets[c.layer][img] = (pos, y[b][:, pos].T.float())
            if last:
                raise _Stop
        return record

    hooks = [original.module_list[c.layer][0].register_forward_hook(hook(c, c is group[-1])) for c in group]
    try:
        with _eval_mode(original), torch.no_grad():
            for x in _batches(images, opt.batch, dev):
                with contextlib.suppress(_Stop):
                    original(x)
                start[0] += len(x)
    finally:
        for h in hooks:
            h.remove()
    return targets


def _patches(x, conv, pos):
    """Rows [P, C*kh*kw + 1] float64: the conv's input patches (im2col with its padding, stride, dilation) at
    flat output positions `pos` of one image x [1, C, H, W], then a constant 1 for the offset."""
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)[0]   # [C*kh*kw, L]
    a = cols[:, pos].T.double()
    return torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype, device=a.device)], 1)


def _compact_inputs(compact, layer, images, batch):
    """Batches [B, C_kept, H, W] of the compact model's input to conv `layer` (each forward stopped there)."""
    captured = []

    def grab(module, inputs):
        captured.append(inputs[0].detach())
        raise _Stop

    handle = compact.module_list[layer].register_forward_pre_hook(grab)
    try:
        with _eval_mode(compact), torch.no_grad():
            for x in _batches(images, batch, _device(compact)):
                with contextlib.suppress(_Stop):
                    compact(x)
                yield captured.pop()
    finally:
        handle.remove()


def _accumulate(compact, c, targets, images, hold, opt):
    """(_Sums over the fitting images, _Sums over the held-out ones) for consumer c: rows A from the compact
    model's input to c, Y from the original's `targets`."""
    conv = compact.module_list[c.layer][0]
    dev = _device(compact)
    fit, held = (_Sums.zeros(c.features, conv.out_channels, dev) for _ in range(2))
    img = 0
    for xin in _compact_inputs(compact, c.layer, images, opt.batch):
        parts = {True: [], False: []}               # held out? -> [(A rows, Y rows)]
        for j in range(len(xin)):
            pos, y = targets[img]
            parts[img in hold].append((_patches(xin[j:j + 1], conv, pos), y))
            img += 1
        for sums, rows in ((fit, parts[False]), (held, parts[True])):
            if rows:
                sums.add(torch.cat([a for a, _ in rows]), torch.cat([y for _, y in rows]).double())
    return fit, held


def _current_solution(original, compact, c):
    """The compact conv's present weights as a least-squares solution [F, O]: weights, then the offset its BN
    running mean (or bias) adds relative to the original's (what the fold put there)."""
    m, ref = compact.module_list[c.layer], original.module_list[c.layer]
    w = m[0].weight.detach().reshape(m[0].out_channels, -1).T.double()
    if isinstance(m[1], nn.BatchNorm2d):
        off = ref[1].running_mean.detach()[c.keep_out.to(w.device)].double() - m[1].running_mean.double()
    else:
        off = m[0].bias.detach().double()
    return torch.cat([w, off[None]], 0)


def _write_solution(original, compact, c, w):
    """Conv weights <- w[:-1]; the offset w[-1] into the BN running mean (original's minus it) or the bias."""
    m, ref = compact.module_list[c.layer], original.module_list[c.layer]
    with torch.no_grad():
        m[0].weight.copy_(w[:-1].T.reshape(m[0].weight.shape).to(m[0].weight.dtype))
        if isinstance(m[1], nn.BatchNorm2d):
            rm = ref[1].running_mean.detach()[c.keep_out.to(w.device)].double()
            m[1].running_mean.copy_((rm - w[-1]).to(m[1].running_mean.dtype))
        else:
            m[0].bias.copy_(w[-1].to(m[0].bias.dtype))


def _choose_ridge(fit, held, w_fold, opt):
    """Per output channel, the ridge strength (None = the folded weights) with the least error on the held-out
    images when fit on the others: a list [O] (one strength for all channels unless opt.per_channel), and the
    mean held-out error of that choice."""
    prior = w_fold if opt.shrink_to == 'fold' else None
    ridges, errs = [None], [held.errors(w_fold)]
    for r in opt.ridge_grid:
        w = ridge_solve(fit.G, fit.B, r, prior)
        if w is not None:
            ridges.append(r)
            errs.append(held.errors(w))
    errs = torch.stack(errs)                        # [strengths, O]
    if opt.per_channel:
        pick = errs.argmin(0)
    else:
        pick = torch.full((errs.shape[1],), int(errs.mean(1).argmin()), dtype=torch.long, device=errs.device)
    return [ridges[k] for k in pick.tolist()], float(errs.gather(0, pick[None]).mean())


def _final_solution(total, w_fold, choice, opt):
    """Weights [F, O] fit on all images with each channel's chosen strength (the fold where it is None or the
    system is singular)."""
    w = w_fold.clone()
    prior = w_fold if opt.shrink_to == 'fold' else None
    for r in sorted({r for r in choice if r is not None}):
        cols = torch.tensor([j for j, x in enumerate(choice) if x == r], device=w.device)
        sol = ridge_solve(total.G, total.B, r, prior)
        if sol is not None:
            w[:, cols] = sol[:, cols]
    return w


def _refit_one(original, compact, c, targets, images, hold, opt):
    """Refit consumer c in place; its RefitRow."""
    t0 = time.perf_counter()
    fit, held = _accumulate(compact, c, targets, images, hold, opt)
    total = fit + held
    w_fold = _current_solution(original, compact, c)
    if held.n:
        choice, e_held = _choose_ridge(fit, held, w_fold, opt)
    else:                                           # no held-out images: the middle of the grid
        choice, e_held = [opt.ridge_grid[len(opt.ridge_grid) // 2]] * w_fold.shape[1], None
    w = _final_solution(total, w_fold, choice, opt)
    _write_solution(original, compact, c, w)
    conv = compact.module_list[c.layer][0]
    chosen = [r for r in choice if r is not None]
    return RefitRow(c.layer, 'x'.join(map(str, conv.kernel_size)), conv.out_channels, c.features, total.n,
                    c.features ** 2 * 8 / 2 ** 20, float(np.median(chosen)) if chosen else None,
                    len(choice) - len(chosen), float(total.errors(w_fold).mean()), float(total.errors(w).mean()),
                    e_held, time.perf_counter() - t0)


def _format_row(r):
    held = '' if r.err_heldout is None else f" (held-out {r.err_heldout:.4f})"
    ridge = 'kept the fold' if r.ridge is None else f"ridge {r.ridge:g}" + (
        f" ({r.fold_channels} of {r.outputs} channels kept the fold)" if r.fold_channels else '')
    return (f"refit layer {r.layer} {r.kernel}: {r.features} features, {r.rows} rows, Gram {r.gram_mb:.1f} MB, "
            f"{ridge}, error {r.err_before:.4f} -> {r.err_after:.4f}{held}, {r.seconds:.1f} s")


def refit_consumers(original, compact, plan, images, options=None, verbose=True):
    """Refit, in place and in forward order, every conv of `compact` whose input lost channels under `plan`:
    weights on the kept inputs plus an offset (into its BN running mean, or its bias) minimizing
    ||Y - W' X_kept - b'||^2 over sampled output positions, Y = its raw output (before BN) in `original`,
    X_kept = its input patches in `compact` as refit so far.  Ridge least squares in float64 from accumulated
    Gram matrices, shrunk towards the folded weights; the ridge strength is chosen per output channel on
    held-out images (RefitOptions).  An output channel whose refit does not beat its folded weights on the
    held-out images keeps them.  Returns a RefitRow per refit conv."""
    opt = options or RefitOptions()
    if opt.shrink_to not in ('fold', 'zero'):
        raise DarkslimError(f"refit shrink_to {opt.shrink_to!r}; expected 'fold' or 'zero'")
    if not 0 <= opt.holdout < 1:
        raise DarkslimError(f"refit holdout {opt.holdout}; expected a share in [0, 1)")
    consumers = _consumers(original, compact, plan)
    n = count_images(images)
    if not consumers or n == 0:
        return []
    n_hold = min(n - 1, max(1, round(opt.holdout * n))) if opt.holdout > 0 and n > 1 else 0
    hold = set(torch.randperm(n, generator=torch.Generator().manual_seed(opt.seed))[:n_hold].tolist())
    first = next(_batches(images, 1, _device(original)))[:1]
    _plan_rows(consumers, _output_sizes(original, [c.layer for c in consumers], first), n, opt)
    rows = []
    for group in _groups(consumers, n, opt.target_mb):
        targets = _original_targets(original, group, images, opt)
        for c in group:
            rows.append(_refit_one(original, compact, c, targets.pop(c.layer), images, hold, opt))
            if verbose:
                print(_format_row(rows[-1]))
    return rows


# --- step 3: BatchNorm recalibration ----------------------------------------------------------------------------

def affected_layers(model, plan):
    """Conv layers whose input the prune changes: the consumers of removed channels and every conv after them
    in the graph (through route/shortcut/maxpool/upsample); the others see exactly the original inputs."""
    return channels.changed_layers(model, plan.keep)


def recalibrate_bn(model, images, batch=8, layers=None):
    """Re-estimate the BatchNorm running mean and (biased) variance of conv `layers` (None: every BN) on
    `images`, in place.

    One pass with those BatchNorms in train mode (each normalizes by its batch's statistics, as in training;
    nothing else changes mode, no gradients); each BN's input moments are accumulated exactly over all
    images and positions (per-batch moments combined in float64), so with a single batch the result is the
    images' exact statistics.  Modes, momentum and num_batches_tracked are restored after."""
    if layers is None:
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    else:
        _check_convs(model, layers)
        bns = [model.module_list[i][1] for i in sorted(set(layers))
               if isinstance(model.module_list[i][1], nn.BatchNorm2d)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    moments = {}                                     # bn -> (count, mean [C], M2 [C]) float64

    def hook(module, inputs):
        x = inputs[0].detach()                       # [B, C, H, W]
        k = x.numel() // x.shape[1]
        mean = x.mean((0, 2, 3)).double()
        m2 = x.var((0, 2, 3), unbiased=False).double() * k
        if module in moments:                        # Chan et al.: combine two sets' moments
            n0, mean0, m20 = moments[module]
            d = mean - mean0
            mean, m2, k = mean0 + d * k / (n0 + k), m20 + m2 + d * d * n0 * k / (n0 + k), n0 + k
        moments[module] = (k, mean, m2)

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    try:
        with _eval_mode(model), torch.no_grad():
            for m in bns:
                m.train()
                m.momentum = None
            for x in _batches(images, batch, _device(model)):
                model(x)
    finally:
        for h in handles:
            h.remove()
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
    with torch.no_grad():
        for m, (k, mean, m2) in moments.items():
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_((m2 / k).to(m.running_var.dtype))
    return model


# --- all steps --------------------------------------------------------------------------------------------------

@dataclass
class CalibrationReport:
    """What calibrated_compact did: steps run, images used, seconds per step, the refit's rows, and (with
    keep_stages) the model after each step but the last: {step: model}."""
    steps: tuple
    images: int
    seconds: dict = field(default_factory=dict)
    refit: list = field(default_factory=list)
    stages: dict = field(default_factory=dict)


def calibrated_compact(model, plan, images, steps=DEFAULT_STEPS, batch=8, refit=None, bn_layers='affected',
                       verbose=True, keep_stages=False):
    """(compact model, CalibrationReport): prune_utils' compact model of `plan` with the chosen calibration
    `steps` (any of 'mean', 'refit', 'bn', run in that order; () = the plain beta fold) on `images`
    [N, 3, S, S] (or a list of batches), on `model`'s device.  `refit`: RefitOptions.  bn_layers: 'affected'
    (the BNs of affected_layers; the others keep the statistics they were trained with) or 'all'.  `model`
    is unchanged. `keep_stages`: a copy of the model after each step but the last in `report.stages`."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise DarkslimError(f"{{calib_steps}} {list(steps)}: unknown {unknown}; expected any of {list(STEPS)}",
                            param='calib_steps')
    if bn_layers not in ('affected', 'all'):
        raise DarkslimError(f"bn_layers {bn_layers!r}; expected 'affected' or 'all'")
    report = CalibrationReport(tuple(s for s in STEPS if s in steps), count_images(images))
    dev = _device(model)
    t0 = time.perf_counter()
    constants = mean_activations(model, sorted(plan.keep), images, batch) if 'mean' in steps else None
    cpu = model if dev.type == 'cpu' else copy.deepcopy(model).cpu()      # the surgery runs on the CPU
    compact = compact_model(cpu, plan, loose_model(cpu, plan, constants)).to(dev)
    report.seconds['mean' if 'mean' in steps else 'fold'] = time.perf_counter() - t0

    def snapshot(step):
        if keep_stages and step != report.steps[-1]:
            report.stages[step] = copy.deepcopy(compact)
    if 'mean' in steps:
        snapshot('mean')
    if 'refit' in steps:
        t0 = time.perf_counter()
        report.refit = refit_consumers(model, compact, plan, images, refit or RefitOptions(batch=batch), verbose)
        report.seconds['refit'] = time.perf_counter() - t0
        snapshot('refit')
    if 'bn' in steps:
        t0 = time.perf_counter()
        recalibrate_bn(compact, images, batch, affected_layers(model, plan) if bn_layers == 'affected' else None)
        report.seconds['bn'] = time.perf_counter() - t0
    return compact, report
