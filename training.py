"""Training library for Darknet-cfg YOLOv3 models, with optional BN sparsity for network slimming.

The shape of torchvision's reference scripts: a plain `TrainConfig` (what train.py's options say) ->
`build(config)` (model, data, optimizer, scheduler, EMA, AMP scaler, loss terms, output paths) ->
for each epoch `train_one_epoch(run, epoch)` and `evaluate_epoch(run, epoch)` -> `save_checkpoint(run, ...)`.
`fit(config)` is that loop; `read_resume(path)` reads a checkpoint to continue from.

Config: every option is one `TrainConfig` field whose metadata (`Option`: train.py flags, help, argparse
keywords, the allowed range) is the single spec: train.py builds its parser from it and `TrainConfig.validate()`
(which `fit` calls) checks it. A bad value raises a DarkslimError whose `param` is the field and whose message
names fields as `{field}` placeholders: str() reads the field names, train.py shows `e.shown(option_flags())`.

Optimisation: SGD with Nesterov momentum; weight decay on conv weights only (not BN, not biases); linear warmup
of the learning rate (and momentum 0.8 -> momentum) over `warmup_epochs`, then cosine decay from lr0 to
lr0 * lrf, per iteration; the loss is a per-batch mean, divided by `accumulate` when gradients are
accumulated. AMP on CUDA only. Heads trained from scratch get prior biases (init_head_biases).

Loss terms: `train_one_epoch` minimises the sum of `run.terms`, a list of `LossTerm`s made by `loss_terms(run)`:
'detection' (utils.loss: components box, obj, cls); with `sr`, 'sparsity' (the L1 subgradient s * sign(gamma) on
the prunable BN gammas, utils.sparsity.BNSparsity, added between backward() and step(); it logs s * sum|gamma|
after the step; with `s_final` s follows utils.sparsity.scheduled_rate per epoch); with `teacher`, 'kd' (kd x
distill.head_loss between the student's raw head outputs and those of a frozen teacher on the same batch).
results.csv and TensorBoard get one column per term (or per component) and 'total'. To add a term, add its
options as TrainConfig fields and append a `LossTerm(name, loss=lambda model, outputs, targets, imgs: ...)` in
`loss_terms`; nothing else changes.

Start weights (`weights`, no `cutoff`): models.load_transfer loads every layer whose tensors fit the cfg, all
or nothing per layer, from a .pt or a darknet .weights of the same network with another class count (the class
count of a .weights is solved from its length); the layers left at their initialisation are logged in one line
and the re-initialised head convs get prior biases (init_head_biases). With `cutoff`: exactly the first K layers
of a .weights.

Checkpoints (models.save_checkpoint, plain data, torch.load(weights_only=True)): 'model' = the evaluated weights
(the EMA when ema is on), 'cfg', 'epoch' (last completed, 0-based), 'optimizer', 'best_fitness', 'fitness',
'results' (that epoch's metrics), 'lr_schedule', 'args' (the run's options), 'ema' = None or {'updates',
'decay', 'tau', 'train_model': the raw training weights}, 'scaler' (AMP) or None.
"""
import csv
import dataclasses
import math
import numbers
import os
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

import calibrate
import models
from distill import Outputs, check_same_heads, distill_loss, obj_is_prob, run_model
from models import Darknet, is_torch_file, load_model, load_transfer, load_weights_any, read_checkpoint, stored_cfg
from importance import get_importance
from prune_utils import get_layer_set
from utils.darknet_weights import save_weights
from utils.datasets import DEFAULT_HYP as DATA_HYP
from utils.datasets import LoadImagesAndLabels, check_img_size, parse_data_cfg
from utils.errors import DarkslimError
from utils.evaluate import evaluate
from utils.io import write_text_atomic
from utils.loss import DEFAULT_HYP as LOSS_HYP
from utils.loss import loss_components
from utils.parse_config import infer_shapes, parse_cfg, parse_cfg_text
from utils.sparsity import (LOCAL_DECAY, BNSparsity, format_needed, format_stats, gamma_histogram_png,
                            optimizer_steps, scheduled_rate, sparsity_stats)
from utils.torch_utils import ModelEMA, dist_info, init_seeds, select_device

METRIC_COLUMNS = ['precision', 'recall', 'mAP50', 'mAP50_95', 'f1', 'fitness', 'gamma_small_share', 'gamma_p50',
                  'lr', 'img_size', 'train_seconds', 'eval_seconds']  # gamma_*: sr only (|gamma| < 0.01, median)
# bn_refresh's default with -sr: on BCCD (yolov3-tiny after 12 epochs of -sr) re-estimating the running statistics
# on 64 train images took val mAP@0.5 from 0.34 to 0.79 (bench/results/bn-refresh.json: how it depends on the
# number of images); a few seconds per epoch on a CPU
SR_BN_REFRESH = 64
MULTI_SCALE = (0.67, 1.5)  # multi_scale: input side drawn in this range of img_size (multiples of 32)
OUTPUT_FILES = {'last_pt': 'last.pt', 'best_pt': 'best.pt', 'last_weights': 'last.weights',
                'best_weights': 'best.weights', 'results_csv': 'results.csv', 'results_png': 'results.png'}


# --- the config: one spec for the library and train.py ----------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """What a field's value must be: `ok(value)` says whether it is; `expected` says it in words."""
    ok: object
    expected: str


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def at_least(lo):
    """An integer >= lo."""
    return Check(lambda v: _is_int(v) and v >= lo, f"an integer >= {lo}")


def within(lo, hi, low_open, high_open, what):
    """A real number in the interval lo..hi (open ends as told); `what` names it in the message."""
    def ok(v):
        return _is_real(v) and (lo < v if low_open else lo <= v) and (v < hi if high_open else v <= hi)
    return Check(ok, f"{what} in {'(' if low_open else '['}{lo:g}, {hi:g}{')' if high_open else ']'}")


def _listed(values):
    return ', '.join(map(str, values))


NON_NEGATIVE = Check(lambda v: _is_real(v) and v >= 0, '>= 0')
IMG_SIZE = Check(lambda v: _is_int(v) and v > 0 and v % 32 == 0, 'a positive multiple of 32')


@dataclass
class Option:
    """How a TrainConfig field is offered on train.py's command line and checked by `TrainConfig.validate`:
    `flags` (default --field-name; the first is the one messages use), `help`, `check` (None: any value; None
    is allowed where it is the default) and more argparse keywords (metavar, choices, nargs)."""
    flags: tuple = ()
    help: str = None
    check: Check = None
    argparse: dict = field(default_factory=dict)

    def spellings(self, name):
        return self.flags or ('--' + name.replace('_', '-'),)


