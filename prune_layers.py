"""Layer pruning for Darknet-cfg models: remove whole residual blocks, optionally channel-prune the rest.

A residual block is a [shortcut] that adds its `from` layer (the residual stream) to the output of its branch:
the convs strictly between the two (in Darknet-53 a 1x1 then a 3x3). Blocks are found from the cfg graph, never
from layer numbers; a [shortcut] whose branch is not a plain chain of convs is not a candidate (`BlockSet.rejected`
says why).

Score: the mean |gamma| of the BN of the branch's last conv (the one feeding the shortcut). Sparse training
`train.py -sr --prune 1` regularizes exactly these gammas (the shortcut layer set of prune_utils.get_layer_set);
`Block.regularized` is False (with the reason) for a block whose last conv is outside that set.

Removal: a block whose last gamma is ~0 outputs the per-channel constant c = act(beta), so its [shortcut] outputs
stream + c. Removing it (branch convs and [shortcut]) leaves the stream; c is carried through every later layer
whose value includes it ([shortcut] adds, [route] concatenates or slices, [maxpool] and [upsample] pass it: the
max of x + c is max(x) + c, darknet pads maxpool with -inf) until a conv consumes it, where it is folded:
W.sum(kh, kw) @ c goes into the conv's BN running_mean (or its bias without BN). The fold is exact for 1x1
consumers and for c = 0; for a k x k consumer it is exact away from the image border, and within k//2 cells of
the border the zero padding would have multiplied some taps by 0 instead of c (an approximation, as in the
channel fold). Blocks whose constant would reach a [yolo] without a conv between, or pass a [shortcut] with a
non-linear activation (act(x + c) is no shift of act(x)), are not candidates.

    block_set = find_blocks(model.module_defs)          # candidates + rejected, from the graph
    plan = make_layer_plan(model, n_blocks)              # the n lowest-scoring candidates go
    compact = compact_layer_model(model, plan)           # fewer layers; cfg = compact.defs
    result = prune(model, n_blocks, percent=0.3)         # layers, then channels (shortcut mode), as one call
"""
import copy
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from terminaltables import AsciiTable

import calibrate
import channels
import models
import prune_utils
from importance import get_importance
from utils.errors import DarkslimError
from utils.parse_config import conv_geometry

STRATEGY = 'layer'
SPARSE_MODE = 'shortcut'      # the layer set whose gammas `train.py -sr --prune 1` regularizes


def score_label(importance='gamma'):
    """What a block's score is, for tables and the JSON."""
    if get_importance(importance).name == 'fold':
        return "head-output error of removing the block alone (mean fold)"
    return f"mean {get_importance(importance).label} of the last branch conv's channels"


# --- blocks -----------------------------------------------------------------------------------------------------

@dataclass
class Block:
    """One residual block: [shortcut] `shortcut` adds layer `source` (its `from`) to the output of `branch`, the
    convs source+1 .. shortcut-1, each reading the one before. Removing the block deletes `branch` and `shortcut`.

    score: the mean importance score of the last branch conv's channels (None until scored)
    regularized: whether `train.py -sr --prune 1` regularizes that gamma; `note` says why not
    """
    shortcut: int
    source: int
    branch: list
    score: float = None
    regularized: bool = True
    note: str = ''

    @property
    def last(self):
        return self.branch[-1]

    @property
    def layers(self):
        return self.branch + [self.shortcut]


@dataclass
class BlockSet:
    """Every [shortcut] of a cfg: candidate blocks (layer order) and the others -> why they are not candidates."""
    candidates: list = field(default_factory=list)
    rejected: dict = field(default_factory=dict)

    def by_score(self):
        """Candidates from the lowest score to the highest (ties: lower layer first)."""
        return sorted(self.candidates, key=lambda b: (b.score, b.shortcut))


