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
import time
from dataclasses import dataclass, field

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
    model's BFLOPs at `img_hw` to remove; none for a block-only layer prune), `min_keep`, `round_to` ('pow2' or
    N), `importance` (importance.IMPORTANCES), `greedy` (l1: norms without inputs removed upstream). Blocks:
    `n_blocks`.
    `calib_steps`: the calibration steps run when images are given. `plan`: a stored plan (Plan.to_json or
    LayerPlan.to_json) to replay instead of choosing channels and blocks (the other choices are then unused)."""
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

    def channels_asked(self):
        return self.percent is not None or self.threshold is not None or self.target_flops is not None


@dataclass
class PruneResult:
    """plan: prune_utils.Plan (channel strategies) or prune_layers.LayerPlan; layer_set: the channel prune's
    LayerSet (for a layer prune: in the block-pruned numbering) or None; nets: 'original', 'loose', 'compact'
    (what is written) and, when calibrated, 'beta_fold' (the uncalibrated compact model); calibration: what
    calibration did (steps, images, seconds) or None; warnings: one line each."""
    strategy: str
    plan: object
    layer_set: object
    nets: dict
    calibration: dict = None
    warnings: list = field(default_factory=list)


def prune(model, strategy, options, images=None):
    """Layer set -> importance -> plan -> surgery (-> calibration with `images` [N, 3, S, S]). `model` is unchanged.
    Every refusal is raised before any surgery."""
    if strategy not in MODE_OF:
        raise DarkslimError(f"{{strategy}} {strategy!r}; expected one of {', '.join(STRATEGIES)}", param='strategy')
    if strategy == 'layer':
        return _prune_layers(model, options, images)
    layer_set = prune_utils.get_layer_set(model.module_defs, MODE_OF[strategy], model.in_channels)
    plan = _channel_plan(model, layer_set, strategy, options, images, options.plan)
    nets, calibration = _channel_surgery(model, plan, images, options.calib_steps)
    return PruneResult(strategy, plan, layer_set, nets, calibration)


def _channel_plan(model, layer_set, strategy, options, images, stored, target_flops=None):
    if stored is not None:
        if stored.get('strategy') != strategy:
            raise DarkslimError(f"{{plan}}: a {stored.get('strategy')} plan; expected one made by a {strategy} "
                                "prune", param='plan')
        return prune_utils.plan_from_json(stored, layer_set)
    return prune_utils.make_plan(model, layer_set, strategy, options.percent, options.threshold, options.min_keep,
                                 options.round_to, options.importance, images, target_flops or options.target_flops,
                                 greedy=options.greedy, img_hw=options.img_hw)


def _channel_surgery(model, plan, images, steps):
    """({'original', 'loose', 'compact'[, 'beta_fold']}, calibration summary or None)."""
    loose = prune_utils.loose_model(model, plan)
    compact = prune_utils.compact_model(model, plan, loose)
    nets = {'original': model, 'loose': loose, 'compact': compact}
    if images is None:
        return nets, None
    nets['compact'], report = calibrate.calibrated_compact(model, plan, images, steps=steps)
    nets['beta_fold'] = compact
    return nets, _summary(report.steps, report.images, report.seconds)


def _summary(steps, n_images, seconds):
    return {'steps': list(steps), 'images': n_images, 'seconds': {k: round(v, 2) for k, v in seconds.items()}}


def _prune_layers(model, options, images):
    """Blocks (replayed or the n_blocks lowest-scoring), then channels of the block-pruned network."""
    stored = options.plan
    if stored is not None and stored.get('strategy') != 'layer':
        raise DarkslimError(f"{{plan}}: a {stored.get('strategy')} plan; expected one made by a layer prune",
                            param='plan')
    shortcuts = None if stored is None else [b['shortcut'] for b in stored.get('removed', [])]
    plan = prune_layers.make_layer_plan(model, options.n_blocks, options.importance, images, shortcuts)
    channel_stored = None if stored is None else stored.get('channel')
    wants_channels = options.channels_asked() if stored is None else channel_stored is not None
    if not wants_channels and (options.min_keep is not None or options.round_to is not None):
        raise DarkslimError("{min_keep} and {round_to} apply to the channel prune; expected {percent} or "
                            "{threshold} with them", param='min_keep' if options.min_keep is not None else 'round_to')
    steps = options.calib_steps if images is not None else ()
    t0 = time.perf_counter()
    constants = calibrate.mean_activations(model, [b.last for b in plan.removed], images) \
        if 'mean' in steps and plan.removed else None
    stage = prune_layers.compact_layer_model(model, plan, constants)
    seconds = {'mean' if constants is not None else 'fold': time.perf_counter() - t0}
    result = PruneResult('layer', plan, None, {'original': model})
    if wants_channels:
        result.layer_set = prune_utils.get_layer_set(stage.module_defs, prune_layers.SPARSE_MODE, stage.in_channels)
        if _plan_channels(stage, plan, result, options, images, channel_stored):
            result.nets, calibration = _channel_surgery(stage, plan.channel_plan, images, steps)
            result.nets['original'] = model
            if calibration is not None:
                calibration['seconds'] = {**{k: round(v, 2) for k, v in seconds.items()}, **calibration['seconds']}
            result.calibration = calibration
            return result
    result.nets['loose'] = prune_layers.loose_layer_model(model, plan, constants)
    result.nets['compact'] = stage
    if images is not None:
        _calibrate_blocks(model, plan, stage, images, steps, seconds, result)
    return result


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
    if 'bn' in steps and plan.removed:
        t0 = time.perf_counter()
        first = plan.where[plan.removed[0].shortcut]
        calibrate.recalibrate_bn(stage, images, layers=[i for i in channels.convs(stage.module_defs, bn=True)
                                                        if i >= first])
        seconds['bn'] = time.perf_counter() - t0
    result.calibration = _summary(steps, calibrate.count_images(images), seconds)
