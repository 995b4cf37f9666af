"""How channels flow through each layer type of a Darknet cfg: one rule per type, used by every walker.

Every question the pruning code asks about channels is a walk over the layers in order, computing one value
per layer from the values of the layers it reads: where each channel comes from (`Graph`), which channels a
prune keeps and what constant the removed ones leave behind (`channel_flow`), what constant removed residual
blocks leave in the stream (`block_constants`), which layers see a changed input (`changed_layers`) and
whether a constant could reach a layer that cannot absorb it (`constant_reach_problem`). The layer types
differ only in what they do with channels, which `RULES` states once:

    produce  [convolutional]  new channels computed from its input (it consumes its input's channels)
    sum      [shortcut]       the element-wise sum of its inputs: the first input's width, the others add to
                              the channels they overlap (inputs of unequal widths, as in yolov3-tiny-prn)
    concat   [route]          its inputs' channels in order; with `groups=g`, slice `group_id` of each input
    pass     [maxpool]        channels unchanged (a constant passes too: max(x + c) = max(x) + c, darknet pads
             [upsample]       with -inf; upsampling repeats values)
    consume  [yolo]           a head: reads its input, nothing reads it; its value is its input's

A walker subclasses `Walker` and says what its value is for the image (`image`), a conv (`produce`) and a
shortcut (`sum`); route slicing/concatenation, pass-through and the overlap rule are shared here. Values are
tuples of per-channel vectors (torch or numpy) unless a walker overrides `width`/`part`/`cat`.

Adding a layer type: its shape in `utils.parse_config.SHAPE_RULES`, its module in `models.create_modules`,
and its channel behaviour here in `RULES` (one of the five kinds, or a new kind with a default method in
`Walker`).
"""
from dataclasses import dataclass

import numpy as np
import torch

from utils.parse_config import layer_inputs

IMAGE = -1                                          # the node standing for the network input
ZERO_AT_ZERO = {'leaky', 'relu', 'linear', 'mish', 'swish'}  # act(0) == 0: a zeroed BN channel outputs exactly 0


@dataclass(frozen=True)
class Rule:
    """What a layer type does with channels: 'produce' | 'sum' | 'concat' | 'pass' | 'consume'."""
    kind: str


RULES = {'convolutional': Rule('produce'), 'shortcut': Rule('sum'), 'route': Rule('concat'),
         'maxpool': Rule('pass'), 'upsample': Rule('pass'), 'yolo': Rule('consume')}


def kind(d):
    """The channel rule kind of a layer section (a `module_defs` entry)."""
    return RULES[d['type']].kind


def is_conv(d):
    return kind(d) == 'produce'


def convs(defs, bn=None):
    """Indices of the conv layers (bn=True: with batch_normalize; False: without; None: all)."""
    return [i for i, d in enumerate(defs)
            if is_conv(d) and (bn is None or bool(d.get('batch_normalize', 0)) == bn)]


def layers_of_kind(defs, *kinds):
    return [i for i, d in enumerate(defs) if kind(d) in kinds]


def all_inputs(defs):
    """Per layer, the indices of the layers it reads ([] = the image)."""
    full = [None] + list(defs)                      # layer_inputs expects [net] at index 0
    return [layer_inputs(full, i) for i in range(len(defs))]