def _branch_problem(defs, graph, readers, s, f):
    """Why the layers between `from` layer f and [shortcut] s are no removable branch, or ''."""
    branch = list(range(f + 1, s))
    if not branch:
        return f"from={defs[s]['from'][0]} adds the previous layer: no branch between"
    other = [j for j in branch if not channels.is_conv(defs[j])]
    if other:
        return f"branch {f + 1}..{s - 1} holds [{defs[other[0]]['type']}] {other[0]}; expected a plain chain of convs"
    for j in branch:
        outside = [r for r in readers.get(j, []) if r != j + 1]
        if outside:
            return f"layer {outside[0]} reads branch layer {j}; expected the branch to feed only [shortcut] {s}"
        size, stride, pad, _ = conv_geometry(defs[j])
        if stride != 1 or 2 * pad != size - 1:
            return f"branch conv {j} ({size}x{size}/{stride}, padding {pad}) changes the feature-map size"
    if graph.channels[f] != graph.channels[s - 1]:
        return f"adds {graph.channels[s - 1]} channels to {graph.channels[f]}; expected equal counts"
    last = defs[s - 1]
    if not last.get('batch_normalize', 0):
        return f"last branch conv {s - 1} has no BN (no gamma to score)"
    act = last.get('activation', 'logistic')
    if act not in channels.ZERO_AT_ZERO:
        return f"last branch conv {s - 1} activation {act} (act(0) != 0)"
    return ''


def find_blocks(module_defs, in_channels=3):
    """The candidate residual blocks of a cfg's layer sections (`model.module_defs`) and why every other
    [shortcut] is not one. Each candidate's last conv is checked against the shortcut layer set (what
    `train.py -sr --prune 1` regularizes)."""
    defs = list(module_defs)
    graph = channels.Graph(defs, in_channels)
    readers = graph.readers()
    sparse = prune_utils.get_layer_set(defs, SPARSE_MODE, in_channels)
    out = BlockSet()
    for s in channels.layers_of_kind(defs, 'sum'):
        d = defs[s]
        if len(d['from']) != 1:
            out.rejected[s] = f"adds {len(d['from']) + 1} layers (from={','.join(map(str, d['from']))}); expected one"
            continue
        act = d.get('activation', 'linear')
        f = graph.inputs[s][1]
        why = (f"activation {act} (removing it turns act(x + branch) into x, no constant shift)"
               if act != 'linear' else _branch_problem(defs, graph, readers, s, f)
               or channels.constant_reach_problem(graph, s))
        if why:
            out.rejected[s] = why
            continue
        block = Block(s, f, list(range(f + 1, s)))
        if block.last not in sparse.prunable:
            block.regularized = False
            block.note = (f"layer {block.last} is not in the {SPARSE_MODE} layer set "
                          f"({sparse.excluded.get(block.last, 'not a BN conv')}): -sr --prune 1 leaves its gamma alone")
        out.candidates.append(block)
    return out


def score_blocks(model, block_set, importance='gamma', images=None):
    """Set each candidate's score: for 'fold', its measured damage (block_damage); otherwise the mean
    `importance` score of its last conv's channels (float64; for 'gamma', the mean |gamma| of its BN,
    tanluren's layer-pruning criterion)."""
    if get_importance(importance).name == 'fold':
        return block_damage(model, block_set, images)
    scores = get_importance(importance).scores(model, [b.last for b in block_set.candidates], images)
    for b in block_set.candidates:
        b.score = float(scores[b.last].mean())
    return block_set


def block_damage(model, block_set, images, batch=8):
    """Set each candidate's score to the damage its removal alone does: the block replaced by its measured mean
    output (folded into the consumers, as a calibrated layer prune does), the mean squared change of every raw
    head output on the calibration `images`, summed over heads (PRACTISE, Wang et al. 2023, ranks blocks by
    such a recoverability measure)."""
    if images is None:
        raise DarkslimError("{importance} fold measures each block's damage on images: expected calibration "
                            "images ({calib} N)", param='importance')
    means = calibrate.mean_activations(model, [b.last for b in block_set.candidates], images, batch)
    ref = _head_outputs(model, images, batch)
    for b in block_set.candidates:
        loose = loose_layer_model(model, LayerPlan(block_set, [b], [], {}, {}), means)
        got = _head_outputs(loose, images, batch)
        b.score = float(sum(((g - r) ** 2).mean() for g, r in zip(got, ref)))
    return block_set


