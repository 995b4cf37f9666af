"""One prune of any strategy, as a library call: options in, plan and models out.

    result = prune(model, 'shortcut', PruneOptions(percent=0.5))                # channels
    result = prune(model, 'layer', PruneOptions(n_blocks=4, percent=0.3))       # blocks, then channels
    result = prune(model, 'tiny', PruneOptions(percent=0.1), images=images)      # calibrated (not sparse-trained)
    result = prune(model, 'shortcut', PruneOptions(plan=stored))                 # replay a stored plan exactly

Strategies: normal and regular (the normal layer set; regular rounds kept counts), shortcut, tiny (their
layer sets, prune_utils.get_layer_set) and layer (prune_layers: residual blocks, then optionally channels in
shortcut mode). With calibration `images` the surgery uses them (calibrate.py): measured mean constants,
least-squares refit of the convs that lost inputs, BatchNorm statistics; for removed blocks, the measured
mean output of the branch replaces act(beta) and the BN statistics after the first removed block are
re-estimated.
"""
import copy
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

import calibrate
import channels
import models
import prune_layers
import prune_utils
from utils.errors import DarkslimError

MODE_OF = {'normal': 'normal', 'regular': 'normal', 'shortcut': 'shortcut', 'tiny': 'tiny',
           'layer': prune_layers.SPARSE_MODE}
STRATEGIES = tuple(MODE_OF)


@dataclass
class PruneOptions:
    """What to remove. Channels: exactly one of `percent`, `threshold` and `target_flops` (the fraction of the
    model's BFLOPs at `img_hw` to remove; none for a block-only layer prune), `min_keep`, `layer_keep` (a floor:
    the share of every prunable layer kept at least), `round_to` ('pow2' or N), `importance`
    (importance.IMPORTANCES), `greedy` (l1: norms without inputs removed upstream). Blocks: `n_blocks`.
    `calib_steps`: the calibration steps run when images are given. `plan`: a stored plan (Plan.to_json or
    LayerPlan.to_json) to replay instead of choosing channels and blocks (the other choices are then unused).
    `distill_iters`: label-free distillation steps after calibration (distill.distill, its keyword options in
    `distill`: loss, lr, batch, bn, ...). `steps` K: reach `target_flops` in K equal steps of BFLOPs, each
    prune -> calibrate -> distill (distill_iters / K each)."""
    percent: float = None
    threshold: float = None
    min_keep: int = None
    round_to: object = None
    n_blocks: int = None
    importance: str = 'gamma'
    calib_steps: tuple = calibrate.DEFAULT_STEPS
    plan: dict = None
    target_flops: float = None
    greedy: bool = False
    img_hw: tuple = None
    distill_iters: int = 0
    distill: dict = field(default_factory=dict)
    steps: int = 1
    layer_keep: float = None

    def channels_asked(self):
        return self.percent is not None or self.threshold is not None or self.target_flops is not None


@dataclass
class PruneResult:
    """plan: prune_utils.Plan (channel strategies) or prune_layers.LayerPlan; layer_set: the channel prune's
    LayerSet (for a layer prune: in the block-pruned numbering) or None; nets: 'original', 'loose', 'compact'
    (what is written) and, when calibrated, 'beta_fold' (the uncalibrated compact model); calibration: what
    calibration did (steps, images, seconds) or None; warnings: one line each; stages: {stage: model} before
    and after each calibration step but the last ('beta_fold', 'mean', 'refit'; the last is nets['compact'])."""
    strategy: str
    plan: object
    layer_set: object
    nets: dict
    calibration: dict = None
    warnings: list = field(default_factory=list)
    stages: dict = field(default_factory=dict)

    @property
    def final_stage(self):
        """The name of the last stage that ran: the last calibration step ('fold' without calibration)."""
        steps = (self.calibration or {}).get('steps') or ['fold']
        return steps[-1]


