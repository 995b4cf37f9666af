"""Network slimming for Darknet-cfg models: which layers may lose channels, which channels go, and the surgery.

Three steps with small interfaces, shared by normal_prune.py, regular_prune.py, shortcut_prune.py, tiny_prune.py
(and, for step 1, by `train.py -sr`, which regularizes exactly the BN layers a prune may thin):

1. `get_layer_set(module_defs, mode) -> LayerSet`: derived from the cfg graph alone, never from layer numbers.
2. `make_plan(model, layer_set, ...) -> Plan`: a global |gamma| threshold -> a keep mask per prunable conv.
3. `loose_model(model, plan)` (full size, removed channels zeroed, constants folded) and
   `compact_model(model, plan)` (the smaller network; its cfg is `compact.defs`).
The scripts are `get_args_parser()` (`add_prune_args`) + `main(args)` = `run(args, strategy)`: the three steps,
then the report (params, BFLOPs, .weights size, CPU latency, optional mAP) and the output files.

Channel provenance.  Every layer's output channels are traced back to "nodes": [convolutional] layers (their
BN channels), [shortcut] layers (channel-wise sums), or the image (node -1).  [maxpool], [upsample] and
single-input [route] pass channels through unchanged (aliases); a multi-input [route] concatenates; a
`[route] groups=g` slices.  A [shortcut] ties its inputs' channels to its own one to one, so the convs it
reads (through aliases) must lose the same channels: those convs form one group (union-find over the graph).
"""
import copy
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from terminaltables import AsciiTable

import models
from utils.darknet_weights import save_weights, weights_file_size
from utils.errors import DarkslimError
from utils.io import write_bytes_atomic, write_text_atomic
from utils.parse_config import layer_inputs, write_cfg

MODES = {0: 'normal', 1: 'shortcut', 2: 'tiny', 'normal': 'normal', 'regular': 'normal', 'shortcut': 'shortcut',
         'tiny': 'tiny', '0': 'normal', '1': 'shortcut', '2': 'tiny'}
IMAGE = -1  # the node standing for the network input
ZERO_AT_ZERO = {'leaky', 'relu', 'linear', 'mish', 'swish'}  # act(0) == 0: a zeroed BN channel outputs exactly 0


# --- step 1: layer sets -----------------------------------------------------------------------------------------

@dataclass
class LayerSet:
    """The conv layers a prune may thin, for one mode (plain data).

    mode:     'normal' | 'shortcut' | 'tiny'
    prunable: conv layer indices whose BN channels may be removed (= the BN layers `train.py -sr` regularizes)
    excluded: every other BN conv layer index -> why it is left whole
    groups:   shortcut-coupled prunable convs that share one keep mask (groups of one omitted)
    filters:  conv layer index -> filters, for every BN conv (for printing)
    """
    mode: str
    prunable: list = field(default_factory=list)
    excluded: dict = field(default_factory=dict)
    groups: list = field(default_factory=list)
    filters: dict = field(default_factory=dict)

    def group_of(self, i):
        """Index into `groups` of the group holding conv i, or None."""
        for g, members in enumerate(self.groups):
            if i in members:
                return g
        return None

    def describe(self):
        """A printable per-layer list (every BN conv: prunable, with its group, or excluded with the reason)."""
        rows = [['layer', 'filters', 'status', 'group / reason']]
        for i in sorted(set(self.prunable) | set(self.excluded)):
            if i in self.excluded:
                rows.append([i, self.filters.get(i, ''), 'excluded', self.excluded[i]])
            else:
                g = self.group_of(i)
                rows.append([i, self.filters.get(i, ''), 'prunable', '' if g is None else f"g{g}: {self.groups[g]}"])
        n_ch = sum(self.filters.get(i, 0) for i in self.prunable)
        total = sum(self.filters.values())
        summary = (f"mode {self.mode}: {len(self.prunable)} of {len(self.prunable) + len(self.excluded)} BN convs "
                   f"prunable ({n_ch} of {total} channels), {len(self.excluded)} excluded, "
                   f"{len(self.groups)} shortcut groups")
        return AsciiTable(rows).table + '\n' + summary


