"""Sparsity training for network slimming (Liu et al. 2017): an L1 penalty s * sum|gamma| on BatchNorm scales.

The layer set is prune_utils.get_layer_set(model.module_defs, mode): exactly the BN layers a later prune in that
mode may thin are regularized, nothing else (one source of truth for train.py -sr and the prune scripts).

    sr = BNSparsity(model, layer_set, s)   # prints the covered and excluded layers once
    loss.backward(); sr.step(); optimizer.step()

`step()` adds the subgradient s * sign(gamma) to gamma.grad once per optimizer step (with gradient accumulation
call it once, after the last backward before the step; under AMP after `scaler.unscale_`). Under DDP call it on
the wrapped model after backward: the gradients are already all-reduced and gamma is identical on every rank,
so every rank adds the same term.
"""
import numpy as np
import torch

from utils.torch_utils import de_parallel

SMALL_GAMMA = 0.01  # |gamma| below this counts as "near zero" in sparsity_stats
PERCENTILES = (1, 10, 50, 90, 99)


def bn_modules(model, layers):
    """{conv layer index: its BatchNorm2d} for `layers` of a Darknet (DDP wrapper allowed)."""
    m = de_parallel(model)
    out = {}
    for i in layers:
        seq = m.module_list[i]
        if m.module_defs[i]['type'] != 'convolutional' or not isinstance(seq[1], torch.nn.BatchNorm2d):
            raise ValueError(f"layer {i} is not a [convolutional] with batch_normalize")
        out[i] = seq[1]
    return out


class BNSparsity:
    """L1 sparsity on the BN gammas of `layer_set.prunable` (see the module docstring)."""

    def __init__(self, model, layer_set, s, verbose=True):
        if s < 0:
            raise ValueError(f"sparsity rate s={s}; expected >= 0")
        self.s = float(s)
        self.layers = sorted(layer_set.prunable)
        self.excluded = dict(layer_set.excluded)
        self.bns = bn_modules(model, self.layers)
        if verbose:
            print(self.describe())

    def describe(self):
        n_ch = sum(bn.num_features for bn in self.bns.values())
        lines = [f"sparsity (-sr, s={self.s:g}): {len(self.layers)} BN layers regularized ({n_ch} channels): "
                 + (', '.join(map(str, self.layers)) or 'none'),
                 f"sparsity: {len(self.excluded)} BN layers excluded:"]
        lines += [f"  {i}: {why}" for i, why in sorted(self.excluded.items())]
        return '\n'.join(lines)

    @torch.no_grad()
    def step(self):
        """gamma.grad += s * sign(gamma) for every regularized BN (gamma.grad created if absent)."""
        for bn in self.bns.values():
            g = torch.sign(bn.weight) * self.s
            if bn.weight.grad is None:
                bn.weight.grad = g
            else:
                bn.weight.grad.add_(g)

    @torch.no_grad()
    def penalty(self):
        """The L1 term's value s * sum|gamma| (for logging; its gradient is what step() adds)."""
        if not self.bns:
            return 0.0
        return self.s * float(sum(bn.weight.abs().sum() for bn in self.bns.values()))


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
