"""Sparsity training for network slimming (Liu et al. 2017): an L1 penalty s * sum|gamma| on BatchNorm scales.

The layer set is prune_utils.get_layer_set(model.module_defs, mode): exactly the BN layers a later prune in that
mode may thin are regularized, nothing else (one source of truth for train.py -sr and the prune scripts).

    sr = BNSparsity(model, layer_set, s)   # prints the covered and excluded layers once
    loss.backward(); sr.step(); optimizer.step()

`step()` adds the subgradient s * sign(gamma) to gamma.grad once per optimizer step (with gradient accumulation
call it once, after the last backward before the step; under AMP after `scaler.unscale_`). Under DDP call it on
the wrapped model after backward: the gradients are already all-reduced and gamma is identical on every rank,
so every rank adds the same term.

Local s decay (tanluren/yolov3-channel-and-layer-pruning's strategy): `sr.local_decay(share, importance)` ranks
the prunable channels over all regularized layers by the scores `importance(model, layers) -> {layer: numpy
scores}` gives (pass the prune's own channel scores so that the ranking is the prune's; default |gamma|) and from
then on only the `share` smallest keep the full rate; the others get LOCAL_DECAY * s. The channels a later prune
will keep stop being pushed toward zero and can take over the work of the ones that still are. Call it again to
re-rank.

A schedule: `scheduled_rate(s, final, epoch, epochs)` decays the rate linearly from s (first epoch) to s * final
(last epoch) (YOLOv8 pruning's L1 start -> end, tanluren's global s decay); `sr.set_rate(rate)` before each epoch.
Combined with local decay, the scheduled rate is the pressed channels' rate and factor * rate the others'.

How long sparsifying takes (`epochs_to_zero`): the optimizer (training.build_optimizer) is PyTorch SGD without
weight decay on the gammas, momentum mu (Nesterov when mu > 0), dampening 0: with b the momentum buffer and g
the gradient, b <- mu * b + g and the step is lr * (g + mu * b) (lr * g when mu = 0). The L1 subgradient alone,
g = s * sign(gamma), is constant while gamma keeps its sign, so b -> s / (1 - mu) and every step moves gamma by
lr * s / (1 - mu) toward 0 (the first steps less: after n steps from an empty buffer the total is
lr * s / (1 - mu) * (n - mu^2 (1 - mu^n) / (1 - mu)), a lag of mu^2 / (1 - mu) ~ 14 steps at mu = 0.937, left
out). A gamma of size g thus needs about g * (1 - mu) / (lr * s) optimizer steps, ceil(batches / accumulate) of
them per epoch. The detection loss's own gradient on gamma is not counted: it holds the useful gammas up, so a
run needs longer for most of them. (Past 0 the subgradient turns and gamma hovers around 0 by about one step.)

Bad values (a negative rate, a share outside (0, 1], a layer without BatchNorm) raise utils.errors.DarkslimError.
"""
import math

import numpy as np
import torch

from utils.errors import DarkslimError
from utils.torch_utils import de_parallel

SMALL_GAMMA = 0.01  # |gamma| below this counts as "near zero" in sparsity_stats
PERCENTILES = (1, 10, 50, 90, 99)
LOCAL_DECAY = 0.01  # rate factor of the channels local s decay spares (tanluren's s - 0.99 s)


def bn_modules(model, layers):
    """{conv layer index: its BatchNorm2d} for `layers` of a Darknet (DDP wrapper allowed)."""
    m = de_parallel(model)
    out = {}
    for i in layers:
        seq = m.module_list[i]
        if m.module_defs[i]['type'] != 'convolutional' or not isinstance(seq[1], torch.nn.BatchNorm2d):
            raise DarkslimError(f"layer {i} is not a [convolutional] with batch_normalize; expected the BN "
                                "layers of a layer set")
        out[i] = seq[1]
    return out


