"""Training library for Darknet-cfg YOLOv3 models, with optional BN sparsity for network slimming.

The shape of torchvision's reference scripts: a plain `TrainConfig` (what train.py's options say) ->
`build(config)` (model, data, optimizer, scheduler, EMA, AMP scaler, sparsity, output paths) ->
for each epoch `train_one_epoch(run, epoch)` and `evaluate_epoch(run, epoch)` -> `save_checkpoint(run, ...)`.
`fit(config)` is that loop; `read_resume(path)` reads a checkpoint to continue from.

Optimisation: SGD with Nesterov momentum; weight decay on conv weights only (not BN, not biases); linear warmup
of the learning rate (and momentum 0.8 -> momentum) over `warmup_epochs`, then cosine decay from lr0 to
lr0 * lrf, per iteration; the loss (utils.loss) is a per-batch mean, divided by `accumulate` when gradients are
accumulated. AMP on CUDA only. Heads trained from scratch get prior biases (init_head_biases). With `sr`, the
L1 subgradient on the prunable BN gammas (utils.sparsity.BNSparsity) is added between backward() and step().

Checkpoints (models.save_checkpoint, plain data, torch.load(weights_only=True)): 'model' = the evaluated weights
(the EMA when ema is on), 'cfg', 'epoch' (last completed, 0-based), 'optimizer', 'best_fitness', 'fitness',
'results' (that epoch's metrics), 'lr_schedule', 'args' (the run's options), 'ema' = None or {'updates',
'decay', 'tau', 'train_model': the raw training weights}, 'scaler' (AMP) or None.
"""
import dataclasses
import math
import os
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

import models
from models import Darknet, load_weights_any, read_checkpoint
from prune_utils import get_layer_set
from utils.darknet_weights import save_weights
from utils.datasets import DEFAULT_HYP as DATA_HYP
from utils.datasets import LoadImagesAndLabels, check_img_size, parse_data_cfg
from utils.errors import DarkslimError
from utils.evaluate import evaluate
from utils.io import write_text_atomic
from utils.loss import DEFAULT_HYP as LOSS_HYP
from utils.loss import compute_loss
from utils.parse_config import infer_shapes, parse_cfg, parse_cfg_text
from utils.sparsity import LOCAL_DECAY, BNSparsity, format_stats, gamma_histogram_png, sparsity_stats
from utils.torch_utils import ModelEMA, dist_info, init_seeds, select_device

RESULTS_HEADER = ['epoch', 'box', 'obj', 'cls', 'sparsity', 'total', 'precision', 'recall', 'mAP50', 'mAP50_95',
                  'f1', 'fitness', 'gamma_small_share', 'gamma_p50', 'lr', 'img_size', 'train_seconds',
                  'eval_seconds']  # gamma_*: sr only: share of prunable |gamma| < 0.01, median |gamma|
MULTI_SCALE = (0.67, 1.5)  # multi_scale: input side drawn in this range of img_size (multiples of 32)
OUTPUT_FILES = {'last_pt': 'last.pt', 'best_pt': 'best.pt', 'last_weights': 'last.weights',
                'best_weights': 'best.weights', 'results_csv': 'results.csv', 'results_png': 'results.png'}


