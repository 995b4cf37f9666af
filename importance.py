"""Channel importance: the scores a prune ranks channels by (the lowest go first).

An importance is a function `(model, layers, images=None) -> {conv layer: per-channel scores}` (float64
numpy, one score per output channel; `layers` a list of conv indices or a LayerSet, whose `prunable` are
scored). `images` [N, 3, H, W] are calibration images for criteria that measure activations; criteria that
need none ignore them. Register a new one in IMPORTANCES with a label for tables and whether it needs images:

    gamma  |gamma| of the BN (network slimming; right after sparse training)
    l1     the L1 norm of each filter (Li et al. 2017); greedy: without inputs removed upstream
    act    the mean |activation| on calibration images
    fold   the output error the channel's removal leaves after the mean fold (FLAP-style), on calibration images


    scores = IMPORTANCES['gamma'].fn(model, layer_set)          # {layer: |gamma| per channel}
    plan = prune_utils.make_plan(model, layer_set, 'shortcut', percent=0.5, importance='gamma')

Scores of different layers are compared by one global threshold, so a criterion should put them on one scale.
"""
from dataclasses import dataclass

import numpy as np
import torch

import channels
from utils.errors import DarkslimError


@dataclass(frozen=True)
class Importance:
    """A registered criterion: `name` (the --importance value), `label` (for tables: what the score is),
    `fn` (see the module docstring), `needs_images` (whether it measures activations on images), `normalize`
    (how its scores are put on one scale across layers before the global threshold: 'none', or 'mean' /
    'max': each layer's scores divided by that layer's mean / max), `upstream` (fn takes `keep=`, a plan's
    masks, and then leaves out input channels removed upstream: the greedy variant)."""
    name: str
    label: str
    fn: object
    needs_images: bool = False
    normalize: str = 'none'
    upstream: bool = False

    def scores(self, model, layers, images=None, keep=None, normalize=None):
        """{layer: scores} (float64), normalized per `normalize` (default: the criterion's own)."""
        if self.needs_images and images is None:
            raise DarkslimError(f"{{importance}} {self.name} measures activations: expected calibration images "
                                "({calib} N)", param='importance')
        raw = self.fn(model, layers, images, keep=keep) if keep is not None else self.fn(model, layers, images)
        return normalized(raw, self.normalize if normalize is None else normalize)


NORMALIZERS = ('none', 'mean', 'max')


def normalized(scores, how):
    """Each layer's scores divided by their mean or max ('none': unchanged); a layer of zeros stays zeros."""
    if how not in NORMALIZERS:
        raise DarkslimError(f"{{normalize}} {how!r}; expected one of {', '.join(NORMALIZERS)}", param='normalize')
    if how == 'none':
        return scores
    f = np.mean if how == 'mean' else np.max
    return {i: s / f(s) if f(s) > 0 else s for i, s in scores.items()}


def _layers(layers):
    return list(getattr(layers, 'prunable', layers))


def gamma(model, layers, images=None):
    """|gamma| of each channel's BatchNorm: after sparse training (L1 on gamma) a channel with gamma ~ 0 outputs
    a constant, so the smallest go first (network slimming, Liu et al. 2017)."""
    return {i: model.module_list[i][1].weight.detach().abs().double().cpu().numpy() for i in _layers(layers)}


def l1(model, layers, images=None, keep=None):
    """The L1 norm of each filter (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): the sum of |w| over
    its input channels and taps. With `keep` (a plan's {conv: kept output channels}), the greedy multi-layer
    variant: a filter's norm leaves out the input channels already removed upstream."""
    flow = channels.channel_flow(model, keep) if keep is not None else None
    out = {}
    for i in _layers(layers):
        w = model.module_list[i][0].weight.detach().abs().double().cpu()      # [out, in / groups, kh, kw]
        if flow is not None and i > 0 and model.module_list[i][0].groups == 1:
            w = w[:, flow[i - 1][0]]
        out[i] = w.sum((1, 2, 3)).numpy()
    return out


def _forward(model, images, batch=8):
    """Run `images` [N, 3, H, W] through the model in eval mode without gradients (hooks record); mode restored."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(images), batch):
                model(images[s:s + batch].to(next(model.parameters()).device))
    finally:
        model.train(was)


def _channel_means(model, layers, images, fns, inputs=False, batch=8):
    """{layer: [mean over images and positions of f(x) per channel, for f in fns]} (float64 numpy), x being the
    layer's output (after BN and activation), or its input with `inputs`."""
    sums = {i: [0.0] * len(fns) + [0] for i in layers}

    def hook(i):
        def record(module, *args):                             # x [B, C, H, W]
            x = (args[0][0] if inputs else args[1]).detach().double()
            s = sums[i]
            for j, f in enumerate(fns):
                s[j] = s[j] + f(x).sum((0, 2, 3))
            s[-1] += x.shape[0] * x.shape[2] * x.shape[3]
        return record

    register = 'register_forward_pre_hook' if inputs else 'register_forward_hook'
    handles = [getattr(model.module_list[i], register)(hook(i)) for i in layers]
    try:
        _forward(model, images, batch)
    finally:
        for h in handles:
            h.remove()
    return {i: [(t / s[-1]).cpu().numpy() for t in s[:-1]] for i, s in sums.items()}