class Walker:
    """One value per layer, computed in layer order from the values of the layers each reads (see RULES).

    Subclasses define `image(n)`, `produce(i, x)` (a conv reading value x) and `sum(i, xs)` (a shortcut; the
    default is the overlap rule over `add`); `consume(i, x)` defaults to x. `run()` returns the list of values.
    """

    def __init__(self, defs, in_channels=3, inputs=None):
        self.defs = list(defs)
        self.in_channels = in_channels
        self.inputs = inputs if inputs is not None else all_inputs(self.defs)

    # --- value type: a tuple of per-channel vectors -------------------------------------------------------------
    def width(self, x):
        return len(x[0])

    def part(self, x, start, n):
        return tuple(a[start:start + n] for a in x)

    def cat(self, xs):
        return tuple(torch.cat(parts) if torch.is_tensor(parts[0]) else np.concatenate(parts)
                     for parts in zip(*xs))

    # --- per kind ------------------------------------------------------------------------------------------------
    def image(self, n):
        raise NotImplementedError

    def produce(self, i, x):
        raise NotImplementedError

    def add(self, i, total, x, n):
        """Add value x's first n channels to `total`'s (the overlap of a [shortcut]'s inputs)."""
        raise NotImplementedError

    def sum(self, i, xs):
        """The first input's width; every other input adds to the channels it overlaps."""
        total = xs[0]
        for x in xs[1:]:
            total = self.add(i, total, x, min(self.width(total), self.width(x)))
        return total

    def concat(self, i, xs):
        g, gid = self.defs[i].get('groups', 1), self.defs[i].get('group_id', 0)
        return self.cat([self.part(x, gid * (self.width(x) // g), self.width(x) // g) for x in xs])

    def consume(self, i, x):
        return x

    def run(self):
        values = []
        for i, d in enumerate(self.defs):
            xs = [values[j] for j in self.inputs[i]] or [self.image(self.in_channels)]
            k = kind(d)
            if k == 'produce':
                values.append(self.produce(i, xs[0]))
            elif k == 'sum':
                values.append(self.sum(i, xs))
            elif k == 'concat':
                values.append(self.concat(i, xs))
            elif k == 'consume':
                values.append(self.consume(i, xs[0]))
            else:                                   # pass
                values.append(xs[0])
        return values


# --- provenance ---------------------------------------------------------------------------------------------------

class Graph(Walker):
    """Channel provenance of every layer: `segs[i]` = [(node, start, length), ...] in channel order, a node being
    a conv (its output channels), a shortcut (a channel-wise sum: a node of its own) or the image (IMAGE)."""

    def __init__(self, defs, in_channels=3):
        super().__init__(defs, in_channels)
        self.segs = self.run()
        self.channels = [self.width(s) for s in self.segs]

    def width(self, x):
        return sum(n for _, _, n in x)

    def part(self, x, start, n):
        out, pos = [], 0
        for node, s, m in x:
            a, b = max(start, pos), min(start + n, pos + m)
            if a < b:
                out.append((node, s + a - pos, b - a))
            pos += m
        return out

    def cat(self, xs):
        return [seg for x in xs for seg in x]

    def image(self, n):
        return [(IMAGE, 0, n)]

    def produce(self, i, x):
        return [(i, 0, self.defs[i]['filters'])]

    def sum(self, i, xs):
        return [(i, 0, self.width(xs[0]))]

    def whole_node(self, j):
        """The node layer j's output is (all of it, in order), or None when it is a slice or a concatenation."""
        segs = self.segs[j]
        if len(segs) == 1:
            node, start, n = segs[0]
            if start == 0 and n == self.node_channels(node):
                return node
        return None

    def node_channels(self, node):
        return self.in_channels if node == IMAGE else self.channels[node]

    def nodes_read_by(self, i):
        """Nodes whose channels layer i reads (through pass-through layers)."""
        return sorted({n for j in self.inputs[i] for n, _, _ in self.segs[j]}) if self.inputs[i] else [IMAGE]

    def readers(self):
        """layer -> the layers that read it."""
        out = {}
        for i, ins in enumerate(self.inputs):
            for j in ins:
                out.setdefault(j, []).append(i)
        return out


# --- kept channels and the constants of removed ones ----------------------------------------------------------------

class _ChannelFlow(Walker):
    def __init__(self, model, keep, constants):
        super().__init__(model.module_defs, model.in_channels, model.inputs)
        self.model, self.keep, self.constants = model, keep, constants

    def image(self, n):
        return torch.ones(n, dtype=torch.bool), torch.zeros(n)

    def produce(self, i, x):
        n = self.defs[i]['filters']
        if i not in self.keep:
            return torch.ones(n, dtype=torch.bool), torch.zeros(n)
        m = self.model.module_list[i]
        k = torch.as_tensor(self.keep[i], dtype=torch.bool)
        if self.constants is not None and i in self.constants:
            c = torch.as_tensor(self.constants[i]).detach().float().cpu().reshape(n)
        else:
            with torch.no_grad():
                c = m[-1](m[1].bias.detach().float().cpu())     # act(beta)
        return k, torch.where(k, torch.zeros_like(c), c)

    def add(self, i, total, x, n):
        if not torch.equal(x[0][:n], total[0][:n]):
            raise RuntimeError(f"layer {i}: [shortcut] inputs lose different channels (layer-set bug)")
        c = total[1].clone()
        c[:n] += x[1][:n]
        return total[0], c

    def sum(self, i, xs):
        k, total = super().sum(i, xs)
        with torch.no_grad():
            c = self.model.module_list[i].act(total)
        return k, torch.where(k, torch.zeros_like(c), c)


def channel_flow(model, keep, constants=None):
    """Per layer: (kept output channels [C] bool, constant [C] float) after removing channels per `keep`
    ({conv layer: bool mask}).

    A removed BN channel (gamma ~ 0 after sparsity training) outputs the constant act(beta); `constants`
    ({conv layer index: float tensor [filters]}, optional) replaces act(beta) for the layers it names, e.g. by
    the channels' mean activations on images (calibrate.py) for a model that was not sparse-trained.
    Constants flow as RULES say; a [shortcut] outputs act(sum), and a shortcut channel is removed only when it
    is removed in every input (shortcut groups share their mask, so it is).
    """
    return _ChannelFlow(model, keep, constants).run()


class _BlockConstants(Walker):
    """Values (constant [C] float64, carries [C] bool) once `removed` residual blocks are gone."""

    def __init__(self, model, removed, block_constant):
        super().__init__(model.module_defs, model.in_channels, model.inputs)
        self.by_shortcut = {b.shortcut: b for b in removed}
        self.branch = {j for b in removed for j in b.branch}
        self.block_constant = block_constant

    def image(self, n):
        return torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)

    def produce(self, i, x):                        # a conv absorbs what it reads (conv_shifts folds it)
        return self.image(self.defs[i]['filters'])

    def add(self, i, total, x, n):
        c, carries = total[0].clone(), total[1].clone()
        c[:n] += x[0][:n]
        carries[:n] |= x[1][:n]
        return c, carries

    def sum(self, i, xs):
        if i in self.by_shortcut:                   # the block is gone: its stream + act(beta)
            b = self.by_shortcut[i]
            stream = xs[1]                          # inputs are [previous = the branch's last conv, source]
            c = self.block_constant(b)
            return stream[0] + c, torch.ones(len(c), dtype=torch.bool)
        if i in self.branch:
            return self.image(self.width(xs[0]))
        out = super().sum(i, xs)
        if out[1].any() and self.defs[i].get('activation', 'linear') != 'linear':
            raise RuntimeError(f"layer {i}: a constant reaches a non-linear [shortcut] (block-set bug)")
        return out

    def consume(self, i, x):
        if x[1].any():
            raise RuntimeError(f"layer {i}: a constant reaches a [yolo] (block-set bug)")
        return x


def block_constants(model, removed, block_constant):
    """Per layer: the constant [C] (float64) its value carries once the `removed` residual blocks are gone
    (original value = the pruned network's value + constant), None where it carries none. `block_constant(b)`
    is what block b's branch outputs with its last gamma at 0 (act(beta)). Convs absorb what they read."""
    return [c if carries.any() else None for c, carries in _BlockConstants(model, removed, block_constant).run()]


# --- which layers see a change ----------------------------------------------------------------------------------------

class _Changed(Walker):
    """Values (changed [C] bool,): does the layer's output differ from the original's (a conv: all or none)."""

    def __init__(self, defs, in_channels, inputs, input_loses):
        super().__init__(defs, in_channels, inputs)
        self.input_loses = input_loses

    def image(self, n):
        return (torch.zeros(n, dtype=torch.bool),)

    def produce(self, i, x):
        changed = bool(x[0].any()) or (i > 0 and self.input_loses(i))
        return (torch.full((self.defs[i]['filters'],), changed),)

    def add(self, i, total, x, n):
        return (torch.full_like(total[0], bool(total[0].any() or x[0].any())),)


def changed_layers(model, keep):
    """Conv layers whose input a channel prune (`keep`) changes: the consumers of removed channels and every
    conv after them in the graph; the others see exactly the original inputs."""
    flow = channel_flow(model, keep)
    walker = _Changed(model.module_defs, model.in_channels, model.inputs,
                      lambda i: not bool(flow[i - 1][0].all()))
    values = walker.run()
    return [i for i in convs(model.module_defs) if bool(values[i][0].any())]


class _Reach(Walker):
    """Values (reached [C] bool,): which channels carry the constant of layer `source` (convs absorb it)."""

    def __init__(self, defs, in_channels, inputs, source):
        super().__init__(defs, in_channels, inputs)
        self.source, self.problem = source, ''

    def image(self, n):
        return (np.zeros(n, dtype=bool),)

    def produce(self, i, x):
        return (np.zeros(self.defs[i]['filters'], dtype=bool),)

    def add(self, i, total, x, n):
        reached = total[0].copy()
        reached[:n] |= x[0][:n]
        return (reached,)

    def sum(self, i, xs):
        if i == self.source:
            return (np.ones(self.width(xs[0]), dtype=bool),)
        out = super().sum(i, xs)
        act = self.defs[i].get('activation', 'linear')
        if out[0].any() and act != 'linear' and not self.problem:
            self.problem = (f"its constant would pass [shortcut] {i} activation {act} "
                            "(not linear: act(x + c) is no shift of act(x))")
        return out

    def consume(self, i, x):
        if x[0].any() and not self.problem:
            self.problem = f"its constant act(beta) would reach [yolo] {i} with no conv between to absorb it"
        return x


def constant_reach_problem(graph, source):
    """Why a constant added to [shortcut] `source`'s output could not be folded (a layer it reaches absorbs no
    shift: a [yolo], a non-linear [shortcut]), or ''."""
    walker = _Reach(graph.defs, graph.in_channels, graph.inputs, source)
    walker.run()
    return walker.problem


# --- the constant fold ----------------------------------------------------------------------------------------------

def conv_shift(conv, const):
    """What a constant input adds to each output channel of `conv`: W.sum(kh, kw) @ const per group [out]
    (float64, on the conv's device). `const` [in] holds 0 for the channels that carry none."""
    w = conv.weight.detach()
    g = conv.groups
    sums = w.sum((2, 3)).double()                                  # [out, in / groups]
    sums = sums.view(g, sums.shape[0] // g, sums.shape[1])         # [groups, out / groups, in / groups]
    c = const.detach().double().to(w.device).view(g, -1)           # [groups, in / groups]
    return torch.einsum('goi,gi->go', sums, c).reshape(-1)


def fold_(module, batch_normalize, shift):
    """conv(x + c) = conv(x) + shift: BN(z + shift) = BN'(z) with running_mean - shift; bias + shift without BN."""
    with torch.no_grad():
        if batch_normalize:
            module[1].running_mean.sub_(shift.to(module[1].running_mean))
        else:
            module[0].bias.add_(shift.to(module[0].bias))
