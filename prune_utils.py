"""Network slimming for Darknet-cfg models: which layers may lose channels, which channels go, and the surgery.

Graph -> layer set -> importance -> plan -> surgery -> outputs, shared by normal_prune.py, regular_prune.py,
shortcut_prune.py, tiny_prune.py and layer_prune.py (and, for the layer set, by `train.py -sr`, which
regularizes exactly the BN layers a prune may thin):

1. `get_layer_set(module_defs, mode) -> LayerSet`: derived from the cfg graph alone (channels.Graph), never
   from layer numbers.
2. `make_plan(model, layer_set, ..., importance='gamma') -> Plan`: per-channel scores from an importance
   (importance.py) and a global threshold -> a keep mask per prunable conv. A plan is data: printed
   (`Plan.table`), stored in the outputs (`Plan.to_json`) and replayed (`plan_from_json`).
3. `loose_model(model, plan)` (full size, removed channels zeroed, constants folded) and
   `compact_model(model, plan)` (the smaller network; its cfg is `compact.defs`).
4. `write_outputs(prefix, compact, plan, report)`: the compact cfg, .weights, .pt, JSON report and chart.
The command-line side (options, the report table, mAP evaluation) is prune_cli.py.

A [shortcut] ties its inputs' channels to its own one to one, so the convs it reads (through pass-through
layers) must lose the same channels: those convs form one group (union-find over channels.Graph's nodes).
"""
import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from terminaltables import AsciiTable

import channels
import models
from channels import IMAGE, ZERO_AT_ZERO, Graph, channel_flow, conv_shift, fold_
from importance import get_importance
from utils.darknet_weights import save_weights, weights_file_size
from utils.errors import DarkslimError
from utils.io import write_text_atomic
from utils.latency import cpu_latency
from utils.parse_config import write_cfg

# layer-set modes: train.py's --prune numbers and the names (regular pruning thins the normal layer set)
MODES = {0: 'normal', 1: 'shortcut', 2: 'tiny', 'normal': 'normal', 'shortcut': 'shortcut', 'tiny': 'tiny',
         'regular': 'normal'}
POW2_FLOOR = 8     # power-of-two rounding's smallest count (a smaller layer keeps its own size)


class NothingToPrune(DarkslimError):
    """A cut that removes no channel (a layer prune may still remove blocks)."""


class Emptied(DarkslimError):
    """A cut that would remove every channel of a layer (without min_keep or layer_keep)."""


# --- step 1: layer sets -----------------------------------------------------------------------------------------

@dataclass
class LayerSet:
    """The conv layers a prune may thin, for one mode (plain data).

    mode:     'normal' | 'shortcut' | 'tiny'
    prunable: conv layer indices whose BN channels may be removed (= the BN layers `train.py -sr` regularizes)
    excluded: every other BN conv layer index -> why it is left whole
    groups:   shortcut-coupled prunable convs that share one keep mask (groups of one omitted)
    slices:   conv layer index -> g for prunable convs read whole by a `[route] groups=g` split: their channels
              are g equal slices, and every slice must keep the same count (so the split still cuts between the
              same two sets of channels)
    filters:  conv layer index -> filters, for every BN conv (for printing)
    partial:  conv layer index -> w for a group member wider than the rest of its group: a [shortcut] adding
              inputs of unequal widths sums only the first w channels (yolov3-tiny-prn), so only those share
              the group's mask; its other channels are pruned on their own
    """
    mode: str
    prunable: list = field(default_factory=list)
    excluded: dict = field(default_factory=dict)
    groups: list = field(default_factory=list)
    slices: dict = field(default_factory=dict)
    filters: dict = field(default_factory=dict)
    partial: dict = field(default_factory=dict)

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
                how = '' if g is None else f"g{g}: {self.groups[g]}"
                if i in self.partial:
                    w = self.partial[i]
                    how += f" (its first {w} channels; the other {self.filters[i] - w} on their own)"
                if i in self.slices:
                    how = (how + '; ' if how else '') + f"{self.slices[i]} equal slices ([route] groups split)"
                rows.append([i, self.filters.get(i, ''), 'prunable', how])
        n_ch = sum(self.filters.get(i, 0) for i in self.prunable)
        total = sum(self.filters.values())
        summary = (f"mode {self.mode}: {len(self.prunable)} of {len(self.prunable) + len(self.excluded)} BN convs "
                   f"prunable ({n_ch} of {total} channels), {len(self.excluded)} excluded, "
                   f"{len(self.groups)} shortcut groups, {len(self.slices)} sliced by [route] groups")
        return AsciiTable(rows).table + '\n' + summary


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
        kind = channels.kind(d)
        if kind == 'consume':
            for n in graph.nodes_read_by(i):
                add(n, f"feeds [{d['type']}] {i}")
        elif kind == 'concat' and d.get('groups', 1) > 1:
            for j in graph.inputs[i]:
                if graph.whole_node(j) in (None, IMAGE):  # a slice of a concatenation: no per-node rule
                    for n, _, _ in graph.segs[j]:
                        add(n, f"[route] {i} groups={d['groups']} slices a concatenation")
        elif kind == 'produce' and d.get('groups', 1) > 1:
            add(i, f"[convolutional] groups={d['groups']}")
            for n in graph.nodes_read_by(i):
                add(n, f"feeds grouped [convolutional] {i}")
        if kind == 'produce' and d.get('batch_normalize', 0) and d.get('activation', 'logistic') not in ZERO_AT_ZERO:
            add(i, f"activation {d.get('activation', 'logistic')} (act(0) != 0)")
        if kind == 'sum' and d.get('activation', 'linear') not in ZERO_AT_ZERO:
            for n in graph.nodes_read_by(i):
                add(n, f"[shortcut] {i} activation {d['activation']} (act(0) != 0)")
    # a shortcut fed by a slice/concatenation cannot share a mask with its inputs channel by channel (inputs of
    # unequal widths are handled per group: overlap_members)
    for i in channels.layers_of_kind(defs, 'sum'):
        if any(graph.whole_node(j) is None for j in graph.inputs[i]):
            for n in graph.nodes_read_by(i):
                add(n, f"[shortcut] {i} reads a [route] concatenation/slice")
    return reasons