class Graph:
    """Channel provenance of every layer: `segs[i]` = [(node, start, length), ...] in channel order."""

    def __init__(self, module_defs, in_channels=3):
        self.defs = list(module_defs)
        self.in_channels = in_channels
        full = [None] + self.defs                     # layer_inputs expects [net] at index 0
        self.inputs = [layer_inputs(full, i) for i in range(len(self.defs))]
        self.channels, self.segs = [], []
        for i, d in enumerate(self.defs):
            t = d['type']
            src = self.segs[i - 1] if i else [(IMAGE, 0, in_channels)]
            if t == 'convolutional':
                segs = [(i, 0, d['filters'])]
            elif t == 'route':
                g, gid = d.get('groups', 1), d.get('group_id', 0)
                segs = []
                for j in self.inputs[i]:
                    c = self.channels[j] // g
                    segs += _slice(self.segs[j], gid * c, c)
            elif t == 'shortcut':
                segs = [(i, 0, self.channels[i - 1])]
            else:                                     # maxpool, upsample, yolo: channels unchanged
                segs = src
            self.segs.append(segs)
            self.channels.append(sum(n for _, _, n in segs))

    def whole_node(self, j):
        """The node layer j's output is (all of it, in order), or None when it is a slice or a concatenation."""
        segs = self.segs[j]
        if len(segs) == 1:
            node, start, n = segs[0]
            if start == 0 and n == self._node_channels(node):
                return node
        return None

    def _node_channels(self, node):
        return self.in_channels if node == IMAGE else self.channels[node]

    def nodes_read_by(self, i):
        """Nodes whose channels layer i reads (through aliases)."""
        return sorted({n for j in self.inputs[i] for n, _, _ in self.segs[j]}) if self.inputs[i] \
            else [IMAGE]


def _slice(segs, start, length):
    """The part [start, start+length) of a segment list."""
    out, pos = [], 0
    for node, s, n in segs:
        a, b = max(start, pos), min(start + length, pos + n)
        if a < b:
            out.append((node, s + a - pos, b - a))
        pos += n
    return out


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _own_exclusions(graph):
    """BN conv -> reason it can never lose channels, whatever the mode (its channels' consumers forbid it)."""
    defs = graph.defs
    reasons = {}

    def add(node, why):
        if node >= 0:                                 # convs, and shortcut nodes (they block their group)
            reasons.setdefault(node, why)

    for i, d in enumerate(defs):
        t = d['type']
        if t == 'yolo':
            for n in graph.nodes_read_by(i):
                add(n, f"feeds [yolo] {i}")
        elif t == 'route' and d.get('groups', 1) > 1:
            for n in graph.nodes_read_by(i):
                add(n, f"[route] groups input (layer {i})")
        elif t == 'convolutional' and d.get('groups', 1) > 1:
            add(i, f"[convolutional] groups={d['groups']}")
            for n in graph.nodes_read_by(i):
                add(n, f"feeds grouped [convolutional] {i}")
        if t == 'convolutional' and d.get('batch_normalize', 0) and d.get('activation', 'logistic') not in ZERO_AT_ZERO:
            add(i, f"activation {d.get('activation', 'logistic')} (act(0) != 0)")
        if t == 'shortcut' and d.get('activation', 'linear') not in ZERO_AT_ZERO:
            for n in graph.nodes_read_by(i):
                add(n, f"[shortcut] {i} activation {d['activation']} (act(0) != 0)")
    # a shortcut fed by a slice/concatenation cannot share a mask with its inputs channel by channel
    for i, d in enumerate(defs):
        if d['type'] == 'shortcut':
            for j in graph.inputs[i]:
                if graph.whole_node(j) is None:
                    for n in graph.nodes_read_by(i):
                        add(n, f"[shortcut] {i} reads a [route] concatenation/slice")
    return reasons


def shortcut_groups(graph):
    """Union-find over [shortcut] inputs -> (component root per node, {conv: first shortcut reading it})."""
    uf = _UnionFind()
    coupled_by = {}
    for i, d in enumerate(graph.defs):
        if d['type'] != 'shortcut':
            continue
        uf.find(i)
        for n in graph.nodes_read_by(i):
            uf.union(i, n)
            coupled_by.setdefault(n, i)
    return uf, coupled_by