class BNSparsity:
    """L1 sparsity on the BN gammas of `layer_set.prunable` (see the module docstring)."""

    def __init__(self, model, layer_set, s, verbose=True):
        if s < 0:
            raise DarkslimError(f"sparsity rate s={s}; expected >= 0")
        self.model = de_parallel(model)
        self.s = float(s)
        self.layers = sorted(layer_set.prunable)
        self.excluded = dict(layer_set.excluded)
        self.bns = bn_modules(model, self.layers)
        self.pressed = None  # {layer: bool [C], True: full rate} once local_decay() ran; None: s everywhere
        self.factor = LOCAL_DECAY
        if verbose:
            print(self.describe())

    @property
    def channels(self):
        """How many channels are regularized (all layers together)."""
        return sum(bn.num_features for bn in self.bns.values())

    def describe(self):
        lines = [f"sparsity (-sr, s={self.s:g}): {len(self.layers)} BN layers regularized ({self.channels} channels): "
                 + (', '.join(map(str, self.layers)) or 'none'),
                 f"sparsity: {len(self.excluded)} BN layers excluded:"]
        lines += [f"  {i}: {why}" for i, why in sorted(self.excluded.items())]
        return '\n'.join(lines)

    @torch.no_grad()
    def local_decay(self, share, factor=LOCAL_DECAY, importance=None):
        """Keep the full rate on the `share` (0 < share <= 1) lowest-scoring regularized channels, ranked over
        all layers together; give the others factor * s. Returns how many channels keep the full rate.

        importance(model, layers) -> {layer: numpy scores, one per channel}; default |gamma|."""
        if not 0 < share <= 1:
            raise DarkslimError(f"local decay share {share}; expected 0 < share <= 1")
        if not self.bns:
            return 0
        scores = (importance or _abs_gamma)(self.model, self.layers)
        g = np.concatenate([np.asarray(scores[i]).ravel() for i in self.layers])
        cut = np.sort(g)[max(1, round(share * g.size)) - 1]  # the largest score still pressed
        self.pressed = {i: torch.from_numpy(np.asarray(scores[i]) <= cut).to(bn.weight.device)
                        for i, bn in self.bns.items()}
        self.factor = factor
        return int((g <= cut).sum())

    def set_rate(self, s):
        """A new rate s (a schedule's, see scheduled_rate); after local_decay() the pressed channels get s, the
        others factor * s."""
        if s < 0:
            raise DarkslimError(f"sparsity rate s={s}; expected >= 0")
        self.s = float(s)

    @property
    def rates(self):
        """{layer: per-channel rate [C]} once local_decay() ran (s where pressed, factor * s elsewhere); None
        before (s everywhere)."""
        return None if self.pressed is None else {i: self._rate(i) for i in self.pressed}

    def _rate(self, i):
        return self.s if self.pressed is None else torch.where(self.pressed[i], self.s, self.s * self.factor)

    @torch.no_grad()
    def step(self):
        """gamma.grad += rate * sign(gamma) for every regularized BN (gamma.grad created if absent); the rate is
        s, or per channel after local_decay()."""
        for i, bn in self.bns.items():
            g = torch.sign(bn.weight) * self._rate(i)
            if bn.weight.grad is None:
                bn.weight.grad = g
            else:
                bn.weight.grad.add_(g)

    @torch.no_grad()
    def penalty(self):
        """The L1 term's value sum(rate * |gamma|) (for logging; its gradient is what step() adds)."""
        if not self.bns:
            return 0.0
        return float(sum((self._rate(i) * bn.weight.abs()).sum() for i, bn in self.bns.items()))


def _abs_gamma(model, layers):
    """{layer: |gamma| of its BatchNorm (float32 numpy)}: local_decay's default channel scores."""
    return {i: bn.weight.detach().abs().float().cpu().numpy() for i, bn in bn_modules(model, layers).items()}