def _head_outputs(model, images, batch):
    """The raw [yolo] inputs of every head on `images`, concatenated over batches (float64)."""
    outs = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            raw = model.eval()(images[s:s + batch])[1]
            outs.append([r.double() for r in raw])
    return [torch.cat(parts) for parts in zip(*outs)]


# --- plan -------------------------------------------------------------------------------------------------------

@dataclass
class LayerPlan:
    """Which residual blocks go, the layer numbering after, and optionally a channel plan for the rest.

    removed:     the blocks removed (layer order); block_set: every candidate (scored) and rejected shortcut
    keep_layers: original indices of the layers kept, in order (new layer k = original keep_layers[k])
    where:       original layer -> new index of the layer now holding its value (a removed [shortcut]: its
                 stream's layer); branch convs of removed blocks are absent
    filters:     original BN conv -> filters (before)
    channel_plan: prune_utils.Plan over the block-pruned network (its numbering), or None
    """
    block_set: BlockSet
    removed: list
    keep_layers: list
    where: dict
    filters: dict
    channel_plan: object = None
    strategy: str = STRATEGY
    importance: str = 'gamma'

    def final_filters(self, i):
        """Filters of original conv i in the pruned network (0 when its block was removed)."""
        if i not in self.where or self.keep_layers[self.where[i]] != i:
            return 0
        keep = self.channel_plan.keep if self.channel_plan is not None else {}
        new = self.where[i]
        return int(np.sum(keep[new])) if new in keep else self.filters[i]

    def rows(self):
        """One prune_utils.PlanRow per original BN conv (layer numbers of the original cfg)."""
        out = []
        for i in sorted(self.filters):
            after = self.final_filters(i)
            out.append(prune_utils.PlanRow(i, self.filters[i], after, after / self.filters[i],
                                           'removed' if after == 0 else ''))
        return out

    def table(self):
        """Every candidate by score (lowest first), the rejected shortcuts, and what goes."""
        gone = {b.shortcut for b in self.removed}
        rows = [['rank', 'shortcut', 'from', 'branch convs', 'score', 'removed', '-sr --prune 1']]
        for r, b in enumerate(self.block_set.by_score(), 1):
            rows.append([r, b.shortcut, b.source, ','.join(map(str, b.branch)), f"{b.score:.6g}",
                         'yes' if b.shortcut in gone else '', 'yes' if b.regularized else 'NO'])
        text = AsciiTable(rows, " candidate blocks ").table + f"\nscore: {score_label(self.importance)}"
        for s, why in sorted(self.block_set.rejected.items()):
            text += f"\n[shortcut] {s} is not a candidate: {why}"
        for b in self.block_set.candidates:
            if not b.regularized:
                text += f"\nwarning: block {b.shortcut}: {b.note}"
        n_layers = sum(len(b.layers) for b in self.removed)
        text += (f"\n{len(self.removed)} of {len(self.block_set.candidates)} candidate blocks removed "
                 f"({n_layers} layers): shortcuts {[b.shortcut for b in self.removed]}")
        return text

    def to_json(self):
        return {'strategy': self.strategy, 'importance': self.importance, 'score': score_label(self.importance),
                'sparse_mode': SPARSE_MODE,
                'n_blocks': len(self.removed),
                'removed': [dataclasses.asdict(b) for b in self.removed],
                'candidates': [dataclasses.asdict(b) for b in self.block_set.by_score()],
                'rejected': {str(k): v for k, v in sorted(self.block_set.rejected.items())},
                'layer_map': {str(i): n for i, n in sorted(self.where.items())},
                'layers': [dataclasses.asdict(r) for r in self.rows()],
                'channel': None if self.channel_plan is None else self.channel_plan.to_json()}


def _layer_map(n_layers, removed):
    """(kept original indices, original layer -> new index of the layer holding its value)."""
    gone = {j for b in removed for j in b.layers}
    keep = [i for i in range(n_layers) if i not in gone]
    where = {old: new for new, old in enumerate(keep)}
    for b in sorted(removed, key=lambda b: b.shortcut):   # a source may be an earlier removed shortcut
        where[b.shortcut] = where[b.source]
    return keep, where