def sliced_nodes(graph):
    """{node: g} for nodes read whole by a `[route] groups` split (g = the lcm of the groups of every such
    route: equal counts in lcm slices give equal counts in each route's slices)."""
    out = {}
    for i in channels.layers_of_kind(graph.defs, 'concat'):
        g = graph.defs[i].get('groups', 1)
        for j in graph.inputs[i] if g > 1 else []:
            node = graph.whole_node(j)
            if node not in (None, IMAGE):
                out[node] = math.lcm(out.get(node, 1), g)
    return out


def _add_slices(ls, defs, graph, uf, coupled_by, members):
    """Record the slice constraint of every prunable unit (a shortcut group shares its members' constraint);
    a unit whose channels do not split into equal slices is excluded instead."""
    sliced = sliced_nodes(graph)
    if not sliced:
        return
    grouped = {i for grp in ls.groups for i in grp}
    units = [list(grp) for grp in ls.groups] + [[i] for i in ls.prunable if i not in grouped]
    for unit in units:
        nodes = members[uf.find(unit[0])] if unit[0] in coupled_by else unit
        g = math.lcm(*[sliced.get(n, 1) for n in nodes])
        if g == 1:
            continue
        if defs[unit[0]]['filters'] % g or any(i in ls.partial for i in unit):
            for i in unit:
                ls.prunable.remove(i)
                ls.partial.pop(i, None)
                ls.excluded[i] = (f"{defs[unit[0]]['filters']} channels do not split into {g} equal slices"
                                  if defs[unit[0]]['filters'] % g else
                                  "a [route] groups split of a group coupled by an unequal-width [shortcut]")
            ls.groups = [grp for grp in ls.groups if grp != unit]
            continue
        for i in unit:
            ls.slices[i] = g


def overlap_members(graph, members):
    """Shortcut components whose nodes differ in width: ({conv: w} for the one member wider than the others, w
    being theirs: its first w channels share the group's mask), {node: reason} for the nodes of components with
    any other mix of widths (left whole). A [shortcut] sums only the overlap of unequal inputs (its output has
    its first input's width), so a prefix coupling is exact when a single conv is wider than the rest."""
    partial, blocked = {}, {}
    for comp in members.values():
        width = {n: graph.node_channels(n) for n in comp}
        if len(set(width.values())) < 2:
            continue
        w = min(width.values())
        wide = [n for n in comp if width[n] > w]
        if len(wide) == 1 and wide[0] >= 0 and channels.is_conv(graph.defs[wide[0]]):
            partial[wide[0]] = w
            continue
        sc = min(n for n in comp if n >= 0 and channels.kind(graph.defs[n]) == 'sum')
        for n in comp:
            blocked[n] = f"[shortcut] {sc} couples inputs of widths {sorted(set(width.values()))} (only a single " \
                         "wider conv can be coupled by its overlap)"
    return partial, blocked


def shortcut_groups(graph):
    """Union-find over [shortcut] inputs -> (component root per node, {conv: first shortcut reading it})."""
    uf = _UnionFind()
    coupled_by = {}
    for i in channels.layers_of_kind(graph.defs, 'sum'):
        uf.find(i)
        for n in graph.nodes_read_by(i):
            uf.union(i, n)
            coupled_by.setdefault(n, i)
    return uf, coupled_by