def get_layer_set(module_defs, mode, in_channels=3):
    """The prunable conv layers for `mode` (0|1|2 or 'normal'|'shortcut'|'tiny'; 'regular' uses normal).
    `in_channels`: the image's channels ([net] channels, `model.in_channels`).

    A prunable conv has BN and none of its channels reach a [yolo] layer (nor a grouped [route]/conv).
      normal:   prunable convs not coupled by a [shortcut] (neither one of its inputs, directly or through
                [route]/[maxpool]/[upsample] aliases).
      shortcut: all prunable convs; shortcut-coupled ones form groups sharing one mask. A group containing an
                excluded member (or the image) is excluded whole.
      tiny:     all prunable convs of a cfg without [shortcut]; a cfg with shortcuts is refused.
    """
    if mode not in MODES:
        raise DarkslimError(f"prune mode {mode!r}; expected 0|1|2 or normal|regular|shortcut|tiny")
    mode = MODES[mode]
    defs = list(module_defs)
    graph = Graph(defs, in_channels)
    shortcuts = [i for i, d in enumerate(defs) if d['type'] == 'shortcut']
    if mode == 'tiny' and shortcuts:
        d = defs[shortcuts[0]]
        raise DarkslimError(f"{d.where() if hasattr(d, 'where') else '[shortcut]'}: the cfg has {len(shortcuts)} "
                            f"[shortcut] layers (first: layer {shortcuts[0]}); tiny pruning expects a cfg without "
                            "shortcuts; use shortcut_prune.py")
    bn_convs = [i for i, d in enumerate(defs) if d['type'] == 'convolutional' and d.get('batch_normalize', 0)]
    own = _own_exclusions(graph)
    uf, coupled_by = shortcut_groups(graph)
    members = {}                                      # component root -> its nodes (convs, shortcuts, image)
    for n in list(uf.parent):
        members.setdefault(uf.find(n), []).append(n)
    ls = LayerSet(mode, filters={i: defs[i]['filters'] for i in bn_convs})
    for i in bn_convs:
        if i in own:
            ls.excluded[i] = own[i]
        elif i in coupled_by and mode == 'normal':
            ls.excluded[i] = f"coupled by [shortcut] {coupled_by[i]}"
        elif i in coupled_by:
            comp = members[uf.find(i)]
            blocker = _group_blocker(defs, comp, own)
            if blocker:
                ls.excluded[i] = f"coupled by [shortcut] {coupled_by[i]} to {blocker}"
            else:
                ls.prunable.append(i)
        else:
            ls.prunable.append(i)
    if mode == 'shortcut':
        seen = set()
        for i in ls.prunable:
            root = uf.find(i) if i in coupled_by else None
            if root is None or root in seen:
                continue
            seen.add(root)
            group = sorted(n for n in members[root] if n >= 0 and defs[n]['type'] == 'convolutional')
            if len(group) > 1:
                ls.groups.append(group)
    return ls


def _group_blocker(defs, comp, own):
    """Why a shortcut component cannot lose channels (a member that must stay whole), or ''."""
    for n in sorted(comp):
        if n == IMAGE:
            return 'the input image'
        if n in own:
            return f"layer {n} ({own[n]})"
        if defs[n]['type'] == 'convolutional' and not defs[n].get('batch_normalize', 0):
            return f"layer {n} (no BN)"
    return ''