def prune(model, strategy, options, images=None, distill_images=None):
    """Layer set -> importance -> plan -> surgery (-> calibration with `images` [N, 3, S, S]) (-> distillation
    on `distill_images`: image files or a tensor, default `images`). `model` is unchanged. Every refusal of the
    options is raised before any surgery."""
    if strategy not in MODE_OF:
        raise DarkslimError(f"{{strategy}} {strategy!r}; expected one of {', '.join(STRATEGIES)}", param='strategy')
    _check_recovery(options, images)
    distill_images = images if distill_images is None else distill_images
    if strategy == 'layer':
        return _prune_layers(model, options, images, distill_images)
    if options.steps > 1:
        return _prune_in_steps(model, strategy, options, images, distill_images)
    layer_set = prune_utils.get_layer_set(model.module_defs, MODE_OF[strategy], model.in_channels)
    plan = _channel_plan(model, layer_set, strategy, options, images, options.plan)
    nets, calibration, stages = _channel_surgery(model, plan, images, options.calib_steps)
    result = PruneResult(strategy, plan, layer_set, nets, calibration, stages=stages)
    _distill(model, result, plan.keep, options, distill_images, options.distill_iters)
    return result


def _check_recovery(options, images):
    if not isinstance(options.steps, int) or options.steps < 1:
        raise DarkslimError(f"{{steps}} {options.steps}; expected a number of steps >= 1", param='steps')
    if options.steps > 1 and options.layer_keep is not None:     # each step's floor would be of a narrower model
        raise DarkslimError(f"{{layer_keep}} with {{steps}} {options.steps}: the floor is a share of the layers of "
                            "the model being pruned; expected one step with {layer_keep}", param='layer_keep')
    if options.steps > 1 and (options.target_flops is None or options.plan is not None):
        raise DarkslimError(f"{{steps}} {options.steps} reaches a {{target_flops}} in equal steps; expected "
                            "{target_flops} F (and no {plan})", param='steps')
    if not isinstance(options.distill_iters, int) or options.distill_iters < 0:
        raise DarkslimError(f"{{distill_iters}} {options.distill_iters}; expected a number of iterations >= 0",
                            param='distill_iters')
    if options.distill_iters and images is None:
        raise DarkslimError("{distill_iters} distils on the calibration images; expected {calib} N",
                            param='distill_iters')


def _distill(teacher, result, keep, options, images, iters, flow_model=None):
    """Train result.nets['compact'] in place to mimic `teacher` on `images` (label-free); the model before is
    kept as a stage, the seconds in result.calibration. `keep`: the channel plan's masks over `flow_model`
    (default the teacher; a block-pruned stage for a layer prune), for the 'feature' loss's channels."""
    if not iters:
        return
    import distill
    student = result.nets['compact']
    result.stages[result.final_stage] = copy.deepcopy(student)
    kw = dict(options.distill)
    if 'feature' in kw.get('loss', 'head'):
        pairs = distill.feature_pairs(flow_model or teacher, student, keep)
        heads = distill.head_convs(teacher)                   # the same heads, in order, in the teacher's numbering
        kw['pairs'] = [distill.Pair(t, p.student, p.channels) for t, p in zip(heads, pairs)]
    report = distill.distill(student, teacher, images, iters, **kw)
    result.calibration.setdefault('seconds', {})['distill'] = round(report.seconds, 2)
    result.calibration['steps'] = list(result.calibration['steps']) + ['distill']
    result.calibration['distill'] = {'iters': iters, 'loss': report.loss, 'lr': report.lr, 'batch': report.batch,
                                     'bn': report.bn, 'first_loss': report.first_loss, 'last_loss': report.last_loss}


def _prune_in_steps(model, strategy, options, images, distill_images):
    """K prunes, each removing another target/K of the original's BFLOPs from the previous compact model, each
    calibrated and distilled (from the original, iters/K each). The result's plan is the composite: for every
    prunable conv, the original channels it keeps."""
    hw = tuple(options.img_hw or model.img_size)
    orig = models.model_info(model.defs, *hw)[1]
    current, kept, seconds, results = model, None, {}, []
    k_iters = options.distill_iters // options.steps
    for k in range(1, options.steps + 1):
        have = models.model_info(current.defs, *hw)[1]
        step = dataclasses.replace(options, target_flops=1 - (1 - options.target_flops * k / options.steps) * orig
                                   / have, steps=1, distill_iters=0)
        layer_set = prune_utils.get_layer_set(current.module_defs, MODE_OF[strategy], current.in_channels)
        plan = _channel_plan(current, layer_set, strategy, step, images, None)
        kept = _compose(kept, plan.keep)
        nets, calibration, stages = _channel_surgery(current, plan, images, options.calib_steps)
        r = PruneResult(strategy, plan, layer_set, nets, calibration or {'steps': [], 'seconds': {}}, stages=stages)
        masks = {i: np.isin(np.arange(model.module_defs[i]['filters']), idx) for i, idx in kept.items()}
        _distill(model, r, masks, options, distill_images, k_iters + (options.distill_iters % options.steps
                                                                      if k == options.steps else 0))
        for name, v in r.calibration.get('seconds', {}).items():
            seconds[name] = seconds.get(name, 0) + v
        results.append(r)
        current = nets['compact']
    return _composite(model, strategy, options, results, kept, seconds, hw)