def make_layer_plan(model, n_blocks, importance='gamma', images=None, shortcuts=None):
    """The plan removing the `n_blocks` candidate blocks with the lowest scores (0 removes nothing), or, for a
    replay, exactly the candidate blocks ending at `shortcuts` (a stored plan's removed shortcuts)."""
    block_set = score_blocks(model, find_blocks(model.module_defs, model.in_channels), importance, images)
    n_cand = len(block_set.candidates)
    if shortcuts is not None:
        by_shortcut = {b.shortcut: b for b in block_set.candidates}
        wrong = [s for s in shortcuts if s not in by_shortcut]
        if wrong:
            raise DarkslimError(f"{{plan}}: removes blocks at [shortcut] {wrong}, which are no candidate blocks of "
                                f"this cfg (candidates: {sorted(by_shortcut)}); expected the model the plan was "
                                "made for", param='plan')
        removed = [by_shortcut[s] for s in sorted(shortcuts)]
    elif not isinstance(n_blocks, int) or not 0 <= n_blocks <= n_cand:
        n_short = n_cand + len(block_set.rejected)
        raise DarkslimError(f"{{n_blocks}} {n_blocks}: the cfg has {n_cand} candidate residual blocks (of {n_short} "
                            f"[shortcut] layers); expected {{n_blocks}} in 0..{n_cand}", param='n_blocks')
    else:
        removed = sorted(block_set.by_score()[:n_blocks], key=lambda b: b.shortcut)
    keep, where = _layer_map(len(model.module_defs), removed)
    filters = {i: model.module_defs[i]['filters'] for i in channels.convs(model.module_defs, bn=True)}
    return LayerPlan(block_set, removed, keep, where, filters, importance=get_importance(importance).name)


# --- surgery ----------------------------------------------------------------------------------------------------

def block_constant(model, block, constants=None):
    """What the block's branch outputs once removed [C] (float64): act(beta) of its last conv (gamma = 0), or
    its measured mean activation when `constants` ({conv: [C]}, calibrate.mean_activations) names that conv."""
    if constants is not None and block.last in constants:
        return torch.as_tensor(constants[block.last]).detach().double().cpu()
    m = model.module_list[block.last]
    with torch.no_grad():
        return m[-1](m[1].bias.detach().double().cpu())


def conv_shifts(model, removed, constants=None):
    """Original conv index -> the shift [out] (float64) its input's constant adds to its output once the
    `removed` blocks are gone (channels.block_constants; `constants` as in block_constant): folded into the
    conv's BN running_mean (subtracted) or bias (added). Branch convs of removed blocks are left out."""
    const = channels.block_constants(model, removed, lambda b: block_constant(model, b, constants))
    branch = {j for b in removed for j in b.branch}
    return {i: channels.conv_shift(model.module_list[i][0], const[i - 1]) for i in channels.convs(model.module_defs)
            if i > 0 and i not in branch and const[i - 1] is not None}


def _renumber(value, old, new, where):
    """A `layers` / `from` entry of original layer `old` (now layer `new`): absolute stays absolute, relative
    stays relative, pointing at the layer that now holds the original target's value."""
    target = where[value if value >= 0 else old + value]
    return target if value >= 0 else target - new


def compact_layer_defs(model, plan):
    """[net] + the kept layer sections; every [route] `layers` and [shortcut] `from` renumbered, all other keys
    (and [net], [yolo]) unchanged."""
    defs = [copy.deepcopy(model.hyperparams)]
    for new, old in enumerate(plan.keep_layers):
        d = copy.deepcopy(model.module_defs[old])
        key = {'concat': 'layers', 'sum': 'from'}.get(channels.kind(d))
        if key:
            d[key] = [_renumber(v, old, new, plan.where) for v in d[key]]
        if channels.kind(d) != 'concat' and old > 0 and plan.where.get(old - 1) != new - 1:
            # its implicit input (the previous layer) must still hold the same value
            raise RuntimeError(f"layer {old}: layer {old - 1} is no longer the layer before (block-set bug)")
        defs.append(d)
    return defs