# --- step 2: plan -----------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """Which channels each prunable conv keeps.

    keep: conv layer index -> bool keep mask (numpy, length = filters) for every prunable conv
    threshold: channels with |gamma| < threshold are removed (before --min-keep / rounding top-ups)
    percent: the --percent asked for (None with --threshold); removed_share: what the plan actually removes
    """
    strategy: str
    layer_set: LayerSet
    keep: dict
    threshold: float
    percent: float = None
    min_keep: int = None
    round_to: object = None
    removed_share: float = 0.0
    topped_up: list = field(default_factory=list)

    def rows(self):
        """[(layer, before, after, kept share, group label)] for every prunable conv."""
        out = []
        for i in sorted(self.keep):
            g = self.layer_set.group_of(i)
            k = self.keep[i]
            out.append((i, len(k), int(k.sum()), float(k.mean()), '' if g is None else f"g{g}"))
        return out

    def table(self):
        plan_rows = self.rows()
        rows = [['layer', 'channels', 'kept', 'group']]
        rows += [[i, f"{a} -> {b}", f"{s:.0%}", g] for i, a, b, s, g in plan_rows]
        before, after = sum(r[1] for r in plan_rows), sum(r[2] for r in plan_rows)
        return (AsciiTable(rows).table + f"\nthreshold |gamma| < {self.threshold:.6g}: {before} -> {after} "
                f"prunable channels ({self.removed_share:.1%} removed)")

    def to_json(self):
        return {'strategy': self.strategy, 'mode': self.layer_set.mode, 'threshold': self.threshold,
                'percent': self.percent, 'min_keep': self.min_keep, 'round_to': self.round_to,
                'removed_share': self.removed_share, 'topped_up': self.topped_up,
                'groups': self.layer_set.groups,
                'excluded': {str(k): v for k, v in sorted(self.layer_set.excluded.items())},
                'layers': [{'layer': i, 'before': a, 'after': b, 'kept_share': s, 'group': g}
                           for i, a, b, s, g in self.rows()],
                'keep': {str(i): np.flatnonzero(k).tolist() for i, k in sorted(self.keep.items())}}


def bn_scores(model, layers):
    """conv index -> |gamma| (float64 numpy) of its BatchNorm."""
    return {i: model.module_list[i][1].weight.detach().abs().double().cpu().numpy() for i in layers}


def threshold_for_percent(scores, percent):
    """The |gamma| threshold removing the `percent` lowest of all `scores` (one global sort).

    k = floor(percent * N) channels are asked for; the threshold is halfway between the k-th lowest score and
    the next higher distinct one, so channels tied at the cut go (or stay) together - never an arbitrary
    half of a tie. percent 0 -> threshold 0 (nothing removed)."""
    if not 0 <= percent <= 1:
        raise DarkslimError(f"--percent {percent}; expected a fraction in [0, 1]")
    s = np.sort(scores)
    k = int(math.floor(percent * len(s) + 1e-9))
    if k == 0:
        return 0.0
    lo = s[k - 1]
    above = s[s > lo]
    return float((lo + above[0]) / 2) if above.size else float(np.nextafter(lo, np.inf))


def _no_prunable_message(layer_set):
    """One line: why no conv of the cfg may lose channels in this mode (first reasons), and what to try."""
    ex = sorted(layer_set.excluded.items())
    if not ex:
        return f"no prunable layers in {layer_set.mode} mode: the cfg has no batch-normalized [convolutional]; " \
               "expected BN convs (their gamma decide which channels go)"
    why = '; '.join(f"layer {i}: {r}" for i, r in ex[:4]) + (f"; and {len(ex) - 4} more" if len(ex) > 4 else '')
    hint = ' (shortcut_prune.py prunes shortcut-coupled convs)' if layer_set.mode == 'normal' and any(
        r.startswith('coupled by [shortcut]') for _, r in ex) else ''
    return (f"no prunable layers in {layer_set.mode} mode: all {len(ex)} BN convs are excluded ({why}); expected "
            f"at least one BN conv free of these constraints{hint}")


def _units(layer_set):
    """Mask-sharing units: each shortcut group, then every ungrouped prunable conv alone."""
    grouped = {i for g in layer_set.groups for i in g}
    return [list(g) for g in layer_set.groups] + [[i] for i in layer_set.prunable if i not in grouped]


def _round_up(n, total, round_to):
    """Kept count n rounded up: 'pow2' -> next power of two, int N -> next multiple of N; never above total."""
    if n == 0 or round_to is None:
        return n
    r = 1 << (n - 1).bit_length() if round_to == 'pow2' else -(-n // round_to) * round_to
    return min(r, total)


def make_plan(model, layer_set, strategy, percent=None, threshold=None, min_keep=None, round_to=None):
    """Keep masks for every prunable conv from a global |gamma| threshold.

    Exactly one of `percent` (share of prunable channels to remove, global sort) and `threshold` (absolute
    |gamma|; channels with |gamma| < threshold go).  A shortcut group keeps the union of its members' masks
    (a channel goes only when every member would drop it).  A unit the threshold would empty raises a
    one-line DarkslimError naming the layers and the highest safe --percent, unless `min_keep` K is given: then
    such a unit keeps its K highest-|gamma| channels (units keeping at least one channel are left as cut).
    `round_to` ('pow2' or N) rounds each unit's kept count up, filling with the highest-|gamma| channels (never
    past the layer's size).
    """
    if (percent is None) == (threshold is None):
        raise DarkslimError("give exactly one of --percent P and --threshold T")
    if min_keep is not None and min_keep < 1:
        raise DarkslimError(f"--min-keep {min_keep}; expected a positive channel count")
    if round_to not in (None, 'pow2') and (not isinstance(round_to, int) or round_to < 1):
        raise DarkslimError(f"--round-to {round_to}; expected a positive channel count such as 8, 16 or 32")
    if not layer_set.prunable:
        raise DarkslimError(_no_prunable_message(layer_set))
    scores = bn_scores(model, layer_set.prunable)
    flat = np.concatenate([scores[i] for i in layer_set.prunable])
    if threshold is None:
        threshold = threshold_for_percent(flat, percent)
    elif threshold < 0:
        raise DarkslimError(f"--threshold {threshold}; expected |gamma| >= 0")
    units = _units(layer_set)
    unit_score = [np.max(np.stack([scores[i] for i in u]), 0) for u in units]   # [filters] per unit
    keeps = [s >= threshold for s in unit_score]
    empty = [(u, s) for u, s, k in zip(units, unit_score, keeps) if not k.any()]
    if empty and min_keep is None:
        worst = min(float(s.max()) for s in unit_score)
        safe = math.floor(np.sum(flat < worst) / len(flat) * 1000) / 1000
        asked = f"--percent {percent}" if percent is not None else f"--threshold {threshold:g}"
        names = ', '.join('+'.join(map(str, u)) + f" (max |gamma| {s.max():.3g})" for u, s in empty[:6]) \
            + (f" and {len(empty) - 6} more" if len(empty) > 6 else '')
        raise DarkslimError(f"{asked} would remove every channel of layer(s) {names}; the highest safe "
                            f"--percent is {safe} (or --threshold up to {worst:.6g}), or pass --min-keep K to keep "
                            "the K strongest channels of such layers")
    topped = []
    for n, (u, s) in enumerate(zip(units, unit_score)):
        cut = int(keeps[n].sum())
        if cut == 0:                                # emptied: only reached with min_keep (see above)
            topped += u
        want = _round_up(cut or min(min_keep, len(s)), len(s), round_to)
        if want != cut:
            k = np.zeros(len(s), bool)
            k[np.argsort(-s, kind='stable')[:want]] = True     # strongest first; ties by channel index
            keeps[n] = k
    keep = {i: keeps[n].copy() for n, u in enumerate(units) for i in u}
    removed = sum(int((~keep[i]).sum()) for i in layer_set.prunable)
    return Plan(strategy, layer_set, keep, float(threshold), percent, min_keep, round_to,
                removed / len(flat), sorted(topped))


# --- step 3: surgery --------------------------------------------------------------------------------------------

def channel_flow(model, keep):
    """Per layer: (kept output channels [C] bool, constant [C] float) after removing channels per `keep`.

    A removed BN channel (gamma ~ 0 after sparsity training) outputs the constant act(beta).  Constants flow
    unchanged through [maxpool] (max of a constant; darknet pads with -inf) and [upsample], are concatenated by
    [route] (any number of inputs, `groups` slices), and summed by [shortcut] (output act(sum)); a shortcut
    channel is removed only when it is removed in every input (shortcut groups share their mask, so it is).
    """
    defs = model.module_defs
    flow = []
    img = (torch.ones(model.in_channels, dtype=torch.bool), torch.zeros(model.in_channels))
    for i, d in enumerate(defs):
        t = d['type']
        prev = flow[i - 1] if i else img
        if t == 'convolutional':
            m = model.module_list[i]
            n = d['filters']
            if i in keep:
                k = torch.as_tensor(keep[i], dtype=torch.bool)
                with torch.no_grad():
                    c = m[-1](m[1].bias.detach().float().cpu())     # act(beta)
                c = torch.where(k, torch.zeros_like(c), c)
            else:
                k, c = torch.ones(n, dtype=torch.bool), torch.zeros(n)
            flow.append((k, c))
        elif t == 'route':
            g, gid = d.get('groups', 1), d.get('group_id', 0)
            parts = [(flow[j][0].chunk(g)[gid], flow[j][1].chunk(g)[gid]) for j in model.inputs[i]]
            flow.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
        elif t == 'shortcut':
            ins = [flow[j] for j in model.inputs[i]]
            k = ins[0][0]
            for kj, _ in ins[1:]:
                if not torch.equal(kj, k):
                    raise RuntimeError(f"layer {i}: [shortcut] inputs lose different channels (layer-set bug)")
            with torch.no_grad():
                c = model.module_list[i].act(sum(cj for _, cj in ins))
            flow.append((k, torch.where(k, torch.zeros_like(c), c)))
        else:                                         # maxpool, upsample, yolo
            flow.append(prev)
    return flow


def _fold_shift(conv, keep_in, const_in):
    """W.sum(kh, kw)[:, removed] @ constant: what the removed input channels added to each output channel."""
    removed = ~keep_in
    if not removed.any():
        return None
    w = conv.weight.detach()
    if conv.groups != 1:
        raise RuntimeError("removed channels feed a grouped conv (layer-set bug)")
    return w.sum((2, 3))[:, removed].double() @ const_in[removed].double()


def loose_model(model, plan):
    """The full-size model with removed channels' gamma, beta zeroed and their constants folded (for checking).

    Fold: a consumer conv reading removed channels with constant c gets, with BN, `running_mean -= W.sum(kh,kw) @ c`,
    without BN `bias += W.sum(kh,kw) @ c`.  This is exact for 1x1 consumers.  For k x k consumers it is exact
    away from the image border; within k//2 cells of the border the zero padding would have multiplied some
    taps by 0 instead of c, so there the fold is an approximation (as in the seed and the slimming paper).
    Removed channels then output act(0) = 0 (layer sets admit only activations with act(0) = 0).
    """
    loose = copy.deepcopy(model).eval()
    flow = channel_flow(model, plan.keep)
    with torch.no_grad():
        for i, d in enumerate(loose.module_defs):
            if d['type'] != 'convolutional':
                continue
            m = loose.module_list[i]
            keep_in, const_in = flow[i - 1] if i else (torch.ones(m[0].in_channels, dtype=torch.bool),
                                                       torch.zeros(m[0].in_channels))
            shift = _fold_shift(m[0], keep_in, const_in)
            if shift is not None:
                if d.get('batch_normalize', 0):
                    m[1].running_mean.sub_(shift.to(m[1].running_mean.dtype))
                else:
                    m[0].bias.add_(shift.to(m[0].bias.dtype))
            if i in plan.keep:
                removed = ~torch.as_tensor(plan.keep[i], dtype=torch.bool)
                m[1].weight[removed] = 0
                m[1].bias[removed] = 0
    return loose


def compact_defs(model, plan):
    """[net] + layer sections of the pruned network: each prunable conv's filters = its kept count."""
    defs = copy.deepcopy(model.defs)
    for i, k in plan.keep.items():
        defs[i + 1]['filters'] = int(np.sum(k))
    return defs