@dataclass
class TrainConfig:
    """Everything a training run is told (train.py's options, same names). Plain data: it is stored in every
    checkpoint as 'args' so that a resumed run continues with the same settings."""
    cfg: str = None
    data: str = None
    weights: str = None
    cutoff: int = None
    epochs: int = 100
    batch_size: int = 16
    accumulate: int = 1
    img_size: int = None
    multi_scale: bool = False
    device: str = 'cpu'
    workers: int = 2
    cache: bool = False
    seed: int = 0
    out_dir: str = 'weights'
    lr0: float = 0.01
    lrf: float = 0.05
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    hyp: list = None
    notest: bool = False
    eval_interval: int = 1
    nosave: bool = False
    mosaic: bool = False
    skip_bad_labels: bool = False
    ema: bool = False
    sr: bool = False
    s: float = 0.001
    prune: int = 0
    sr_local: float = None
    sr_local_start: float = 0.5
    tensorboard: bool = False

    @classmethod
    def from_mapping(cls, values):
        """A config from any mapping (argparse's vars(args), a checkpoint's 'args'); unknown keys ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(values).items() if k in names})

    def plain(self):
        return _plain(dataclasses.asdict(self))


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
            raise DarkslimError(f"hyp {item!r}; expected key=value")
        try:
            v = float(value)
        except ValueError:
            raise DarkslimError(f"hyp {item!r}: {value!r} is not a number") from None
        if key in loss_hyp:
            loss_hyp[key] = v
        elif key in data_hyp:
            data_hyp[key] = v
        else:
            raise DarkslimError(f"hyp {item!r}: unknown key; expected one of "
                                + ', '.join(sorted(set(loss_hyp) | set(data_hyp))))
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
    cfg_name: str = ''
    start_epoch: int = 0
    best_fitness: float = -1.0
    resumed_from: str = None
    train_images: int = 0
    log: object = print
    tb: object = None
    plain_args: dict = field(default_factory=dict)

    @property
    def main(self):
        return self.rank == 0

    @property
    def eval_model(self):
        """The weights that are evaluated and saved: the EMA when on, else the model."""
        return self.ema.ema if self.ema is not None else self.model


def _model_defs(cfg, ckpt, resume_path):
    """(cfg sections, name): from the cfg path, else the cfg stored in the checkpoint being resumed."""
    if cfg.cfg is not None:
        return parse_cfg(cfg.cfg), cfg.cfg
    if ckpt is not None:
        defs = parse_cfg_text(ckpt['cfg'], f"{resume_path}[cfg]")
        infer_shapes(defs)
        return defs, resume_path
    raise DarkslimError("no cfg given; expected a Darknet .cfg (or a last.pt to resume, which stores one)")


def _load_start_weights(run, ckpt):
    """Weights to start from: the resumed checkpoint (model, EMA, optimizer, scaler), the given weights (with
    cutoff: the first K layers, the rest keep their init and the heads get prior biases) or prior biases alone."""
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
    elif cfg.weights:
        load_weights_any(model, cfg.weights, cfg.cutoff)
        if cfg.cutoff is not None:
            init_head_biases(model, set(range(cfg.cutoff, len(model.module_defs))))
        run.log(f"loaded {cfg.weights}" + (f" (first {cfg.cutoff} layers)" if cfg.cutoff else ''))
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


def build(cfg, device=None, rank=0, world=1, ckpt=None, resume_path=None):
    """A Run ready for epoch `run.start_epoch`: the data is read (and checked against the model's class count)
    before any weights, the commonest mistake being a cfg for another class count."""
    log = print if rank == 0 else (lambda *a, **k: None)
    device = device or select_device(cfg.device)
    loss_hyp, data_hyp = parse_hyp(cfg.hyp)
    if cfg.data is None:
        raise DarkslimError("no data given; expected a Darknet .data file")
    defs, cfg_name = _model_defs(cfg, ckpt, resume_path)
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
    if world > 1:
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if rank == 0:
        run.paths = _output_paths(cfg, ckpt is None, log)
        run.tb = _tensorboard(cfg, log)
    _log_start(run, batch)
    return run


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


# --- one epoch --------------------------------------------------------------------------------------------------

@dataclass
class EpochStats:
    """Running means over an epoch's batches: box, obj, cls, sparsity and total loss; the last lr and size."""
    losses: torch.Tensor
    lr: float
    img_size: int
    seconds: float


def _batch_size_for(run, i, size):
    """multi_scale: a new input side every `accumulate` batches, drawn in MULTI_SCALE x img_size."""
    if not run.cfg.multi_scale or i % run.cfg.accumulate:
        return size
    lo, hi = (max(32, int(run.img_size * f) // 32 * 32) for f in MULTI_SCALE)
    return int(torch.randint(lo // 32, hi // 32 + 1, ()).item()) * 32


def _check_finite(run, loss, items, epoch, i):
    bad = torch.tensor(0. if torch.isfinite(loss) else 1., device=run.device)
    if run.world > 1:  # every rank stops together instead of hanging in the gradient all-reduce
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise DarkslimError(f"epoch {epoch}, batch {i}: non-finite loss {loss.item()} (box, obj, cls = "
                            f"{', '.join(f'{v:.4g}' for v in items[:3].tolist())}); expected finite: lower the "
                            "learning rate (lr0) or check the labels")


def _optimizer_step(run, epoch, i, nb):
    """Set this step's lr and momentum, add the sparsity subgradient, step, and update the EMA; returns lr."""
    lr, momentum = lr_at(run.cfg, epoch, i, nb)
    for g in run.optimizer.param_groups:
        g['lr'] = lr
        g['momentum'] = momentum
    if run.sr is not None:
        run.scaler.unscale_(run.optimizer)
        run.sr.step()                                 # between backward() and step(): s * sign(gamma)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.model)
    return lr


def local_sparsity(run, epoch):
    """Local s decay (cfg.sr_local, see utils.sparsity): from epoch int(sr_local_start * epochs) on, the prunable
    channels are re-ranked before every epoch and only the sr_local smallest-|gamma| share keeps the full rate."""
    cfg = run.cfg
    if run.sr is None or cfg.sr_local is None or epoch < int(cfg.sr_local_start * cfg.epochs):
        return
    pressed = run.sr.local_decay(cfg.sr_local)
    run.log(f"epoch {epoch} local s decay: {pressed} of the {run.sr.channels} "
            f"prunable channels (the smallest |gamma|) at s={cfg.s:g}, the others at {cfg.s * LOCAL_DECAY:g}")


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
    mloss = torch.zeros(5)  # running means: box, obj, cls, sparsity, total
    run.log(('\n' + '%10s' * 9) % ('epoch', 'mem', 'box', 'obj', 'cls', 'sparsity', 'total', 'targets', 'img'))
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
        with torch.autocast(device_type=run.device.type, enabled=run.device.type == 'cuda'):
            raw = run.train_model(imgs)
            loss, items = compute_loss(raw, targets, run.model, run.loss_hyp, img_hw=imgs.shape[-2:])
        _check_finite(run, loss, items, epoch, i)
        run.scaler.scale(loss / run.cfg.accumulate).backward()
        if (i + 1) % run.cfg.accumulate == 0 or i == nb - 1:
            lr = _optimizer_step(run, epoch, i, nb)
        run.train_images += imgs.shape[0]
        if run.main:
            srl = run.sr.penalty() if run.sr is not None else 0.0
            mloss = (mloss * i + torch.tensor([*items[:3].tolist(), srl, items[3].item() + srl])) / (i + 1)
            bar.set_description(('%10s' * 2 + '%10.4g' * 5 + '%10d%10d') % (
                f"{epoch}/{run.cfg.epochs - 1}", _mem_text(run.device), *mloss.tolist(), len(targets), size))
    return EpochStats(mloss, lr, size, time.time() - t0)


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


def sparsity_epoch(run, epoch):
    """-sr: the |gamma| statistics of the prunable layers (printed) and their histogram PNG; None without -sr."""
    if run.sr is None:
        return None, None
    st = sparsity_stats(run.eval_model, run.layer_set)
    run.log(f"epoch {epoch} sparsity: " + format_stats(st))
    path = os.path.join(run.cfg.out_dir, f"gamma_hist_epoch{epoch}.png")
    gamma_histogram_png(run.eval_model, run.layer_set, path, title=f"epoch {epoch}, s={run.cfg.s:g}")
    return st, path


def append_results(run, epoch, stats, res, st, eval_seconds):
    """One row of results.csv (rewritten atomically), and the same scalars to TensorBoard when on."""
    nan = float('nan')
    metrics = [nan] * 5 if res is None else [res[k] for k in ('precision', 'recall', 'mAP50', 'mAP50_95', 'f1')]
    gam = [nan, nan] if st is None else [st['small_share'], st['p50']]
    fi = nan if res is None else fitness(res)
    row = [epoch, *stats.losses.tolist(), *metrics, fi, *gam, stats.lr, run.img_size, stats.seconds, eval_seconds]
    path = run.paths['results_csv']
    old = ''
    if not (epoch == 0 and run.resumed_from is None) and os.path.isfile(path):
        with open(path) as f:
            old = f.read()
    line = ','.join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + '\n'
    write_text_atomic(path, (old or ','.join(RESULTS_HEADER) + '\n') + line)
    if run.tb is not None:
        for k, v in zip(RESULTS_HEADER[1:], row[1:]):
            if isinstance(v, float) and math.isfinite(v):
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
    st, hist = sparsity_epoch(run, epoch)
    if hist:
        summary['gamma_histograms'].append(hist)
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


def fit(cfg, ckpt=None, resume_path=None):
    """Train as configured (continuing `ckpt`, read from `resume_path`, when given); returns a summary dict on
    rank 0 ({} on other ranks). Under torchrun it joins the process group (gloo on CPU, nccl on CUDA)."""
    rank, local_rank, world = dist_info()
    device = select_device(cfg.device)
    if world > 1:
        if device.type == 'cuda':
            device = torch.device('cuda', local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    try:
        return _fit(cfg, device, rank, world, ckpt, resume_path)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _fit(cfg, device, rank, world, ckpt, resume_path):
    t_start = time.time()
    init_seeds(cfg.seed + rank)
    run = build(cfg, device, rank, world, ckpt, resume_path)
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