def get_layer_set(module_defs, mode, in_channels=3):
    """The prunable conv layers for `mode` (0|1|2 or 'normal'|'shortcut'|'tiny'; regular pruning uses normal).
    `in_channels`: the image's channels ([net] channels, `model.in_channels`).

    A prunable conv has BN and none of its channels reach a [yolo] layer (nor a grouped conv, nor a
    `[route] groups` split of a concatenation). A conv read whole by a `[route] groups=g` split is prunable in
    g equal slices (`LayerSet.slices`).
      normal:   prunable convs not coupled by a [shortcut] (neither one of its inputs, directly or through
                [route]/[maxpool]/[upsample] aliases).
      shortcut: all prunable convs; shortcut-coupled ones form groups sharing one mask. A group containing an
                excluded member (or the image) is excluded whole. A [shortcut] of unequal widths couples only
                the overlap: a single wider member shares the group's mask over its first channels (`partial`).
      tiny:     all prunable convs of a cfg without [shortcut]; a cfg with shortcuts is refused.
    """
    if mode not in MODES:
        raise DarkslimError(f"{{mode}} {mode!r}; expected 0|1|2 or normal|regular|shortcut|tiny",
                            param='mode')
    mode = MODES[mode]
    defs = list(module_defs)
    graph = Graph(defs, in_channels)
    shortcuts = channels.layers_of_kind(defs, 'sum')
    if mode == 'tiny' and shortcuts:
        d = defs[shortcuts[0]]
        raise DarkslimError(f"{d.where() if hasattr(d, 'where') else '[shortcut]'}: the cfg has {len(shortcuts)} "
                            f"[shortcut] layers (first: layer {shortcuts[0]}); tiny pruning expects a cfg without "
                            "shortcuts; prune it in shortcut mode (shortcut_prune.py)")
    bn_convs = channels.convs(defs, bn=True)
    own = _own_exclusions(graph)
    uf, coupled_by = shortcut_groups(graph)
    members = {}                                      # component root -> its nodes (convs, shortcuts, image)
    for n in list(uf.parent):
        members.setdefault(uf.find(n), []).append(n)
    partial, blocked = overlap_members(graph, members)
    for n, why in blocked.items():
        own.setdefault(n, why)
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
            group = sorted(n for n in members[root] if n >= 0 and channels.is_conv(defs[n]))
            if len(group) > 1:
                ls.groups.append(group)
                ls.partial.update({n: partial[n] for n in group if n in partial})
    _add_slices(ls, defs, graph, uf, coupled_by, members)
    return ls


def _group_blocker(defs, comp, own):
    """Why a shortcut component cannot lose channels (a member that must stay whole), or ''."""
    for n in sorted(comp):
        if n == IMAGE:
            return 'the input image'
        if n in own:
            return f"layer {n} ({own[n]})"
        if channels.is_conv(defs[n]) and not defs[n].get('batch_normalize', 0):
            return f"layer {n} (no BN)"
    return ''


# --- step 2: plan -----------------------------------------------------------------------------------------------

@dataclass
class PlanRow:
    """One prunable conv in a plan: its channels before and after, the kept share, its shortcut group ('gN')."""
    layer: int
    before: int
    after: int
    kept_share: float
    group: str = ''