def compact_model(model, plan, loose=None):
    """The smaller network: kept output channels of every conv, kept input channels of every consumer (through
    route offsets and shortcut groups), heads' inputs sliced; weights taken from the loose model (folds
    included), so its output equals the loose model's."""
    loose = loose_model(model, plan) if loose is None else loose
    flow = channel_flow(model, plan.keep)
    small = models.Darknet(compact_defs(model, plan), img_size=model.img_size).eval()
    with torch.no_grad():
        for i, d in enumerate(model.module_defs):
            if d['type'] != 'convolutional':
                continue
            src, dst = loose.module_list[i], small.module_list[i]
            k_out = flow[i][0]
            k_in = flow[i - 1][0] if i else torch.ones(src[0].in_channels, dtype=torch.bool)
            w = src[0].weight[k_out]
            if src[0].groups == 1:
                w = w[:, k_in]
            dst[0].weight.copy_(w)
            if src[0].bias is not None:
                dst[0].bias.copy_(src[0].bias[k_out])
            if d.get('batch_normalize', 0):
                for name in ('weight', 'bias', 'running_mean', 'running_var'):
                    getattr(dst[1], name).copy_(getattr(src[1], name)[k_out])
                dst[1].num_batches_tracked.copy_(src[1].num_batches_tracked)
    small.header = getattr(model, 'header', None)
    if hasattr(model, 'seen'):
        small.seen = model.seen
    return small