def option(default=None, *flags, help=None, check=None, **argparse):
    """A TrainConfig field with its Option (argparse `choices` are its check unless one is given)."""
    if check is None and 'choices' in argparse:
        choices = argparse['choices']
        check = Check(lambda v: v in choices, f"one of {_listed(choices)}")
    return field(default=default, metadata={'option': Option(flags, help, check, argparse)})


@dataclass
class TrainConfig:
    """Everything a training run is told (train.py's options, same names). Plain data: it is stored in every
    checkpoint as 'args' so that a resumed run continues with the same settings. `validate()` checks it."""
    cfg: str = option(help='Darknet .cfg (optional with --resume or a .pt --weights: they store it)')
    data: str = option(help='Darknet .data file (classes, train, valid[, names])')
    weights: str = option(help='initial weights: darknet .weights or darkslim .pt (a .pt may stand in for --cfg: it '
                               'stores its cfg). Every layer whose tensors fit the cfg is loaded, also from the same '
                               'network for another class count; the layers left at their initialisation (the head '
                               'convs, then) are named in one line')
    cutoff: int = option(help='load only the first K layers of a .weights (e.g. 74, 15)',
                         check=Check(lambda v: _is_int(v) and v >= 1, 'a positive layer count'))
    epochs: int = option(100, check=at_least(1))
    batch_size: int = option(16, help='total over all DDP processes', check=at_least(1))
    accumulate: int = option(1, help='batches per optimizer step', check=at_least(1))
    img_size: int = option(help='train/eval input side (default: the cfg\'s width/height)', check=IMG_SIZE)
    multi_scale: bool = option(False, help='vary the input side 0.67x..1.5x per step')
    device: str = option('cpu', help='cpu, cuda or cuda:N (DDP: cuda uses cuda:LOCAL_RANK)')
    workers: int = option(2, help='DataLoader worker processes', check=at_least(0))
    cache: bool = option(False, help='decode images once into memory')
    seed: int = option(0)
    out_dir: str = option('weights', help='checkpoints, results.csv, histograms')
    lr0: float = option(0.01, help='initial learning rate', check=NON_NEGATIVE)
    lrf: float = option(0.05, help='final learning rate as a fraction of --lr0', check=NON_NEGATIVE)
    momentum: float = option(0.937, check=NON_NEGATIVE)
    weight_decay: float = option(5e-4, help='on conv weights only', check=NON_NEGATIVE)
    warmup_epochs: float = option(1.0, check=NON_NEGATIVE)
    hyp: list = option(help='loss/augmentation overrides (utils/loss.py DEFAULT_HYP, utils/datasets.py '
                       'DEFAULT_HYP), e.g. giou=3.54 fliplr=0', nargs='*', metavar='KEY=VALUE',
                       check=Check(lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v),
                                   'a list of key=value texts'))
    notest: bool = option(False, help='no per-epoch evaluation (then no best.pt)')
    eval_interval: int = option(1, help='evaluate (and pick best.pt) every N epochs and after the last one',
                                check=at_least(1), metavar='N')
    nosave: bool = option(False, help='write last.pt/last.weights only after the last epoch')
    mosaic: bool = option(False, help='4-image mosaic augmentation')
    skip_bad_labels: bool = option(False, help='drop bad label rows instead of stopping')
    ema: bool = option(False, help='evaluate and save an exponential moving average')
    sr: bool = option(False, '-sr', '--sr', help='sparsity training: L1 on prunable BN gammas')
    s: float = option(0.001, '--s', '--sr-rate', check=Check(NON_NEGATIVE.ok, 'a sparsity rate >= 0'),
                      help='sparsity rate (with -sr). Each optimizer step moves a prunable BN gamma by '
                           'lr*s/(1-momentum) toward 0, so a gamma of size g needs ~g*(1-momentum)/(lr*s) steps: the '
                           'COCO yolov3-tiny\'s median prunable gamma 1.65 at lr 0.01, s 0.001, momentum 0.937 needs '
                           '~10400 steps (1040 epochs of 10 batches); every epoch\'s sparsity line gives the epochs '
                           'your run needs at its rate. Under torchrun spell it --sr-rate (torchrun takes --s for a '
                           'prefix of its own options)')
    s_final: float = option(metavar='F', check=Check(NON_NEGATIVE.ok, 'a factor >= 0'),
                            help='-sr schedule: the rate decays linearly, epoch by epoch, from --s (first epoch) to '
                                 '--s x F (last epoch), e.g. 0.1; with --sr-local it is the rate of the pressed '
                                 'channels (the others get 1%% of it). Default: --s throughout')
    prune: int = option(0, choices=(0, 1, 2),
                        help='-sr layer set: 0 normal/regular, 1 shortcut, 2 tiny (as the prune script that follows)')
    sr_local: float = option(metavar='SHARE', check=within(0, 1, True, False, 'a share of channels'),
                             help='-sr local s decay: from --sr-local-start on, only this share of the prunable '
                                  'channels (the smallest |gamma|, re-ranked every epoch) keeps the rate --s, the '
                                  'others get 1%% of it, so the channels a prune keeps stop shrinking (e.g. 0.85; '
                                  'default: --s on all)')
    sr_local_start: float = option(0.5, metavar='FRACTION',
                                   check=within(0, 1, False, True, 'a fraction of the epochs'),
                                   help='local s decay starts at this fraction of --epochs (default 0.5; 0: from the '
                                        'first epoch)')
    bn_refresh: int = option(metavar='N', check=at_least(0),
                             help='at every epoch end, before evaluation and checkpoints, re-estimate the BatchNorm '
                                  'running mean/var of the evaluated weights on N train images (letterboxed, no '
                                  'augmentation). Sparsity training shrinks gammas faster than the running statistics '
                                  '(momentum %(m)s) follow, so without it a sparse model evaluates far below what its '
                                  'weights can do. Default: %(n)d with -sr, 0 otherwise' % {'m': models.BN_MOMENTUM,
                                                                                          'n': SR_BN_REFRESH})
    teacher: list = option(nargs=2, metavar=('CFG', 'WEIGHTS'),
                           check=Check(lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                                       and all(isinstance(x, str) for x in v), 'a cfg and a weights path'),
                           help='distillation: a frozen teacher (eval mode, no gradients; e.g. the dense model when '
                                'sparse-training or fine-tuning a prune) adds the loss term kd = --kd x the '
                                'objectness-weighted MSE between its raw head outputs and the student\'s on each '
                                'batch (distill.head_loss); same class count and head output shapes as the student')
    kd: float = option(1.0, metavar='W', check=NON_NEGATIVE,
                       help='weight of the distillation term kd (with --teacher; default 1.0)')
    tensorboard: bool = option(False, help='log scalars and BN-gamma histograms to <out-dir>/tensorboard (needs the '
                                           'tensorboard package; skipped with a message without it)')

    @classmethod
    def from_mapping(cls, values):
        """A config from any mapping (argparse's vars(args), a checkpoint's 'args'); unknown keys ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(values).items() if k in names})

    def plain(self):
        return _plain(dataclasses.asdict(self))

    def validate(self):
        """Raise DarkslimError (`param`: the field) for the first value outside its field's range (see
        `options()`), a local s decay or a rate schedule without sparsity, a teacher file that does not exist, or
        a bad hyp override; returns the config."""
        for f, opt in options():
            v = getattr(self, f.name)
            if v is None and f.default is None:
                continue
            if opt.check is not None and not opt.check.ok(v):
                shown = repr(v) if isinstance(v, str) else v
                raise DarkslimError(f"{{{f.name}}} {shown}; expected {opt.check.expected}", param=f.name)
        if self.sr_local is not None and not self.sr:
            raise DarkslimError(f"{{sr_local}} {self.sr_local} without {{sr}}; expected {{sr}} (local s decay is a "
                                "sparsity rate)", param='sr_local')
        if self.s_final is not None and not self.sr:
            raise DarkslimError(f"{{s_final}} {self.s_final} without {{sr}}; expected {{sr}} (a schedule of the "
                                "sparsity rate)", param='s_final')
        for path in self.teacher or ():
            if not os.path.isfile(path):
                raise DarkslimError(f"{{teacher}} {path}: no such file; expected the teacher's cfg and weights",
                                    param='teacher')
        parse_hyp(self.hyp)
        return self


def options():
    """[(dataclasses.Field, Option)] of every TrainConfig field, in order: the spec train.py and validate read."""
    return [(f, f.metadata['option']) for f in dataclasses.fields(TrainConfig)]


def option_flags():
    """{field: the train.py flag that messages use} (e.g. 'sr' -> '-sr', 'batch_size' -> '--batch-size')."""
    return {f.name: opt.spellings(f.name)[0] for f, opt in options()}


def _plain(v):
    """A value reduced to checkpoint-safe plain types."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return os.fspath(v) if isinstance(v, os.PathLike) else str(v)