@dataclass
class Plan:
    """Which channels each prunable conv keeps.

    keep: conv layer index -> bool keep mask (numpy, length = filters) for every prunable conv
    threshold: channels scoring below it are removed (before min_keep / layer_keep / rounding top-ups)
    percent: the share asked for (None when a threshold was given); removed_share: what the plan actually removes
    importance: the name of the importance whose scores were cut (importance.IMPORTANCES)
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
    importance: str = 'gamma'
    target_flops: float = None
    greedy: bool = False
    bflops: tuple = None          # (the model's, the compact model's) BFLOPs at the plan's input size
    layer_bflops: dict = None     # prunable conv -> (BFLOPs before, after)
    steps: list = None            # a K-step prune: each step's plan (to_json), over the previous step's model
    layer_keep: float = None      # the share of every prunable layer kept at least (a floor; see make_plan)

    def rows(self):
        """One PlanRow per prunable conv, in layer order."""
        out = []
        for i in sorted(self.keep):
            g = self.layer_set.group_of(i)
            k = self.keep[i]
            out.append(PlanRow(i, len(k), int(k.sum()), float(k.mean()), '' if g is None else f"g{g}"))
        return out

    def table(self):
        plan_rows = self.rows()
        fl = self.layer_bflops or {}
        rows = [['layer', 'channels', 'kept', 'group'] + (['BFLOPs'] if fl else [])]
        rows += [[r.layer, f"{r.before} -> {r.after}", f"{r.kept_share:.0%}", r.group] +
                 ([f"{fl[r.layer][0]:.3f} -> {fl[r.layer][1]:.3f}"] if fl else []) for r in plan_rows]
        before, after = sum(r.before for r in plan_rows), sum(r.after for r in plan_rows)
        label = get_importance(self.importance).label
        text = (AsciiTable(rows).table + f"\nthreshold score < {self.threshold:.6g} (importance {self.importance}: "
                f"{label}{', greedy' if self.greedy else ''}): {before} -> {after} prunable channels "
                f"({self.removed_share:.1%} removed)")
        if self.bflops:
            b, a = self.bflops
            goal = f" (target: at least {self.target_flops:.1%} fewer)" if self.target_flops else ''
            text += f"\nBFLOPs {b:.3f} -> {a:.3f}: {1 - a / b:.1%} fewer{goal}"
        return text

    def to_json(self):
        return {'strategy': self.strategy, 'mode': self.layer_set.mode, 'importance': self.importance,
                'greedy': self.greedy, 'target_flops': self.target_flops, 'bflops': self.bflops, 'steps': self.steps,
                'threshold': self.threshold, 'percent': self.percent, 'min_keep': self.min_keep,
                'layer_keep': self.layer_keep, 'round_to': self.round_to, 'removed_share': self.removed_share, 'topped_up': self.topped_up,
                'groups': self.layer_set.groups,
                'partial': {str(k): v for k, v in sorted(self.layer_set.partial.items())},
                'slices': {str(k): v for k, v in sorted(self.layer_set.slices.items())},
                'excluded': {str(k): v for k, v in sorted(self.layer_set.excluded.items())},
                'layers': [dataclasses.asdict(r) for r in self.rows()],
                'keep': {str(i): np.flatnonzero(k).tolist() for i, k in sorted(self.keep.items())}}


def plan_from_json(data, layer_set):
    """The Plan stored by `Plan.to_json` (a prune's .json 'plan', its .pt 'prune'), checked against the layer set
    of the model it is replayed on: same mode, same prunable convs with the same widths, kept indices in range.
    Replaying it gives the same outputs as the prune that wrote it."""
    def refuse(why):
        return DarkslimError(f"{{plan}}: {why}", param='plan')
    try:
        keep_idx = {int(i): v for i, v in data['keep'].items()}
        mode, strategy = data['mode'], data['strategy']
    except (KeyError, TypeError, ValueError, AttributeError):
        raise refuse("no channel plan (expected the 'plan' of a prune's .json or the 'prune' of its .pt)") from None
    if mode != layer_set.mode or sorted(keep_idx) != sorted(layer_set.prunable):
        raise refuse(f"a {mode} plan of layers {sorted(keep_idx)}; the model's {layer_set.mode} layer set has "
                     f"prunable layers {sorted(layer_set.prunable)}; expected the model the plan was made for")
    keep = {}
    for i, idx in sorted(keep_idx.items()):
        n = layer_set.filters[i]
        if not idx or min(idx) < 0 or max(idx) >= n:
            raise refuse(f"layer {i} keeps channels {idx[:3]}...; expected 1 or more indices in 0..{n - 1}")
        keep[i] = np.zeros(n, dtype=bool)
        keep[i][idx] = True
    removed = sum(int((~k).sum()) for k in keep.values())
    return Plan(strategy, layer_set, keep, float(data.get('threshold', 0.0)), data.get('percent'),
                data.get('min_keep'), data.get('round_to'), removed / sum(len(k) for k in keep.values()),
                list(data.get('topped_up', [])), data.get('importance', 'gamma'), layer_keep=data.get('layer_keep'))


def threshold_for_percent(scores, percent):
    """The score threshold removing the `percent` lowest of all `scores` (one global sort).

    k = floor(percent * N) channels are asked for; the threshold is halfway between the k-th lowest score and
    the next higher distinct one, so channels tied at the cut go (or stay) together - never an arbitrary
    half of a tie. percent 0 -> threshold 0 (nothing removed)."""
    if not 0 <= percent <= 1:
        raise DarkslimError(f"{{percent}} {percent}; expected a fraction in [0, 1]", param='percent')
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


@dataclass
class _Unit:
    """Channels that share one keep mask: channels start..stop-1 of each conv in `layers`. `tail`: the channels of
    a partial group member past its group's width (LayerSet.partial), which may all go (the member keeps its
    group's channels)."""
    layers: list
    start: int
    stop: int
    tail: bool = False


def _units(layer_set):
    """Mask-sharing units: each shortcut group (over its width), then the tails of its wider member, then every
    ungrouped prunable conv alone."""
    grouped = {i for g in layer_set.groups for i in g}
    # a group's width is its members' (a partial member joins with its first that many channels)
    units = [_Unit(list(g), 0, min(layer_set.partial.get(i, layer_set.filters[i]) for i in g))
             for g in layer_set.groups]
    units += [_Unit([i], w, layer_set.filters[i], tail=True) for i, w in sorted(layer_set.partial.items())]
    return units + [_Unit([i], 0, layer_set.filters[i]) for i in layer_set.prunable if i not in grouped]


def _round_up(n, total, round_to):
    """Kept count n rounded up: 'pow2' -> next power of two, at least POW2_FLOOR; int N -> next multiple of N
    (so at least N); never above the layer's own size `total`."""
    if n == 0 or round_to is None:
        return n
    if round_to == 'pow2':                            # 8, 16, 32, ...: 1, 2 or 4 channels suit no accelerator
        r = max(POW2_FLOOR, 1 << (n - 1).bit_length())
    else:
        r = -(-n // round_to) * round_to
    return min(r, total)


def _emptied_message(empty, unit_score, flat, percent, threshold):
    """One line: which units the cut would empty, and the highest percent / threshold that empties none."""
    worst = min(float(s.max()) for s in unit_score)
    safe = math.floor(np.sum(flat < worst) / len(flat) * 1000) / 1000
    asked = f"{{percent}} {percent}" if percent is not None else f"{{threshold}} {threshold:g}"
    names = ', '.join('+'.join(map(str, u)) + f" (max score {s.max():.3g})" for u, s in empty[:6]) \
        + (f" and {len(empty) - 6} more" if len(empty) > 6 else '')
    return (f"{asked} would remove every channel of layer(s) {names}; the highest safe {{percent}} is {safe} (or "
            f"{{threshold}} up to {worst:.6g}), or pass {{min_keep}} K to keep the K strongest channels of such "
            "layers (or {layer_keep} F to keep a share F of every layer)")


def _unit_keep(score, cut, slices, min_keep, round_to, layer_keep=None):
    """The keep mask of one unit: `cut` (score >= threshold), with every one of its `slices` equal slices
    keeping the same count k = the largest count the cut keeps in any slice (each slice topped up with its own
    highest-score channels: no channel the cut keeps is removed for the constraint's sake); an emptied unit
    keeps min(min_keep, slice size) per slice; k raised to the floor ceil(layer_keep * slice size); then
    rounded up per `round_to`. -> (mask, topped: the unit was emptied or raised to the floor)."""
    size = len(score) // slices
    per = cut.reshape(slices, size)
    k, floor = int(per.sum(1).max()), keep_floor(size, layer_keep)
    topped = k < max(floor, 1)
    want = _round_up(max(k or min(min_keep or 0, size), floor), size, round_to)
    out = per.copy()
    for j in range(slices):
        if per[j].sum() != want:                    # strongest first; ties by channel index
            out[j] = False
            out[j, np.argsort(-score[j * size:(j + 1) * size], kind='stable')[:want]] = True
    return out.reshape(-1), topped


def keep_floor(size, layer_keep):
    """The fewest channels a layer of `size` keeps under `layer_keep` F: ceil(F * size), at least 1 (0 without
    F). The 1e-9 keeps F * size that is a whole number in exact arithmetic (0.1 * 30) from rounding up."""
    return max(1, math.ceil(layer_keep * size - 1e-9)) if layer_keep else 0


def _check_plan_options(layer_set, percent, threshold, min_keep, round_to, target_flops=None, layer_keep=None):
    """One-line errors, naming the parameter, for options no plan can follow."""
    if sum(v is not None for v in (percent, threshold, target_flops)) != 1:
        raise DarkslimError("give exactly one of {percent}, {threshold} and {target_flops}", param='percent')
    if min_keep is not None and min_keep < 1:
        raise DarkslimError(f"{{min_keep}} {min_keep}; expected a positive channel count", param='min_keep')
    if layer_keep is not None and not 0 < layer_keep < 1:
        raise DarkslimError(f"{{layer_keep}} {layer_keep}; expected the share of every layer's channels to keep, "
                            "in (0, 1)", param='layer_keep')
    if round_to not in (None, 'pow2') and (not isinstance(round_to, int) or round_to < 1):
        raise DarkslimError(f"{{round_to}} {round_to}; expected a positive channel count such as 8, 16 or 32",
                            param='round_to')
    if threshold is not None and threshold < 0:
        raise DarkslimError(f"{{threshold}} {threshold}; expected a score >= 0", param='threshold')
    if target_flops is not None and not 0 < target_flops < 1:
        raise DarkslimError(f"{{target_flops}} {target_flops}; expected the fraction of BFLOPs to remove, in (0, 1)",
                            param='target_flops')
    if not layer_set.prunable:
        raise DarkslimError(_no_prunable_message(layer_set))


def score_channels(model, layer_set, importance='gamma', images=None, normalize=None, keep=None):
    """{prunable conv: float64 scores}: the importance's scores (importance.Importance.scores)."""
    return get_importance(importance).scores(model, layer_set, images, keep=keep, normalize=normalize)


def make_plan(model, layer_set, strategy, percent=None, threshold=None, min_keep=None, round_to=None,
              importance='gamma', images=None, target_flops=None, normalize=None, greedy=False, img_hw=None,
              layer_keep=None, scores=None):
    """Keep masks for every prunable conv from a global threshold on the channels' scores.

    `importance` (a name in importance.IMPORTANCES, or an Importance) scores every prunable channel; `images`
    are the calibration images of a criterion that measures activations; `normalize` overrides its per-layer
    normalization; `greedy` (importances with `upstream`, e.g. l1): scores computed again without the input
    channels a first plan removes upstream, and the plan made again from them. Exactly one of `percent`
    (share of prunable channels to remove, global sort), `threshold` (channels scoring below it go) and
    `target_flops` (the lowest-score channels go until the compact model's BFLOPs at `img_hw`, default the
    model's input size, fall by at least that fraction; see `flops_threshold`). A shortcut group keeps the union
    of its members' masks (a channel goes only when every member would drop it: a unit's score is its
    members' maximum). A unit the threshold would empty raises a one-line DarkslimError naming the layers and
    the highest safe percent, unless `min_keep` K is given: then such a unit keeps its K highest-score channels
    (units keeping at least one channel are left as cut). `layer_keep` F: a floor, every unit keeps at least
    ceil(F * its channels) (per slice), its highest-score ones, so a global threshold cannot leave a layer a
    bottleneck far narrower than its width that fine-tuning cannot widen again (as tanluren's --layer_keep,
    which rounds down); no unit is then emptied. The channels of a group member beyond its group's width (a
    tail) are exempt: they may still all go, the member keeping its group's channels. `round_to` ('pow2' or N) rounds each unit's kept count
    up, filling with the highest-score channels (never past the layer's size). A unit split by a `[route]
    groups` route keeps the same count in every slice (`_unit_keep`); min_keep and round_to then apply per
    slice. A group member wider than its group (LayerSet.partial) shares the group's mask over the group's
    width; its other channels are cut (and rounded) on their own and may all go. `scores`: the importance's
    scores (score_channels) when the caller already has them, so that several plans cut one scoring.
    """
    _check_plan_options(layer_set, percent, threshold, min_keep, round_to, target_flops, layer_keep)
    imp = get_importance(importance)
    if scores is None:
        scores = score_channels(model, layer_set, imp, images, normalize)
    if greedy and imp.upstream:
        first = make_plan(model, layer_set, strategy, percent, threshold, min_keep, round_to, imp, images,
                          target_flops, normalize, img_hw=img_hw, layer_keep=layer_keep, scores=scores)
        scores = score_channels(model, layer_set, imp, images, normalize, keep=first.keep)
    hw = tuple(img_hw or model.img_size)
    if target_flops is not None:
        threshold = flops_threshold(model, layer_set, scores, target_flops, min_keep, round_to, hw, layer_keep)
    plan = plan_from_scores(layer_set, strategy, scores, percent, threshold, min_keep, round_to, layer_keep)
    plan.importance, plan.target_flops, plan.greedy = imp.name, target_flops, bool(greedy and imp.upstream)
    count_bflops(plan, model, hw)
    return plan


def count_bflops(plan, model, hw):
    """plan.bflops (total before, after) and plan.layer_bflops ({prunable conv: (before, after)}) at hw."""
    before = models.layer_table(model.defs, *hw)
    after = models.layer_table(compact_defs(model, plan), *hw)
    plan.bflops = (sum(r.bflops for r in before), sum(r.bflops for r in after))
    plan.layer_bflops = {i: (before[i].bflops, after[i].bflops) for i in plan.keep}


def plan_from_scores(layer_set, strategy, scores, percent=None, threshold=None, min_keep=None, round_to=None,
                     layer_keep=None):
    """The Plan cutting `scores` ({prunable conv: scores}) at `threshold` (or the `percent` lowest)."""
    flat = np.concatenate([scores[i] for i in layer_set.prunable])
    if threshold is None:
        threshold = threshold_for_percent(flat, percent)
    units = _units(layer_set)
    unit_score = [np.max(np.stack([scores[i][u.start:u.stop] for i in u.layers]), 0) for u in units]  # [channels]
    keeps = [s >= threshold for s in unit_score]
    empty = [(u.layers, s) for u, s, k in zip(units, unit_score, keeps) if not k.any() and not u.tail]
    if empty and min_keep is None and not layer_keep:
        whole = [s for u, s in zip(units, unit_score) if not u.tail]
        raise Emptied(_emptied_message(empty, whole, flat, percent, threshold), param='percent')
    keep, topped = _keep_masks(layer_set, units, unit_score, keeps, min_keep, round_to, layer_keep)
    removed = sum(int((~keep[i]).sum()) for i in layer_set.prunable)
    if removed == 0:
        asked = f"{{percent}} {percent}" if percent is not None else f"{{threshold}} {threshold:g}"
        after = ', after rounding' if round_to else ''
        after += f", after the {{layer_keep}} {layer_keep:g} floor" if layer_keep else ''
        raise NothingToPrune(f"nothing to prune: {asked} removes no channel of the {len(flat)} prunable ones "
                             f"(lowest score {flat.min():.4g}{after}); expected a larger {{percent}} or {{threshold}}"
                             + (" or a smaller {layer_keep}" if layer_keep else ''),
                             param='percent' if percent is not None else 'threshold')
    return Plan(strategy, layer_set, keep, float(threshold), percent, min_keep, round_to,
                removed / len(flat), sorted(topped), layer_keep=layer_keep)


def compact_bflops(model, keep, hw):
    """BFLOPs (as darknet counts them) of the network whose prunable convs keep `keep`, at hw = (h, w)."""
    defs = copy.deepcopy(model.defs)
    for i, k in keep.items():
        defs[i + 1]['filters'] = int(np.sum(k))
    return models.model_info(defs, *hw)[1]


def flops_threshold(model, layer_set, scores, target, min_keep, round_to, hw, layer_keep=None):
    """The score threshold removing the fewest lowest-score channels whose compact model has at most (1 - target)
    of the model's BFLOPs: a bisection over k, the number of lowest scores cut (ties go together). A cut that
    would empty a unit (without min_keep or layer_keep) is out of reach; a target beyond the reachable cut is
    refused (with layer_keep the floors are what limits it)."""
    flat = np.sort(np.concatenate([scores[i] for i in layer_set.prunable]))
    limit = (1 - target) * models.model_info(model.defs, *hw)[1]

    def cut(k):                                     # threshold between the k-th lowest score and the next higher
        above = flat[flat > flat[k - 1]]
        return float((flat[k - 1] + above[0]) / 2) if above.size else float(np.nextafter(flat[k - 1], np.inf))

    def bflops(k):                                  # None: the cut empties a unit
        try:
            plan = plan_from_scores(layer_set, 'flops', scores, None, cut(k), min_keep, round_to, layer_keep)
        except Emptied:
            return None
        except NothingToPrune:
            return float('inf')
        return compact_bflops(model, plan.keep, hw)

    lo, hi = 1, len(flat)                           # the largest reachable k: cuts up to it empty no unit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if bflops(mid) is not None else (lo, mid - 1)
    reach = bflops(lo)
    if reach is None or reach > limit:
        best = 'none' if reach in (None, float('inf')) else f"{1 - reach * (1 - target) / limit:.3f}"
        why, fix = ((f"with every layer keeping its {{layer_keep}} {layer_keep:g} share", "or {layer_keep}")
                    if layer_keep else ("without emptying a layer", "or {min_keep} K"))
        raise DarkslimError(f"{{target_flops}} {target}: the layer set can remove at most {best} of the BFLOPs "
                            f"{why}; expected a smaller {{target_flops}}, {fix}", param='target_flops')
    lo, hi = 1, lo                                  # the fewest channels that reach the target
    while lo < hi:
        mid = (lo + hi) // 2
        b = bflops(mid)
        lo, hi = (lo, mid) if b is not None and b <= limit else (mid + 1, hi)
    return cut(lo)


def _keep_masks(layer_set, units, unit_score, keeps, min_keep, round_to, layer_keep=None):
    """({conv: keep mask}, layers topped up to min_keep or layer_keep) from each unit's cut (see make_plan)."""
    topped = []
    keep = {i: np.zeros(layer_set.filters[i], dtype=bool) for i in layer_set.prunable}
    for u, s, cut in zip(units, unit_score, keeps):
        if not cut.any() and u.tail:                # a tail may go whole: its layer keeps its group's channels
            continue
        k, raised = _unit_keep(s, cut, layer_set.slices.get(u.layers[0], 1), min_keep, round_to, layer_keep)
        if raised:                                  # emptied (only reached with min_keep/layer_keep) or floored
            topped += u.layers
        for i in u.layers:
            keep[i][u.start:u.stop] = k
    return keep, topped


# --- step 3: surgery --------------------------------------------------------------------------------------------

def loose_model(model, plan, constants=None):
    """The full-size model with removed channels' gamma, beta zeroed and their constants folded (for checking).
    `constants`: optional per-layer constants of removed channels instead of act(beta) (see channel_flow).

    Fold (channels.conv_shift): a consumer conv reading removed channels with constant c gets, with BN,
    `running_mean -= W.sum(kh,kw) @ c`, without BN `bias += W.sum(kh,kw) @ c`. This is exact for 1x1
    consumers. For k x k consumers it is exact away from the image border; within k//2 cells of the border the
    zero padding would have multiplied some taps by 0 instead of c, so there the fold is an approximation (as
    in the network slimming paper). Removed channels then output act(0) = 0 (layer sets admit only
    activations with act(0) = 0).
    """
    loose = copy.deepcopy(model).eval()
    flow = channel_flow(model, plan.keep, constants)
    with torch.no_grad():
        for i in channels.convs(loose.module_defs):
            m = loose.module_list[i]
            if i > 0 and not bool(flow[i - 1][0].all()):
                fold_(m, loose.module_defs[i].get('batch_normalize', 0), conv_shift(m[0], flow[i - 1][1]))
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


def compact_model(model, plan, loose=None, constants=None):
    """The smaller network: kept output channels of every conv, kept input channels of every consumer (through
    route offsets and shortcut groups), heads' inputs sliced; weights taken from the loose model (folds
    included), so its output equals the loose model's.  `constants` (see channel_flow) is used only to build
    the loose model when none is given."""
    loose = loose_model(model, plan, constants) if loose is None else loose
    flow = channel_flow(model, plan.keep)
    small = models.Darknet(compact_defs(model, plan), img_size=model.img_size).eval()
    with torch.no_grad():
        for i in channels.convs(model.module_defs):
            src, dst = loose.module_list[i], small.module_list[i]
            k_out = flow[i][0]
            k_in = flow[i - 1][0] if i else torch.ones(src[0].in_channels, dtype=torch.bool)
            w = src[0].weight[k_out]
            if src[0].groups == 1:
                w = w[:, k_in]
            dst[0].weight.copy_(w)
            if src[0].bias is not None:
                dst[0].bias.copy_(src[0].bias[k_out])
            if model.module_defs[i].get('batch_normalize', 0):
                for name in ('weight', 'bias', 'running_mean', 'running_var'):
                    getattr(dst[1], name).copy_(getattr(src[1], name)[k_out])
                dst[1].num_batches_tracked.copy_(src[1].num_batches_tracked)
    small.header = getattr(model, 'header', None)
    if hasattr(model, 'seen'):
        small.seen = model.seen
    return small


# --- step 4: measure and write ----------------------------------------------------------------------------------

OUTPUT_EXTS = ('.cfg', '.weights', '.pt', '.json', '-channels.png')


def measure(model, hw, runs=5):
    """{'params', 'bflops', 'weights_bytes', 'latency_s'} of a model at input size hw (latency: median of `runs`
    batch-1 CPU passes of the fused model; None when runs is 0)."""
    params, bflops = models.model_info(model.defs, *hw)
    return {'params': params, 'bflops': bflops, 'weights_bytes': weights_file_size(model),
            'latency_s': cpu_latency(model, hw, runs)}


def channel_chart(plan, path, title=''):
    """PNG bar chart of every prunable conv's channels before and after `plan`."""
    from utils.plots import channel_chart as draw
    rows = plan.rows()
    return draw([r.layer for r in rows], [r.before for r in rows], [r.after for r in rows], path,
                title or f"{plan.strategy} prune: channels per layer, before (grey) / after (blue)")


def write_outputs(prefix, compact, plan, report):
    """PREFIX.cfg, .weights, .pt (with the plan), .json (report + plan), -channels.png, each written
    atomically; returns {ext: path}."""
    paths = {ext: prefix + ext for ext in OUTPUT_EXTS}
    write_cfg(paths['.cfg'], compact.defs)
    save_weights(compact, paths['.weights'])
    plan_json = plan.to_json()
    models.save_checkpoint(paths['.pt'], compact, prune=json.loads(json.dumps(plan_json)))
    write_text_atomic(paths['.json'], json.dumps({**report, 'plan': plan_json}, indent=1) + '\n')
    channel_chart(plan, paths['-channels.png'])
    return paths