# --- the scripts' shared steps ----------------------------------------------------------------------------------

DEFAULT_WEIGHTS = os.path.join('weights', 'last.pt')   # train.py's default output
OUTPUT_EXTS = ('.cfg', '.weights', '.pt', '.json', '-channels.png')


def add_prune_args(p, strategy):
    """The options every prune script takes (regular adds --round-to)."""
    p.add_argument('--cfg', help='model cfg (optional for a .pt that stores its cfg)')
    p.add_argument('--weights', help=f'sparse-trained .weights or .pt (default: {DEFAULT_WEIGHTS})')
    p.add_argument('--data', help='.data file: evaluate mAP of the original, loose and compact models')
    how = p.add_mutually_exclusive_group()
    how.add_argument('--percent', type=float,
                     help=f"share of prunable channels to remove (default {default_percent(strategy)})")
    how.add_argument('--threshold', type=float, help='remove channels with |gamma| below this')
    p.add_argument('--min-keep', type=int, metavar='K',
                   help='off by default: a layer the cut would empty stops the prune with an error; with K, such '
                        'a layer keeps its K highest-|gamma| channels and the prune goes on (other layers are '
                        'left as cut)')
    if strategy == 'regular':
        p.add_argument('--round-to', type=int,
                       help='round kept counts up to a multiple of N (8/16/32); default: a power of two')
    p.add_argument('--img-size', type=int, help="input size for BFLOPs, latency and mAP (default: the cfg's)")
    p.add_argument('--batch-size', type=int, default=16, help='batch size for mAP evaluation')
    p.add_argument('--device', default='cpu', help='cpu | cuda | cuda:N (mAP evaluation)')
    p.add_argument('--latency-runs', type=int, default=5, help='timed CPU forward passes per model (0 = skip)')
    p.add_argument('--out', help='output prefix (default weights/<cfg stem>-<strategy>-<percent or t<threshold>>'
                                 '[-pow2 | -r<N> for regular])')
    return p


def default_percent(strategy):
    return 0.3 if strategy == 'tiny' else 0.5


def round_to_of(args, strategy):
    """regular: --round-to N, or 'pow2' without it; other strategies never round."""
    if strategy != 'regular':
        return None
    return 'pow2' if args.round_to is None else args.round_to


def resolve_inputs(args, strategy):
    """(cfg or None, weights, output prefix, percent or None) from the arguments (not modified); with no
    --weights, train.py's weights/last.pt; with neither --percent nor --threshold, the strategy's percent."""
    weights = args.weights
    if weights is None:
        if not os.path.isfile(DEFAULT_WEIGHTS):
            raise DarkslimError(f"no --weights given and {DEFAULT_WEIGHTS} (train.py's default output) does not "
                                "exist; expected --cfg C --weights W (.weights or .pt)")
        weights = DEFAULT_WEIGHTS
    if not os.path.isfile(weights):
        raise DarkslimError(f"{weights}: no such weights file")
    if args.cfg is None and not models.is_torch_file(weights):
        raise DarkslimError(f"{weights}: darknet .weights store no cfg; expected --cfg C")
    from utils.torch_utils import select_device
    select_device(args.device)                        # a bad --device fails now, before any work
    percent = args.percent
    if percent is None and args.threshold is None:
        percent = default_percent(strategy)
    prefix = args.out
    if prefix is None:
        stem = os.path.splitext(os.path.basename(args.cfg or weights))[0]
        value = f"{percent:g}" if percent is not None else f"t{args.threshold:g}"
        round_to = round_to_of(args, strategy)
        rounding = '' if round_to is None else '-pow2' if round_to == 'pow2' else f"-r{round_to}"
        prefix = os.path.join('weights', f"{stem}-{strategy}-{value}{rounding}")
    for ext in OUTPUT_EXTS:
        for src in (args.cfg, weights):
            if src is not None and os.path.abspath(prefix + ext) == os.path.abspath(src):
                raise DarkslimError(f"--out {prefix}: {prefix + ext} is an input; expected another prefix "
                                    "(inputs are never overwritten)")
    return args.cfg, weights, prefix, percent