def fitness(res):
    """Model selection score: 0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95."""
    return 0.1 * res['mAP50'] + 0.9 * res['mAP50_95']


def parse_hyp(items):
    """key=value overrides -> (loss hyp, data hyp); keys must exist in one of the defaults."""
    loss_hyp, data_hyp = dict(LOSS_HYP), dict(DATA_HYP)
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep:
            raise DarkslimError(f"{{hyp}} {item!r}; expected key=value", param='hyp')
        try:
            v = float(value)
        except ValueError:
            raise DarkslimError(f"{{hyp}} {item!r}: {value!r} is not a number", param='hyp') from None
        if key in loss_hyp:
            loss_hyp[key] = v
        elif key in data_hyp:
            data_hyp[key] = v
        else:
            raise DarkslimError(f"{{hyp}} {item!r}: unknown key; expected one of "
                                + _listed(sorted(set(loss_hyp) | set(data_hyp))), param='hyp')
    return loss_hyp, data_hyp


def init_head_biases(model, layers):
    """Prior biases for the convs feeding [yolo] layers in `layers` (indices of those convs), so that training
    from scratch does not start with every cell at objectness 0.5 (focal-loss style priors, as ultralytics):
    objectness logit(p) with p = 8 / (anchors * cells) of that head (about 8 positives per image, at most
    0.25), classes log(0.6 / (nc - 0.99))."""
    shapes = infer_shapes(model.defs, *model.img_size)
    with torch.no_grad():
        for i in model.yolo_layers:
            src = model.inputs[i][0]
            conv = model.module_list[src][0] if model.module_defs[src]['type'] == 'convolutional' else None
            if src not in layers or conv is None or conv.bias is None:
                continue
            head = model.module_list[i]
            cells = shapes[src][1] * shapes[src][2]
            b = conv.bias.view(head.na, head.no)
            p = min(8 / (head.na * cells), 0.25)
            b[:, 4] = math.log(p / (1 - p))
            b[:, 5:] = math.log(0.6 / max(head.nc - 0.99, 1e-3))