def _copy_conv_(dst, src, batch_normalize):
    """Copy one conv layer's tensors (conv weight, bias; BN weight, bias, running stats) into another's."""
    with torch.no_grad():
        dst[0].weight.copy_(src[0].weight)
        if src[0].bias is not None:
            dst[0].bias.copy_(src[0].bias)
        if batch_normalize:
            for name in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'):
                getattr(dst[1], name).copy_(getattr(src[1], name))


def compact_layer_model(model, plan, constants=None):
    """The network without the removed blocks: kept layers' tensors copied one by one, the removed blocks'
    constants (act(beta), or `constants` as in block_constant) folded into the convs that consume them. Its
    cfg is `.defs`."""
    small = models.Darknet(compact_layer_defs(model, plan), img_size=model.img_size, init_weights=False).eval()
    shifts = conv_shifts(model, plan.removed, constants)
    for new, old in enumerate(plan.keep_layers):
        d = model.module_defs[old]
        if not channels.is_conv(d):
            continue
        bn = d.get('batch_normalize', 0)
        _copy_conv_(small.module_list[new], model.module_list[old], bn)
        if old in shifts:
            channels.fold_(small.module_list[new], bn, shifts[old])
    small.header = getattr(model, 'header', None)
    if hasattr(model, 'seen'):
        small.seen = model.seen
    return small.to(next(model.parameters()).device)


def loose_layer_model(model, plan, constants=None):
    """The full-depth model with each removed block's branch silenced (last BN gamma = beta = 0, so it adds
    act(0) = 0) and its constant folded as in the compact model: the compact model's outputs, at full depth."""
    loose = copy.deepcopy(model).eval()
    for i, shift in conv_shifts(model, plan.removed, constants).items():
        channels.fold_(loose.module_list[i], model.module_defs[i].get('batch_normalize', 0), shift)
    with torch.no_grad():
        for b in plan.removed:
            loose.module_list[b.last][1].weight.zero_()
            loose.module_list[b.last][1].bias.zero_()
    return loose


# --- layers + channels ------------------------------------------------------------------------------------------

@dataclass
class LayerPruneResult:
    """plan: the LayerPlan (with its channel plan, if any); the three networks a prune report compares:
    original, loose (full size: blocks silenced, or - with a channel prune - the block-pruned network with
    removed channels zeroed) and compact (what is written)."""
    plan: LayerPlan
    original: object
    loose: object
    compact: object
    layer_set: object = None     # the channel prune's LayerSet (block-pruned numbering), or None

    @property
    def nets(self):
        return {'original': self.original, 'loose': self.loose, 'compact': self.compact}


def prune(model, n_blocks, percent=None, threshold=None, min_keep=None, round_to=None, importance='gamma'):
    """Remove the `n_blocks` lowest-scoring residual blocks; with `percent` or `threshold`, then prune the
    channels of the remaining network in shortcut mode (prune_utils.make_plan: min_keep, round_to as there).
    Every refusal (too many blocks, a bad channel plan) is raised before any surgery output is returned.
    Calibrated layer pruning (measured constants, refit, BN statistics) is pruning.prune."""
    plan = make_layer_plan(model, n_blocks, importance)
    if percent is None and threshold is None:
        if min_keep is not None or round_to is not None:
            raise DarkslimError("{min_keep} and {round_to} apply to the channel prune; expected {percent} or "
                                "{threshold} with them", param='min_keep')
        return LayerPruneResult(plan, model, loose_layer_model(model, plan), compact_layer_model(model, plan))
    stage = compact_layer_model(model, plan)
    layer_set = prune_utils.get_layer_set(stage.module_defs, SPARSE_MODE, stage.in_channels)
    plan.channel_plan = prune_utils.make_plan(stage, layer_set, SPARSE_MODE, percent, threshold, min_keep, round_to,
                                              importance)
    loose = prune_utils.loose_model(stage, plan.channel_plan)
    compact = prune_utils.compact_model(stage, plan.channel_plan, loose)
    return LayerPruneResult(plan, model, loose, compact, layer_set)