def _output_stats(model, layers, images):
    """{layer: (mean |a| [C], mean a [C])} of the layers' outputs over the images and positions."""
    return _channel_means(model, layers, images, (torch.abs, lambda a: a))


def _output_means(model, layers, images):
    return {i: s[1] for i, s in _output_stats(model, layers, images).items()}


def act(model, layers, images=None):
    """The mean absolute activation of each channel (after BN and activation) on the calibration images: a
    channel that stays near 0 contributes little (Network Trimming, Hu et al. 2016)."""
    ls = _layers(layers)
    return {i: s[0] for i, s in _output_stats(model, ls, images).items()}


def _consumer_weights(model, graph, node):
    """[(consumer conv, input channel index of node's channel 0.., post-BN squared weight norm per input channel)]:
    every conv reading node's channels (through pass-through layers, routes and slices), with
    sum over outputs o and taps of (W[o, c] * g_o)^2, g_o = gamma_o / sqrt(var_o + eps) (1 without BN)."""
    out = []
    for k in channels.convs(graph.defs):
        segs = graph.segs[k - 1] if k > 0 else graph.image(graph.in_channels)
        pos, idx = 0, {}
        for n, s, m in segs:
            if n == node:
                idx.update({s + j: pos + j for j in range(m)})
            pos += m
        if not idx or model.module_list[k][0].groups != 1:
            continue
        m = model.module_list[k]
        w = m[0].weight.detach().double().cpu()                   # [out, in, kh, kw]
        if graph.defs[k].get('batch_normalize', 0):
            g = m[1].weight.detach().double().cpu() / (m[1].running_var.detach().double().cpu() + m[1].eps).sqrt()
            w = w * g.view(-1, 1, 1, 1)
        out.append((k, idx, (w * w).sum((0, 2, 3))))
    return out


def _input_moments(model, layers, images):
    """{conv: (mean x [C_in], mean x^2 [C_in])} of each conv's input over the images and positions."""
    return _channel_means(model, layers, images, (lambda x: x, lambda x: x * x), inputs=True)


def fold(model, layers, images=None):
    """The output error a channel's removal leaves after the mean fold, measured on the calibration images: the
    channel is replaced by its mean mu (over images and positions), so each consumer conv k reads, at the input
    position p holding it (through routes, maxpool, upsample), x_p - mu too much; its output after BN scaling
    errs by W_k[:, p] * g * (x_p - mu), of energy E[(x_p - mu)^2] * ||W_k[:, p] * g||^2 summed over outputs and
    taps (g = gamma / sqrt(var + eps), 1 without BN; FLAP, An et al. 2024). Summed over the consumers; exact
    for 1x1 consumers. Channels coupled by a [shortcut] group share one score: the sum over the group's members
    and the shortcuts' outputs they feed (all of them lose the channel together)."""
    graph = channels.Graph(model.module_defs, model.in_channels)
    groups = {i: _group_nodes(graph, layers, i) for i in _layers(layers)}
    own = fold_own(model, sorted({n for g in groups.values() for n in g}), images, graph)
    return {i: sum(_fit(own[n], len(own[i])) for n in g) for i, g in groups.items()}


def fold_own(model, nodes, images, graph=None):
    """{node: per-channel error}: the part of `fold` due to the convs reading each node (a conv or a
    [shortcut]) directly or through pass-through layers and routes."""
    graph = graph or channels.Graph(model.module_defs, model.in_channels)
    mu = _output_means(model, nodes, images)
    readers = {n: _consumer_weights(model, graph, n) for n in nodes}
    moments = _input_moments(model, sorted({k for r in readers.values() for k, _, _ in r}), images)
    own = {}
    for n in nodes:
        score = np.zeros(graph.channels[n])
        for k, idx, w2 in readers[n]:
            ex, ex2 = moments[k]
            for c, p in idx.items():
                score[c] += (ex2[p] - 2 * mu[n][c] * ex[p] + mu[n][c] ** 2) * float(w2[p])
        own[n] = score
    return own


def _fit(v, n):
    """v cut or zero-padded to length n (a [shortcut] of unequal widths couples only the overlap)."""
    return v[:n] if len(v) >= n else np.pad(v, (0, n - len(v)))


def _group_nodes(graph, layer_set, i):
    """Conv i and, when a [shortcut] group couples it, the group's other convs and the shortcuts they feed."""
    groups = getattr(layer_set, 'groups', [])
    group = next((g for g in groups if i in g), [i])
    sums = [s for s in channels.layers_of_kind(graph.defs, 'sum') if set(graph.nodes_read_by(s)) & set(group)]
    return sorted(set(group) | set(sums))


IMPORTANCES = {
    'gamma': Importance('gamma', '|gamma|', gamma),
    'l1': Importance('l1', 'filter L1 norm / layer mean', l1, normalize='mean', upstream=True),
    'act': Importance('act', 'mean |activation| / layer mean', act, needs_images=True, normalize='mean'),
    'fold': Importance('fold', 'output error of the mean fold', fold, needs_images=True),
}


def get_importance(importance):
    """An Importance from its name (or one given as is)."""
    if isinstance(importance, Importance):
        return importance
    if importance not in IMPORTANCES:
        raise DarkslimError(f"{{importance}} {importance!r}; expected one of {', '.join(IMPORTANCES)}",
                            param='importance')
    return IMPORTANCES[importance]