def build_optimizer(model, cfg):
    """SGD (Nesterov) with three groups: conv weights (weight decay), BN weights, all biases (no decay)."""
    decay, bn_w, biases = [], [], []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            decay.append(mod.weight)
            if mod.bias is not None:
                biases.append(mod.bias)
        elif isinstance(mod, torch.nn.BatchNorm2d):
            bn_w.append(mod.weight)
            biases.append(mod.bias)
    n_params = sum(1 for _ in model.parameters())
    if len(decay) + len(bn_w) + len(biases) != n_params:
        raise RuntimeError("optimizer groups do not cover every parameter")
    return torch.optim.SGD([{'params': decay, 'weight_decay': cfg.weight_decay},
                            {'params': bn_w, 'weight_decay': 0.0},
                            {'params': biases, 'weight_decay': 0.0}],
                           lr=cfg.lr0, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def lr_at(cfg, epoch, i, nb):
    """(learning rate, momentum) at batch i of `epoch` (nb batches per epoch): warmup, then cosine."""
    x = (epoch + i / nb) / cfg.epochs
    lr = cfg.lr0 * (cfg.lrf + (1 - cfg.lrf) * (1 + math.cos(math.pi * x)) / 2)
    momentum = cfg.momentum
    n_warm = cfg.warmup_epochs * nb
    ni = epoch * nb + i
    if ni < n_warm:
        w = (ni + 1) / n_warm
        lr *= w
        momentum = 0.8 + (cfg.momentum - 0.8) * w if cfg.momentum > 0.8 else cfg.momentum
    return lr, momentum


def read_resume(path):
    """The checkpoint dict of a train.py last.pt to continue from (its 'args' hold the run's config)."""
    if not os.path.isfile(path):
        raise DarkslimError(f"{path} not found; expected a last.pt written by train.py to resume")
    ckpt = read_checkpoint(path)
    for key in ('epoch', 'optimizer'):
        if key not in ckpt:
            raise DarkslimError(f"{path}: checkpoint has no {key!r}; expected a train.py last.pt to resume")
    return ckpt


# --- build ------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """A training run's live objects, made by `build` and advanced by `train_one_epoch`."""
    cfg: TrainConfig
    model: torch.nn.Module                 # the plain model (never the DDP wrapper)
    train_model: torch.nn.Module           # what the forward runs: the DDP wrapper or the model
    optimizer: torch.optim.Optimizer
    scaler: object
    loader: DataLoader
    sampler: object
    generator: torch.Generator
    val_loader: DataLoader
    device: torch.device
    img_size: int
    loss_hyp: dict
    paths: dict
    rank: int = 0
    world: int = 1
    ema: ModelEMA = None
    sr: BNSparsity = None
    layer_set: object = None
    teacher: torch.nn.Module = None        # distillation's frozen teacher (never DDP-wrapped), see build_teacher
    bn_images: torch.Tensor = None         # [N, 3, S, S] uint8 train images for bn_refresh (rank 0), see refresh_bn
    cfg_name: str = ''
    start_epoch: int = 0
    best_fitness: float = -1.0
    resumed_from: str = None
    train_images: int = 0
    log: object = print
    tb: object = None
    plain_args: dict = field(default_factory=dict)
    terms: list = field(default_factory=list)  # LossTerms, see loss_terms()

    @property
    def main(self):
        return self.rank == 0

    @property
    def eval_model(self):
        """The weights that are evaluated and saved: the EMA when on, else the model."""
        return self.ema.ema if self.ema is not None else self.model


def _model_defs(cfg, ckpt, resume_path):
    """(cfg sections, name): from the cfg path, else the cfg stored in the checkpoint being resumed, else the
    cfg stored in the start weights (a .pt)."""
    if cfg.cfg is not None:
        return parse_cfg(cfg.cfg), cfg.cfg
    if ckpt is not None:
        defs = parse_cfg_text(ckpt['cfg'], f"{resume_path}[cfg]")
        infer_shapes(defs)
        return defs, resume_path
    if cfg.weights is not None and os.path.isfile(cfg.weights):
        if not is_torch_file(cfg.weights):
            raise DarkslimError(f"no {{cfg}} given and {{weights}} {cfg.weights} is a darknet .weights file, which "
                                "stores no cfg; expected {cfg} with it", param='cfg')
        return stored_cfg(cfg.weights), f"{cfg.weights}[cfg]"
    raise DarkslimError("no {cfg} given; expected a Darknet .cfg (or {weights} a .pt, or a last.pt to resume, "
                        "which store one)", param='cfg')


# cfg keys darknet trains with that this trainer does not read, and what governs that here instead ({field}:
# a TrainConfig field, written as the caller names it)
CFG_TRAINING_KEYS = {
    'net': {'learning_rate': '{lr0}', 'burn_in': '{warmup_epochs} (epochs, not batches)',
            'steps': 'the cosine schedule ({lr0}, {lrf}, {epochs})', 'scales': 'the cosine schedule ({lrf})',
            'policy': 'the cosine schedule', 'max_batches': '{epochs}', 'momentum': '{momentum}',
            'decay': '{weight_decay}', 'angle': '{hyp} degrees=', 'saturation': '{hyp} hsv_s=',
            'exposure': '{hyp} hsv_v=', 'hue': '{hyp} hsv_h=', 'mosaic': '{mosaic}'},
    'yolo': {'iou_loss': 'the GIoU box loss (its gain: {hyp} giou=)', 'iou_normalizer': '{hyp} giou=',
             'cls_normalizer': '{hyp} cls=', 'obj_normalizer': '{hyp} obj=', 'iou_thresh': '{hyp} iou_t=',
             'max_delta': 'nothing (no gradient clipping)'},
}


def unused_cfg_keys(defs, names=None):
    """Lines naming the cfg's training keys this run ignores ('file:line: [section] key -> what governs it',
    fields written as `names` ({field: text}) says, default their names), one per key (the first [yolo] that
    sets it stands for all)."""
    spell = {**{f.name: f.name for f, _ in options()}, **(names or {})}
    lines, seen = [], set()
    for d in defs:
        for key, instead in CFG_TRAINING_KEYS.get(d['type'], {}).items():
            if key in d and (d['type'], key) not in seen:
                seen.add((d['type'], key))
                where = d.where(key) if hasattr(d, 'where') else f"[{d['type']}]"
                lines.append(f"  {where}: [{d['type']}] {key} -> {instead.format_map(spell)}")
    return lines


def _load_start_weights(run, ckpt):
    """Weights to start from: the resumed checkpoint (model, EMA, optimizer, scaler), the given weights (every
    layer that fits, see models.load_transfer; with cutoff: the first K layers; the rest keep their init and the
    heads among them get prior biases) or prior biases alone."""
    model, cfg = run.model, run.cfg
    if ckpt is not None:
        ema_state = ckpt.get('ema')
        models.load_state_checked(model, ema_state['train_model'] if ema_state else ckpt['model'], run.resumed_from)
        run.start_epoch = int(ckpt['epoch']) + 1
        run.best_fitness = float(ckpt.get('best_fitness', -1.0))
        if run.start_epoch >= cfg.epochs:
            raise DarkslimError(f"{run.resumed_from}: already trained {run.start_epoch} epochs; expected more "
                                f"than {run.start_epoch} epochs to continue")
        run.log(f"resuming {run.resumed_from} at epoch {run.start_epoch} (best fitness {run.best_fitness:.4f})")
    elif cfg.weights and cfg.cutoff is not None:
        load_weights_any(model, cfg.weights, cfg.cutoff)
        init_head_biases(model, set(range(cfg.cutoff, len(model.module_defs))))
        run.log(f"loaded {cfg.weights} (first {cfg.cutoff} layers)")
    elif cfg.weights:
        done = load_transfer(model, cfg.weights)
        init_head_biases(model, set(done.kept))
        types = {i: d['type'] for i, d in enumerate(model.module_defs)}
        run.log(f"loaded {cfg.weights}" if done.exact else done.line(types))
    else:
        init_head_biases(model, set(range(len(model.module_defs))))


def _restore_optim(run, ckpt):
    """Optimizer, EMA and AMP-scaler state of a resumed run."""
    if ckpt is None:
        return
    run.optimizer.load_state_dict(ckpt['optimizer'])
    ema_state = ckpt.get('ema')
    if run.ema is not None and ema_state:
        models.load_state_checked(run.ema.ema, ckpt['model'], run.resumed_from)
        run.ema.updates = int(ema_state['updates'])
    if run.device.type == 'cuda' and ckpt.get('scaler'):
        run.scaler.load_state_dict(ckpt['scaler'])


def _loaders(cfg, data, img_size, batch, data_hyp, nc, rank, world, device):
    """(train loader, its sampler or None, its generator, validation loader or None). The validation loader
    uses rectangular batches, as test.py does by default; skip_bad_labels applies to both splits."""
    train_set = LoadImagesAndLabels(data['train'], img_size, batch, augment=True, hyp=data_hyp, cache=cfg.cache,
                                    mosaic=cfg.mosaic, nc=nc, skip_bad_labels=cfg.skip_bad_labels)
    gen = torch.Generator()
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    loader = DataLoader(train_set, batch_size=batch, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.workers, collate_fn=LoadImagesAndLabels.collate_fn,
                        pin_memory=device.type == 'cuda', generator=gen, drop_last=False)
    val_loader = None
    if rank == 0 and not cfg.notest:
        from utils.datasets import RectBatchSampler
        val_set = LoadImagesAndLabels(data['valid'], img_size, batch, augment=False, cache=cfg.cache, nc=nc,
                                      skip_bad_labels=cfg.skip_bad_labels, rect=True)
        val_loader = DataLoader(val_set, batch_sampler=RectBatchSampler(val_set), num_workers=cfg.workers,
                                collate_fn=LoadImagesAndLabels.collate_fn)
    return loader, sampler, gen, val_loader


def _output_paths(cfg, fresh, log):
    """{name: path} under out_dir; refuses an out_dir whose files would overwrite the start weights, and removes
    an earlier run's best.* on a fresh run (they would be compared with this run's fitness)."""
    paths = {k: os.path.join(cfg.out_dir, f) for k, f in OUTPUT_FILES.items()}
    os.makedirs(cfg.out_dir, exist_ok=True)
    if fresh:
        for p in paths.values():
            if cfg.weights and os.path.exists(p) and os.path.exists(cfg.weights) and os.path.samefile(p, cfg.weights):
                raise DarkslimError(f"weights {cfg.weights} is {p} of output folder {cfg.out_dir}, which this run "
                                    "overwrites; expected another output folder (or a copy of the weights)")
        for k in ('best_pt', 'best_weights'):
            if os.path.isfile(paths[k]):
                os.remove(paths[k])
                log(f"removed {paths[k]} of an earlier run")
    return paths


def build(cfg, device=None, rank=0, world=1, ckpt=None, resume_path=None, names=None):
    """A Run ready for epoch `run.start_epoch`: the data is read (and checked against the model's class count)
    before any weights, the commonest mistake being a cfg for another class count. The cfg is parsed once, here;
    its training keys this trainer ignores are logged (fields written as `names` says, see unused_cfg_keys)."""
    log = print if rank == 0 else (lambda *a, **k: None)
    device = device or select_device(cfg.device)
    loss_hyp, data_hyp = parse_hyp(cfg.hyp)
    if cfg.data is None:
        raise DarkslimError("no {data} given; expected a Darknet .data file", param='data')
    defs, cfg_name = _model_defs(cfg, ckpt, resume_path)
    unused = unused_cfg_keys(defs, names)
    if unused:
        log("cfg training keys not used by this trainer (darknet's own training reads them):\n" + '\n'.join(unused))
    img_size = check_img_size(cfg.img_size or max(defs[0]['width'], defs[0]['height']))
    if cfg.batch_size % world:
        raise DarkslimError(f"batch size {cfg.batch_size} with {world} processes; expected a multiple of {world}")
    batch = cfg.batch_size // world
    model = Darknet(defs, img_size)
    data = parse_data_cfg(cfg.data)
    if data['classes'] != model.nc:
        raise DarkslimError(f"{cfg.data}: classes = {data['classes']}, but {cfg_name} has {model.nc} classes; "
                            f"expected equal counts (python models.py make-cfg --base {cfg_name} --classes "
                            f"{data['classes']} --out new.cfg writes the cfg for this data)")
    loader, sampler, gen, val_loader = _loaders(cfg, data, img_size, batch, data_hyp, model.nc, rank, world, device)
    run = Run(cfg, model, model, None, None, loader, sampler, gen, val_loader, device, img_size, loss_hyp, {},
              rank=rank, world=world, cfg_name=cfg_name, resumed_from=resume_path, log=log, plain_args=cfg.plain())
    _load_start_weights(run, ckpt)
    model.to(device)
    run.optimizer = build_optimizer(model, cfg)
    run.ema = ModelEMA(model) if cfg.ema else None
    run.scaler = torch.amp.GradScaler('cuda', enabled=device.type == 'cuda')
    _restore_optim(run, ckpt)
    if cfg.sr:
        run.layer_set = get_layer_set(model.module_defs, cfg.prune)
        run.sr = BNSparsity(model, run.layer_set, cfg.s, verbose=rank == 0)
    if cfg.teacher:
        run.teacher = build_teacher(cfg.teacher, model, img_size, device, cfg_name, log)
    run.terms = loss_terms(run)
    n = bn_refresh_count(cfg)
    if rank == 0 and n:
        images = calibrate.calibration_images(cfg.data, n, img_size, seed=cfg.seed, verbose=False)
        run.bn_images = (images * 255).round().to(torch.uint8)    # exact: decoded 8-bit pixels; 1/4 the memory
        log(f"BatchNorm statistics re-estimated at every epoch end on {len(run.bn_images)} train images")
    if world > 1:
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if rank == 0:
        run.paths = _output_paths(cfg, ckpt is None, log)
        run.tb = _tensorboard(cfg, log)
    _log_start(run, batch)
    return run


def build_teacher(teacher, student, img_size, device, student_name='the student', log=print):
    """Distillation's teacher: (cfg, weights) `teacher` loaded on `device` (each DDP rank its own, never wrapped),
    in eval mode with every parameter requires_grad=False; its class count and head output shapes at `img_size`
    must be the student's (a pruned student with fewer channels is fine: the head loss compares outputs only)."""
    t_cfg, t_weights = teacher
    model = load_model(t_cfg, t_weights, device=device, img_size=img_size).requires_grad_(False)
    if model.nc != student.nc:
        raise DarkslimError(f"{{teacher}} {t_cfg} has {model.nc} classes, {student_name} {student.nc}; expected "
                            "a teacher with the student's class count", param='teacher')
    check_same_heads(student, model, (img_size, img_size))
    log(f"teacher {t_cfg} + {t_weights}: {sum(p.numel() for p in model.parameters())} params, frozen")
    return model


def bn_refresh_count(cfg):
    """How many train images bn_refresh uses: the option, else SR_BN_REFRESH with sparsity training, else 0."""
    if cfg.bn_refresh is not None:
        return cfg.bn_refresh
    return SR_BN_REFRESH if cfg.sr else 0


def refresh_bn(run):
    """Re-estimate the evaluated weights' BatchNorm running statistics on run.bn_images (when set), in place
    (calibrate.recalibrate_bn: each BN's input moments over all the images, upstream BNs normalizing by each
    batch's statistics as in training; the exact eval-mode moments when the images fit in one batch). Training
    is unaffected (train mode normalizes by batch statistics); evaluation and the checkpoints see statistics that
    match the current weights."""
    if run.bn_images is not None:
        calibrate.recalibrate_bn(run.eval_model, run.bn_images, batch=run.loader.batch_size or 8)


def _log_start(run, batch):
    cfg = run.cfg
    run.log(f"model {run.cfg_name}: {sum(p.numel() for p in run.model.parameters())} params, {run.model.nc} "
            f"classes; train {len(run.loader.dataset)} images ({len(run.loader)} batches of {batch} x {run.world} "
            f"process(es), accumulate {cfg.accumulate}), img-size {run.img_size}"
            f"{' multi-scale' if cfg.multi_scale else ''}, device {run.device}"
            f"{', AMP' if run.device.type == 'cuda' else ''}{', EMA' if run.ema else ''}, "
            f"epochs {run.start_epoch}..{cfg.epochs - 1}")


def _tensorboard(cfg, log):
    """A SummaryWriter on <out_dir>/tensorboard with `tensorboard`, or None (also when the package is absent)."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("tensorboard logging skipped: the tensorboard package is not installed (pip install tensorboard)")
        return None
    return SummaryWriter(os.path.join(cfg.out_dir, 'tensorboard'))


# --- loss terms -------------------------------------------------------------------------------------------------

@dataclass
class LossTerm:
    """One named part of what training minimises (see the module docstring); results columns: `columns`.

    Either `loss(model, outputs, targets, imgs)` -> a 0-dim tensor, or {component: 0-dim tensor} with the
    component names listed in `components`: added to the loss that backward() differentiates (model: the plain
    model; outputs: its raw training outputs on imgs). Or a term applied as a gradient: `after_backward(model)`
    adds it once per optimizer step, between backward() and step() (gradients unscaled), and `value(model)` ->
    float is what it logs, read after the step."""
    name: str
    loss: object = None
    components: tuple = ()
    after_backward: object = None
    value: object = None

    @property
    def columns(self):
        return tuple(self.components) or (self.name,)


DETECTION_COMPONENTS = ('box', 'obj', 'cls')


def detection_term(hyp):
    """The YOLOv3 loss (utils.loss) with its loss-gain `hyp`: components box (GIoU), obj and cls."""
    def loss(model, outputs, targets, imgs):
        parts = loss_components(outputs, targets, model, hyp, img_hw=imgs.shape[-2:])
        return dict(zip(DETECTION_COMPONENTS, parts))
    return LossTerm('detection', loss=loss, components=DETECTION_COMPONENTS)


def sparsity_term(sr):
    """L1 s * sum|gamma| on the prunable BN gammas (utils.sparsity.BNSparsity `sr`), applied as its subgradient
    s * sign(gamma); logs the penalty's value."""
    return LossTerm('sparsity', after_backward=lambda model: sr.step(), value=lambda model: sr.penalty())


def kd_term(teacher, weight):
    """Distillation: `weight` x distill.head_loss (objectness-weighted MSE on the raw head outputs) between the
    student's outputs and the frozen `teacher`'s on the same (augmented, resized) batch; the teacher runs in eval
    mode under torch.no_grad, so no gradient reaches it. Computed in float32 (also under AMP)."""
    def loss(model, outputs, targets, imgs):
        with torch.no_grad():
            t = run_model(teacher, imgs, mode='eval')
        t.raw = [r.float() for r in t.raw]
        s = Outputs([o.float() for o in outputs], obj_is_prob=obj_is_prob(model))
        return weight * distill_loss('head', s, t)
    return LossTerm('kd', loss=loss)


def loss_terms(run):
    """The run's loss terms in results-column order: detection, then sparsity with `sr`, then kd with a teacher.
    A new term goes here."""
    terms = [detection_term(run.loss_hyp)]
    if run.sr is not None:
        terms.append(sparsity_term(run.sr))
    if getattr(run, 'teacher', None) is not None:
        terms.append(kd_term(run.teacher, run.cfg.kd))
    return terms


def loss_columns(terms):
    """Results columns of the loss: each term's (or component's) name, then 'total' (their sum)."""
    return [c for t in terms for c in t.columns] + ['total']


def results_header(terms):
    return ['epoch', *loss_columns(terms), *METRIC_COLUMNS]


# --- one epoch --------------------------------------------------------------------------------------------------

@dataclass
class EpochStats:
    """Running means over an epoch's batches ({loss column: mean}, see loss_columns); the last lr and size."""
    losses: dict
    lr: float
    img_size: int
    seconds: float


def _batch_size_for(run, i, size):
    """multi_scale: a new input side every `accumulate` batches, drawn in MULTI_SCALE x img_size."""
    if not run.cfg.multi_scale or i % run.cfg.accumulate:
        return size
    lo, hi = (max(32, int(run.img_size * f) // 32 * 32) for f in MULTI_SCALE)
    return int(torch.randint(lo // 32, hi // 32 + 1, ()).item()) * 32


def _forward(run, imgs, targets):
    """(loss to backpropagate: the sum of the differentiable terms, {column: its 0-dim tensor}) on one batch."""
    with torch.autocast(device_type=run.device.type, enabled=run.device.type == 'cuda'):
        outputs = run.train_model(imgs)
        parts = {}
        for t in run.terms:
            if t.loss is not None:
                out = t.loss(run.model, outputs, targets, imgs)
                parts.update(out if isinstance(out, dict) else {t.name: out})
        values = list(parts.values())
        loss = sum(values[1:], values[0])
    return loss, parts


def _check_finite(run, loss, parts, epoch, i):
    bad = torch.tensor(0. if torch.isfinite(loss) else 1., device=run.device)
    if run.world > 1:  # every rank stops together instead of hanging in the gradient all-reduce
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise DarkslimError(f"epoch {epoch}, batch {i}: non-finite loss {loss.item()} ({', '.join(parts)} = "
                            f"{', '.join(f'{v.item():.4g}' for v in parts.values())}); expected finite: lower the "
                            "learning rate (lr0) or check the labels")


def _optimizer_step(run, epoch, i, nb):
    """Set this step's lr and momentum, add the gradient terms (after_backward), step, and update the EMA;
    returns lr."""
    lr, momentum = lr_at(run.cfg, epoch, i, nb)
    for g in run.optimizer.param_groups:
        g['lr'] = lr
        g['momentum'] = momentum
    hooks = [t.after_backward for t in run.terms if t.after_backward is not None]
    if hooks:
        run.scaler.unscale_(run.optimizer)
        for hook in hooks:                            # between backward() and step()
            hook(run.model)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.model)
    return lr


def _logged(run, loss, parts):
    """One batch's values in loss_columns order: the differentiable parts, each gradient term's value (read
    now, after the step) and the total."""
    row, extra = [], 0.0
    for t in run.terms:
        if t.loss is not None:
            row += [parts[c].item() for c in t.columns]
        else:
            row.append(t.value(run.model))
            extra += row[-1]
    return row + [loss.item() + extra]


def local_sparsity(run, epoch):
    """The sparsity rate of `epoch` (cfg.s_final: utils.sparsity.scheduled_rate), then local s decay
    (cfg.sr_local, see utils.sparsity): from epoch int(sr_local_start * epochs) on, the prunable channels are
    re-ranked before every epoch and only the sr_local smallest-|gamma| share keeps the full (scheduled) rate
    (ranked by the prune's 'gamma' importance, so that the ranking is the prune's)."""
    cfg = run.cfg
    if run.sr is None:
        return
    if cfg.s_final is not None:
        run.sr.set_rate(scheduled_rate(cfg.s, cfg.s_final, epoch, cfg.epochs))
        run.log(f"epoch {epoch} sparsity rate s={run.sr.s:g} (linear from {cfg.s:g} to {cfg.s * cfg.s_final:g})")
    if cfg.sr_local is None or epoch < int(cfg.sr_local_start * cfg.epochs):
        return
    pressed = run.sr.local_decay(cfg.sr_local, importance=get_importance('gamma').scores)
    run.log(f"epoch {epoch} local s decay: {pressed} of the {run.sr.channels} prunable channels (the smallest "
            f"|gamma|) at s={run.sr.s:g}, the others at {run.sr.s * LOCAL_DECAY:g}")


def _seed_epoch(run, epoch):
    """Per-epoch seeds: a resumed run draws the same batches and augmentations as an uninterrupted one."""
    torch.manual_seed(run.cfg.seed + 1000003 * epoch + run.rank)
    run.generator.manual_seed(run.cfg.seed + epoch + 7919 * run.rank)  # DataLoader worker seeds, per rank
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)


def train_one_epoch(run, epoch):
    """One pass over the training data (tqdm bar on rank 0); returns EpochStats."""
    t0 = time.time()
    run.train_model.train()
    _seed_epoch(run, epoch)
    nb = len(run.loader)
    columns = loss_columns(run.terms)
    mloss = torch.zeros(len(columns))  # running means, one per loss column
    run.log(('\n' + '%10s' * (len(columns) + 4)) % ('epoch', 'mem', *columns, 'targets', 'img'))
    bar = enumerate(run.loader)
    if run.main:
        from tqdm import tqdm
        bar = tqdm(bar, total=nb, bar_format='{l_bar}{bar:10}{r_bar}')
    run.optimizer.zero_grad(set_to_none=True)
    size, lr = run.img_size, run.cfg.lr0
    for i, (imgs, targets, _, _) in bar:
        imgs, targets = imgs.to(run.device, non_blocking=True), targets.to(run.device)
        size = _batch_size_for(run, i, size)
        if size != imgs.shape[-1]:
            imgs = F.interpolate(imgs, size=(size, size), mode='bilinear', align_corners=False)
        loss, parts = _forward(run, imgs, targets)
        _check_finite(run, loss, parts, epoch, i)
        run.scaler.scale(loss / run.cfg.accumulate).backward()
        if (i + 1) % run.cfg.accumulate == 0 or i == nb - 1:
            lr = _optimizer_step(run, epoch, i, nb)
        run.train_images += imgs.shape[0]
        if run.main:
            mloss = (mloss * i + torch.tensor(_logged(run, loss, parts))) / (i + 1)
            bar.set_description(('%10s' * 2 + '%10.4g' * len(columns) + '%10d%10d') % (
                f"{epoch}/{run.cfg.epochs - 1}", _mem_text(run.device), *mloss.tolist(), len(targets), size))
    return EpochStats(dict(zip(columns, mloss.tolist())), lr, size, time.time() - t0)


def _mem_text(device):
    if device.type == 'cuda':
        return f"{torch.cuda.memory_reserved(device) / 1e9:.3g}G"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.3g}G"  # peak RSS (Linux: KiB)


# --- evaluate, log, save ----------------------------------------------------------------------------------------

def evaluate_epoch(run, epoch):
    """Validation metrics of the evaluated weights after `epoch` (every eval_interval epochs and after the last;
    None otherwise or without a validation loader)."""
    final = epoch == run.cfg.epochs - 1
    if run.val_loader is None or not (final or (epoch + 1) % run.cfg.eval_interval == 0):
        return None
    t = time.time()
    res = evaluate(run.eval_model, run.cfg.data, img_size=run.img_size, dataloader=run.val_loader, verbose=final)
    run.log(f"epoch {epoch}: P {res['precision']:.4f}  R {res['recall']:.4f}  mAP@0.5 {res['mAP50']:.4f}  "
            f"mAP@0.5:0.95 {res['mAP50_95']:.4f}  F1 {res['f1']:.4f}  ({time.time() - t:.1f} s)")
    return res


def sparsity_epoch(run, epoch, lr):
    """-sr: the |gamma| statistics of the prunable layers and the epochs the median needs to reach 0 at this
    epoch's rate and last learning rate `lr` (utils.sparsity.epochs_to_zero; printed) and their histogram PNG;
    None without -sr."""
    if run.sr is None:
        return None, None
    st = sparsity_stats(run.eval_model, run.layer_set)
    steps = optimizer_steps(len(run.loader), run.cfg.accumulate)
    need = format_needed(st['p50'], lr, run.sr.s, run.cfg.momentum, steps, left=run.cfg.epochs - 1 - epoch)
    run.log(f"epoch {epoch} sparsity: " + format_stats(st) + "; " + need)
    path = os.path.join(run.cfg.out_dir, f"gamma_hist_epoch{epoch}.png")
    gamma_histogram_png(run.eval_model, run.layer_set, path, title=f"epoch {epoch}, s={run.sr.s:g}")
    return st, path


def results_row(run, epoch, stats, res, st, eval_seconds):
    """{column: value} of one epoch in results_header order: the loss columns, the metrics (nan when not
    evaluated), the |gamma| statistics (nan without sr), lr, input size and seconds."""
    nan = float('nan')
    row = {'epoch': epoch, **stats.losses}
    row.update({k: nan if res is None else res[k] for k in ('precision', 'recall', 'mAP50', 'mAP50_95', 'f1')})
    row['fitness'] = nan if res is None else fitness(res)
    row['gamma_small_share'], row['gamma_p50'] = (nan, nan) if st is None else (st['small_share'], st['p50'])
    row.update(lr=stats.lr, img_size=run.img_size, train_seconds=stats.seconds, eval_seconds=eval_seconds)
    return row


def _results_text(path, header, row, keep):
    """results.csv's text: the rows already in `path` when `keep`, then `row`. Rows written under other columns
    (a resume that turned a loss term on or off) are rewritten under all columns, 'nan' where they have none."""
    old, columns = [], list(header)
    if keep and os.path.isfile(path):
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            old = list(reader)
            columns += [c for c in reader.fieldnames or () if c not in header]
    rows = [[r.get(c) or 'nan' for c in columns] for r in old]
    values = [row.get(c, float('nan')) for c in columns]
    rows.append([f"{v:.6g}" if isinstance(v, float) else str(v) for v in values])
    return ''.join(','.join(r) + '\n' for r in [columns, *rows])


def append_results(run, epoch, stats, res, st, eval_seconds):
    """One row of results.csv (rewritten atomically; columns: results_header), and the same scalars to
    TensorBoard when on."""
    row = results_row(run, epoch, stats, res, st, eval_seconds)
    path = run.paths['results_csv']
    keep = not (epoch == 0 and run.resumed_from is None)
    write_text_atomic(path, _results_text(path, results_header(run.terms), row, keep))
    if run.tb is not None:
        for k, v in row.items():
            if k != 'epoch' and isinstance(v, float) and math.isfinite(v):
                run.tb.add_scalar(k, v, epoch)
        if run.sr is not None:
            for i, bn in run.sr.bns.items():
                run.tb.add_histogram(f"bn_gamma/layer{i}", bn.weight.detach().abs().cpu(), epoch)


def save_checkpoint(run, epoch, res, improved):
    """last.pt / last.weights (and best.* when `improved`), atomically; plain data only."""
    fi = None if res is None else fitness(res)
    results = None if res is None else {k: res[k] for k in ('precision', 'recall', 'f1', 'mAP50', 'mAP50_95')}
    cfg = run.cfg
    extra = dict(epoch=epoch, optimizer=run.optimizer.state_dict(), best_fitness=run.best_fitness, fitness=fi,
                 results=_plain(results), args=run.plain_args,
                 lr_schedule={'lr0': cfg.lr0, 'lrf': cfg.lrf, 'epochs': cfg.epochs,
                              'warmup_epochs': cfg.warmup_epochs, 'batches_per_epoch': len(run.loader)},
                 ema=None if run.ema is None else {**run.ema.state(), 'train_model': {
                     k: v.detach().cpu() for k, v in run.model.state_dict().items()}},
                 scaler=run.scaler.state_dict() if run.device.type == 'cuda' else None)
    models.save_checkpoint(run.paths['last_pt'], run.eval_model, **extra)
    save_weights(run.eval_model, run.paths['last_weights'])
    if improved:
        models.save_checkpoint(run.paths['best_pt'], run.eval_model, **extra)
        save_weights(run.eval_model, run.paths['best_weights'])


# --- the whole run ----------------------------------------------------------------------------------------------

def _epoch_end(run, epoch, stats, summary):
    """Rank 0 after an epoch: sparsity stats, evaluation, results.csv, checkpoints; updates `summary`."""
    st, hist = sparsity_epoch(run, epoch, stats.lr)
    if hist:
        summary['gamma_histograms'].append(hist)
    refresh_bn(run)
    t = time.time()
    res = evaluate_epoch(run, epoch)
    append_results(run, epoch, stats, res, st, time.time() - t)
    if res is not None:
        summary['metrics'] = {k: res[k] for k in ('precision', 'recall', 'f1', 'mAP50', 'mAP50_95')}
    improved = res is not None and fitness(res) > run.best_fitness
    if improved:
        run.best_fitness, summary['best_epoch'] = fitness(res), epoch
    final = epoch == run.cfg.epochs - 1
    if not run.cfg.nosave or final:
        save_checkpoint(run, epoch, res, improved and not run.cfg.nosave)


def fit(cfg, ckpt=None, resume_path=None, *, names=None):
    """Train as configured (continuing `ckpt`, read from `resume_path`, when given); returns a summary dict on
    rank 0 ({} on other ranks). Under torchrun it joins the process group (gloo on CPU, nccl on CUDA).

    The config is validated first (TrainConfig.validate). names: {field: text}, how log lines write the config's
    fields (train.py passes its flags; default: the field names)."""
    cfg.validate()
    rank, local_rank, world = dist_info()
    device = select_device(cfg.device)
    if world > 1:
        if device.type == 'cuda':
            device = torch.device('cuda', local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    try:
        return _fit(cfg, device, rank, world, ckpt, resume_path, names)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _fit(cfg, device, rank, world, ckpt, resume_path, names):
    t_start = time.time()
    init_seeds(cfg.seed + rank)
    run = build(cfg, device, rank, world, ckpt, resume_path, names=names)
    summary = {'metrics': None, 'best_epoch': None, 'gamma_histograms': []}
    train_seconds = 0.0
    for epoch in range(run.start_epoch, cfg.epochs):
        local_sparsity(run, epoch)
        stats = train_one_epoch(run, epoch)
        train_seconds += stats.seconds
        if run.main:
            _epoch_end(run, epoch, stats, summary)
        if world > 1:
            dist.barrier()
    if not run.main:
        return {}
    return _finish(run, summary, time.time() - t_start, train_seconds)


def _finish(run, summary, seconds, train_seconds):
    """results.png, the summary dict and its closing log line."""
    from utils.plots import results_png
    if os.path.isfile(run.paths['results_csv']):
        results_png(run.paths['results_csv'], run.paths['results_png'])
    if run.tb is not None:
        run.tb.close()
    files = {k: v for k, v in run.paths.items() if os.path.isfile(v)}
    out = {'epochs': run.cfg.epochs, 'start_epoch': run.start_epoch, 'metrics': summary['metrics'],
           'best_fitness': run.best_fitness if run.best_fitness >= 0 else None, 'best_epoch': summary['best_epoch'],
           'seconds': seconds, 'train_seconds': train_seconds,
           'train_images_per_second': run.train_images * run.world / max(train_seconds, 1e-9),
           'paths': {**files, 'gamma_histograms': summary['gamma_histograms']}}
    run.log(f"{run.cfg.epochs - run.start_epoch} epochs in {seconds:.1f} s; "
            + (f"best fitness {run.best_fitness:.4f} (epoch {summary['best_epoch']}); "
               if summary['best_epoch'] is not None else '')
            + f"wrote {', '.join(files.values())}")
    return out