def prunable_gammas(model, layer_set):
    """|gamma| of every regularized channel, concatenated (float32 CPU numpy)."""
    bns = bn_modules(model, sorted(layer_set.prunable))
    if not bns:
        return np.zeros(0, np.float32)
    return torch.cat([bn.weight.detach().abs().float().cpu() for bn in bns.values()]).numpy()


def sparsity_stats(model, layer_set):
    """{'channels', 'small_share' (share of |gamma| < SMALL_GAMMA), 'mean', 'p1', 'p10', 'p50', 'p90', 'p99'}
    over the prunable layers' |gamma| (percentiles by linear interpolation, numpy's default)."""
    g = prunable_gammas(model, layer_set)
    out = {'channels': int(g.size), 'small_share': float((g < SMALL_GAMMA).mean()) if g.size else 0.0,
           'mean': float(g.mean()) if g.size else 0.0}
    for q in PERCENTILES:
        out[f"p{q}"] = float(np.percentile(g, q)) if g.size else 0.0
    return out


def format_stats(st):
    return (f"|gamma| over {st['channels']} prunable channels: {st['small_share']:.1%} < {SMALL_GAMMA}, "
            f"mean {st['mean']:.4f}, " + ', '.join(f"p{q} {st[f'p{q}']:.4f}" for q in PERCENTILES))


def gamma_histogram_png(model, layer_set, path, title='', bins=60):
    """Histogram of the prunable layers' |gamma| (x from 0 to the largest, red line at SMALL_GAMMA), written
    atomically to `path` (PNG); returns (counts, edges) as numpy arrays."""
    from utils.plots import gamma_histogram
    return gamma_histogram(prunable_gammas(model, layer_set), path, title, SMALL_GAMMA, bins)


def scheduled_rate(s, final, epoch, epochs):
    """The sparsity rate of `epoch` (0-based) of `epochs`: s throughout when `final` is None, else linear from s
    at the first epoch to s * final at the last, s * (1 + (final - 1) * epoch / (epochs - 1)) (s for one epoch)."""
    if final is None or epochs <= 1:
        return float(s)
    return float(s) * (1 + (final - 1) * epoch / (epochs - 1))


def optimizer_steps(batches, accumulate):
    """Optimizer steps in an epoch of `batches` batches, one per `accumulate` batches and one after the last."""
    return math.ceil(batches / accumulate)


def epochs_to_zero(gamma, lr, s, momentum, steps_per_epoch):
    """Epochs the L1 subgradient alone needs to move a BN gamma of size `gamma` to 0 with learning rate `lr`,
    rate `s` and SGD `momentum`, `steps_per_epoch` optimizer steps per epoch:
    gamma * (1 - momentum) / (lr * s) / steps_per_epoch (see the module docstring); inf when nothing moves it."""
    per_step = lr * s / (1 - momentum) if momentum < 1 else 0.0
    if per_step <= 0 or steps_per_epoch <= 0:
        return math.inf
    return abs(gamma) / per_step / steps_per_epoch


def _approx(x):
    """x >= 0 to 3 significant digits, without an exponent (10400, 420, 4.23, 0.0423)."""
    r = float(f"{x:.3g}")
    return f"{r:.0f}" if r >= 100 else f"{r:g}"


def format_needed(gamma, lr, s, momentum, steps_per_epoch, left=None):
    """'median |gamma| 1.65 needs ~10400 epochs to reach 0 at s=0.001, lr=0.01 (momentum 0.937, 1 optimizer
    step/epoch)' (epochs_to_zero), with ', N epochs left' when `left` is given."""
    e = epochs_to_zero(gamma, lr, s, momentum, steps_per_epoch)
    need = 'never reaches 0' if math.isinf(e) else f"needs ~{_approx(e)} epochs to reach 0"
    tail = '' if left is None else f", {left} epochs left"
    return (f"median |gamma| {gamma:.4g} {need} at s={s:g}, lr={lr:.3g} (momentum {momentum:g}, "
            f"{steps_per_epoch} optimizer step/epoch{tail})")