def img_hw(model, img_size):
    return (img_size, img_size) if img_size else tuple(model.img_size)


def _timed_forward(model, x):
    """(a no-argument callable running `model` on the static input `x`, how it runs).

    CPU: the eval forward.  CUDA: the forward captured once as a CUDA graph and replayed (no Python or kernel
    launch overhead).  The model must be fused: with no BatchNorm (nor dropout) left, train mode runs the same
    kernels as eval, up to the raw head outputs; it skips the heads' box decoding, whose host->device stride
    tensor cannot be captured (the decoding costs the same before and after a prune)."""
    if x.device.type != 'cuda':
        return (lambda: model(x)), 'cpu eager'
    model.train()
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):                     # warm-up off the default stream (cuDNN plans, allocations)
        for _ in range(3):
            model(x)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay, 'cuda graph (raw head outputs)'


def latencies(nets, hw, runs=5, batch=1, device='cpu'):
    """([median seconds per model], how): `runs` forward passes of a zero batch [batch, C, *hw] through a fused
    copy of each model on `device`, the models timed alternately (machine drift hits all alike) after one
    warm-up pass each; CUDA timings are synchronized around each pass (see `_timed_forward`)."""
    dev = torch.device(device)
    fused = [copy.deepcopy(m).eval().fuse().to(dev) for m in nets]
    times = [[] for _ in fused]
    with torch.no_grad():
        forwards = []
        for m in fused:
            fn, how = _timed_forward(m, torch.zeros(batch, m.in_channels, *hw, device=dev))
            fn()
            forwards.append(fn)
        for _ in range(runs):
            for k, fn in enumerate(forwards):
                if dev.type == 'cuda':
                    torch.cuda.synchronize(dev)
                t = time.perf_counter()
                fn()
                if dev.type == 'cuda':
                    torch.cuda.synchronize(dev)
                times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times], how


def cpu_latency(model, hw, runs=5):
    """Median seconds of `runs` batch-1 forward passes of a fused CPU copy of `model` (one warm-up pass);
    None when runs < 1."""
    return latencies([model], hw, runs)[0][0] if runs >= 1 else None


def measure(model, hw, runs=5):
    """{'params', 'bflops', 'weights_bytes', 'latency_s'} of a model at input size hw."""
    params, bflops = models.model_info(model.defs, *hw)
    return {'params': params, 'bflops': bflops, 'weights_bytes': weights_file_size(model),
            'latency_s': cpu_latency(model, hw, runs)}


def evaluate_map(model, data, img_size, batch_size, device):
    """(mAP@0.5, mAP@0.5:0.95) of `model` on the .data file's valid set, via test.test (imported here, lazily:
    it pulls in the data loader)."""
    import test as test_py
    from utils.torch_utils import select_device
    dev = select_device(device)
    m = model if dev.type == 'cpu' else copy.deepcopy(model).to(dev)
    r = test_py.test(m, data, img_size=img_size, batch_size=batch_size, device=device, verbose=False)
    return r['mAP50'], r['mAP50_95']


def metrics_rows(before, after, maps=None):
    """[Metric, Before, After] rows for the report table."""
    def fmt_lat(s):
        return 'skipped' if s is None else f"{s * 1e3:.1f} ms"
    rows = [['Metric', 'Before', 'After'],
            ['params', f"{before['params']:,}", f"{after['params']:,} ({after['params'] / before['params']:.1%})"],
            ['BFLOPs', f"{before['bflops']:.3f}", f"{after['bflops']:.3f} ({after['bflops'] / before['bflops']:.1%})"],
            ['weights file', f"{before['weights_bytes'] / 1e6:.2f} MB", f"{after['weights_bytes'] / 1e6:.2f} MB"],
            ['CPU latency (batch 1, fused, median)', fmt_lat(before['latency_s']), fmt_lat(after['latency_s'])]]
    if before['latency_s'] and after['latency_s']:
        rows[-1][2] += f" ({before['latency_s'] / after['latency_s']:.2f}x)"
    if maps:
        for key, label in (('mAP50', 'mAP@0.5'), ('mAP50_95', 'mAP@0.5:0.95')):
            rows.append([label, f"{maps['original'][key]:.4f}", f"{maps['compact'][key]:.4f}"])
            rows.append([f"{label} (loose model)", '', f"{maps['loose'][key]:.4f}"])
    return rows