def _compose(kept, keep):
    """{conv: original channel indices kept} after another plan's `keep` masks (over the current channels)."""
    if kept is None:
        return {i: np.flatnonzero(k) for i, k in keep.items()}
    return {i: kept[i][keep[i]] if i in keep else kept[i] for i in kept}


def _composite(model, strategy, options, results, kept, seconds, hw):
    """One PruneResult for a K-step prune: the composite plan over the original (its keep masks), the last
    step's models and stages, the seconds of each stage summed over the steps."""
    layer_set = prune_utils.get_layer_set(model.module_defs, MODE_OF[strategy], model.in_channels)
    keep = {i: np.isin(np.arange(layer_set.filters[i]), kept[i]) for i in layer_set.prunable}
    last = results[-1]
    plan = prune_utils.Plan(strategy, layer_set, keep, last.plan.threshold, removed_share=float(
        sum((~k).sum() for k in keep.values()) / sum(len(k) for k in keep.values())),
        importance=last.plan.importance, target_flops=options.target_flops, greedy=last.plan.greedy)
    prune_utils.count_bflops(plan, model, hw)
    plan.steps = [r.plan.to_json() for r in results]
    nets = dict(last.nets, original=model, loose=last.nets['compact'])
    calibration = dict(last.calibration, seconds={k: round(v, 2) for k, v in seconds.items()}, steps_run=len(results))
    return PruneResult(strategy, plan, layer_set, nets, calibration, last.warnings, last.stages)


def _channel_plan(model, layer_set, strategy, options, images, stored, target_flops=None):
    if stored is not None:
        if stored.get('strategy') != strategy:
            raise DarkslimError(f"{{plan}}: a {stored.get('strategy')} plan; expected one made by a {strategy} "
                                "prune", param='plan')
        if stored.get('steps'):
            raise DarkslimError(f"{{plan}}: a {len(stored['steps'])}-step plan (--steps): each step was calibrated "
                                "and distilled on its own; expected a one-step plan to replay", param='plan')
        return prune_utils.plan_from_json(stored, layer_set)
    return prune_utils.make_plan(model, layer_set, strategy, options.percent, options.threshold, options.min_keep,
                                 options.round_to, options.importance, images, target_flops or options.target_flops,
                                 greedy=options.greedy, img_hw=options.img_hw, layer_keep=options.layer_keep)


def _channel_surgery(model, plan, images, steps):
    """({'original', 'loose', 'compact'[, 'beta_fold']}, calibration summary or None, {stage: model})."""
    t0 = time.perf_counter()
    loose = prune_utils.loose_model(model, plan)
    compact = prune_utils.compact_model(model, plan, loose)
    fold_s = time.perf_counter() - t0
    nets = {'original': model, 'loose': loose, 'compact': compact}
    if images is None:
        return nets, None, {}
    nets['compact'], report = calibrate.calibrated_compact(model, plan, images, steps=steps, keep_stages=True)
    nets['beta_fold'] = compact
    stages = {'beta_fold': compact, **report.stages}        # the model before and after each step but the last
    return nets, _summary(report.steps, report.images, {'fold': fold_s, **report.seconds}), stages


def _summary(steps, n_images, seconds):
    return {'steps': list(steps), 'images': n_images, 'seconds': {k: round(v, 2) for k, v in seconds.items()}}


def _prune_layers(model, options, images, distill_images):
    """Blocks (replayed or the n_blocks lowest-scoring), then channels of the block-pruned network, then
    distillation of the result from the original."""
    plan, channel_stored, wants_channels = _block_plan(model, options, images)
    steps = options.calib_steps if images is not None else ()
    t0 = time.perf_counter()
    constants = calibrate.mean_activations(model, [b.last for b in plan.removed], images) \
        if 'mean' in steps and plan.removed else None
    stage = prune_layers.compact_layer_model(model, plan, constants)
    seconds = {'mean' if constants is not None else 'fold': time.perf_counter() - t0}
    result = PruneResult('layer', plan, None, {'original': model})
    if not (wants_channels and _layer_channels(stage, plan, result, options, images, channel_stored, seconds)):
        result.nets['loose'] = prune_layers.loose_layer_model(model, plan, constants)
        result.nets['compact'] = stage
        if images is not None:
            _calibrate_blocks(model, plan, stage, images, steps, seconds, result)
    keep = plan.channel_plan.keep if plan.channel_plan is not None else None
    _distill(model, result, keep, options, distill_images, options.distill_iters, flow_model=stage)
    return result