def channel_chart(plan, path, title=''):
    """Per-layer bar chart of channels before (grey) and after (blue) as a PNG, drawn with OpenCV; atomic."""
    import cv2
    rows = plan.rows()
    n = max(len(rows), 1)
    bar = max(6, min(24, 1200 // n))
    left, top, bottom, h_plot = 70, 40, 50, 360
    width = max(left + 20 + n * bar, 640)
    img = np.full((top + h_plot + bottom, width, 3), np.iinfo(np.uint8).max, np.uint8)  # white
    top_ch = max([r[1] for r in rows] + [1])
    y0 = top + h_plot
    for t in range(5):                                # y grid with channel counts
        y = int(y0 - h_plot * t / 4)
        cv2.line(img, (left, y), (width, y), (225, 225, 225), 1)
        cv2.putText(img, f"{top_ch * t / 4:.0f}", (5, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (60, 60, 60), 1,
                    cv2.LINE_AA)
    step = max(1, int(math.ceil(n * 28 / (width - left))))
    for k, (i, before, after, _, _) in enumerate(rows):
        x = left + k * bar
        cv2.rectangle(img, (x + 1, int(y0 - h_plot * before / top_ch)), (x + bar - 1, y0), (190, 190, 190), -1)
        cv2.rectangle(img, (x + 1, int(y0 - h_plot * after / top_ch)), (x + bar - 1, y0), (200, 110, 30), -1)
        if k % step == 0:
            cv2.putText(img, str(i), (x, y0 + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.putText(img, title or f"{plan.strategy} prune: channels per layer, before (grey) / after (blue)", (10, 25),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, 'layer', (left, y0 + 38), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    ok, png = cv2.imencode('.png', img)
    if not ok:
        raise RuntimeError('PNG encoding failed')
    write_bytes_atomic(path, png.tobytes())
    return path


def write_outputs(prefix, compact, plan, report):
    """PREFIX.cfg (core write_cfg), .weights, .pt (with the plan), .json (report + plan), -channels.png.
    Each file is written atomically; returns {ext: path}."""
    paths = {ext: prefix + ext for ext in OUTPUT_EXTS}
    write_cfg(paths['.cfg'], compact.defs)
    save_weights(compact, paths['.weights'])
    plan_json = plan.to_json()
    models.save_checkpoint(paths['.pt'], compact, prune=json.loads(json.dumps(plan_json)))
    write_text_atomic(paths['.json'], json.dumps({**report, 'plan': plan_json}, indent=1) + '\n')
    channel_chart(plan, paths['-channels.png'])
    return paths


def evaluate_and_report(args, strategy, model, loose, compact, cfg, weights, prune_s):
    """Measure original and compact (params, BFLOPs, .weights size, CPU latency), evaluate mAP of original,
    loose and compact when --data is given, print the Metric | Before | After table; returns the JSON report."""
    hw = img_hw(model, args.img_size)
    before, after = measure(model, hw, args.latency_runs), measure(compact, hw, args.latency_runs)
    maps = None
    if args.data:
        size = args.img_size or max(hw)
        maps = {name: dict(zip(('mAP50', 'mAP50_95'), evaluate_map(m, args.data, size, args.batch_size,
                                                                   args.device)))
                for name, m in (('original', model), ('loose', loose), ('compact', compact))}
    print(AsciiTable(metrics_rows(before, after, maps), f" {strategy} prune ").table)
    if maps is None:
        print('mAP skipped: no --data given')
    return {'strategy': strategy, 'cfg': cfg, 'weights': weights, 'img_size': list(hw),
            'before': before, 'after': after, 'map': maps, 'prune_seconds': prune_s}


def run(args, strategy):
    """A prune script's whole job ('normal' | 'regular' | 'shortcut' | 'tiny'): load, layer set, plan (a bad
    plan fails before anything is printed or written), print the layer list and plan, loose and compact
    surgery, report, write PREFIX.{cfg,weights,pt,json} and PREFIX-channels.png. Returns {ext: path}."""
    t0 = time.perf_counter()
    cfg, weights, prefix, percent = resolve_inputs(args, strategy)
    model = models.load_model(cfg, weights, img_size=args.img_size)
    layer_set = get_layer_set(model.module_defs, strategy, model.in_channels)
    plan = make_plan(model, layer_set, strategy, percent, args.threshold, args.min_keep, round_to_of(args, strategy))
    print(layer_set.describe())
    print(plan.table())
    loose = loose_model(model, plan)
    compact = compact_model(model, plan, loose)
    report = evaluate_and_report(args, strategy, model, loose, compact, cfg, weights, time.perf_counter() - t0)
    paths = write_outputs(prefix, compact, plan, report)
    print('wrote ' + ', '.join(paths.values()))
    return paths