def _block_plan(model, options, images):
    """(LayerPlan, the stored channel plan or None, whether channels are pruned too); refusals first."""
    stored = options.plan
    if stored is not None and stored.get('strategy') != 'layer':
        raise DarkslimError(f"{{plan}}: a {stored.get('strategy')} plan; expected one made by a layer prune",
                            param='plan')
    shortcuts = None if stored is None else [b['shortcut'] for b in stored.get('removed', [])]
    plan = prune_layers.make_layer_plan(model, options.n_blocks, options.importance, images, shortcuts)
    channel_stored = None if stored is None else stored.get('channel')
    wants_channels = options.channels_asked() if stored is None else channel_stored is not None
    if not wants_channels and (options.min_keep is not None or options.round_to is not None
                               or options.layer_keep is not None):
        given = [k for k in ('min_keep', 'layer_keep', 'round_to') if getattr(options, k) is not None]
        raise DarkslimError("{min_keep}, {layer_keep} and {round_to} apply to the channel prune; expected "
                            "{percent} or {threshold} with them", param=given[0])
    return plan, channel_stored, wants_channels


def _layer_channels(stage, plan, result, options, images, stored, seconds):
    """The channel prune of the block-pruned `stage` into `result`; False when it removes nothing."""
    steps = options.calib_steps if images is not None else ()
    result.layer_set = prune_utils.get_layer_set(stage.module_defs, prune_layers.SPARSE_MODE, stage.in_channels)
    if not _plan_channels(stage, plan, result, options, images, stored):
        return False
    original = result.nets['original']
    result.nets, calibration, result.stages = _channel_surgery(stage, plan.channel_plan, images, steps)
    result.nets['original'] = original
    if calibration is not None:
        calibration['seconds'] = {**{k: round(v, 2) for k, v in seconds.items()}, **calibration['seconds']}
    result.calibration = calibration
    return True


def _stage_target(model, stage, options):
    """The channel step's share of the stage's BFLOPs that makes the whole prune remove `target_flops` of the
    original's; None when the blocks alone reach it (or no target was given)."""
    if options.target_flops is None:
        return None
    hw = tuple(options.img_hw or model.img_size)
    want = (1 - options.target_flops) * models.model_info(model.defs, *hw)[1]
    have = models.model_info(stage.defs, *hw)[1]
    return 1 - want / have if want < have else None


def _plan_channels(stage, plan, result, options, images, stored):
    """Set plan.channel_plan; False (with a warning) when the channel step would remove nothing but blocks go."""
    try:
        target = _stage_target(result.nets['original'], stage, options)
        if options.target_flops is not None and target is None:
            raise prune_utils.NothingToPrune(f"the blocks alone remove {options.target_flops} of the BFLOPs")
        plan.channel_plan = _channel_plan(stage, result.layer_set, prune_layers.SPARSE_MODE, options, images, stored,
                                          target)
    except prune_utils.NothingToPrune as e:
        if not plan.removed:
            raise
        result.warnings.append(f"warning: the channel step removed nothing ({e}); wrote the model with "
                               f"{len(plan.removed)} blocks removed")
        result.layer_set = None
        return False
    return True


def _calibrate_blocks(model, plan, stage, images, steps, seconds, result):
    """Calibration of a block-only prune: 'bn' re-estimates the BN statistics of every conv from the first
    removed block on (their inputs changed); 'mean' was used for the constants; 'refit' has no consumer that
    lost input channels. The uncalibrated model is reported as 'beta_fold'."""
    if plan.removed:
        result.nets['beta_fold'] = prune_layers.compact_layer_model(model, plan)
        result.stages = {'beta_fold': result.nets['beta_fold']}
    if 'bn' in steps and plan.removed:
        t0 = time.perf_counter()
        first = plan.where[plan.removed[0].shortcut]
        calibrate.recalibrate_bn(stage, images, layers=[i for i in channels.convs(stage.module_defs, bn=True)
                                                        if i >= first])
        seconds['bn'] = time.perf_counter() - t0
    result.calibration = _summary(steps, calibrate.count_images(images), seconds)
