"""Train a Darknet-cfg YOLOv3 model; with -sr, sparsity training (L1 on BN gammas) for network slimming.

    python train.py --cfg C --data D [--weights W [--cutoff K]] [--epochs 100] [--batch-size 16] [--img-size N]
    python train.py --cfg C --data D --weights W -sr --s 0.001 --prune 1      # sparsity training for a prune
    python train.py --cfg pruned.cfg --data D --weights pruned.weights       # fine-tune a pruned model
    python train.py --resume [PATH]                                            # continue <out-dir>/last.pt
    torchrun --nproc_per_node N train.py ... -sr --sr-rate 0.001               # DDP (gloo on CPU, nccl on CUDA)

(Under torchrun write the sparsity rate as --sr-rate: torchrun's parser rejects `--s` as an ambiguous prefix of
its own options.)

Every epoch: training (tqdm bar), evaluation of `valid` with test.test (P, R, mAP@0.5, mAP@0.5:0.95, F1)
appended to <out-dir>/results.csv, then last.pt / last.weights and, when the fitness 0.1*mAP50 + 0.9*mAP50_95
improves, best.pt / best.weights (all written atomically). With -sr also the |gamma| statistics and a histogram
<out-dir>/gamma_hist_epoch<N>.png.

Checkpoints (models.save_checkpoint, plain data, torch.load(weights_only=True)): 'model' = the evaluated weights
(the EMA when --ema), 'cfg', 'epoch' (last completed, 0-based), 'optimizer', 'best_fitness', 'fitness',
'results' (that epoch's metrics), 'lr_schedule', 'args' (the run's options), 'ema' = None or {'updates',
'decay', 'tau', 'train_model': the raw training weights}, 'scaler' (AMP) or None.

Optimisation: SGD with Nesterov momentum; weight decay on conv weights only (not BN, not biases); linear warmup
of the learning rate (and momentum 0.8 -> --momentum) over --warmup-epochs, then cosine decay from --lr0 to
--lr0 * --lrf, per iteration; the loss (utils.loss) is a per-batch mean, divided by --accumulate when
gradients are accumulated. AMP on CUDA only. Heads trained from scratch get prior biases
(init_head_biases).
"""
import argparse
import math
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

import models
from models import Darknet, load_weights_any, read_checkpoint, save_checkpoint
from utils.darknet_weights import save_weights
from utils.datasets import DEFAULT_HYP as DATA_HYP
from utils.datasets import LoadImagesAndLabels, check_img_size, parse_data_cfg
from utils.errors import DarkslimError, cli_main
from utils.io import write_text_atomic
from utils.loss import DEFAULT_HYP as LOSS_HYP
from utils.loss import compute_loss
from utils.parse_config import infer_shapes, parse_cfg, parse_cfg_text
from utils.torch_utils import ModelEMA, dist_info, init_seeds, select_device

RESULTS_HEADER = ['epoch', 'box', 'obj', 'cls', 'sparsity', 'total', 'precision', 'recall', 'mAP50', 'mAP50_95',
                  'f1', 'fitness', 'gamma_small_share', 'gamma_p50', 'lr', 'img_size', 'train_seconds',
                  'eval_seconds']  # gamma_*: -sr only: share of prunable |gamma| < 0.01, median |gamma|
MULTI_SCALE = (0.67, 1.5)  # --multi-scale: input side drawn in this range of --img-size (multiples of 32)


def fitness(res):
    """Model selection score: 0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95."""
    return 0.1 * res['mAP50'] + 0.9 * res['mAP50_95']


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


def parse_hyp(items):
    """--hyp key=value overrides -> (loss hyp, data hyp); keys must exist in one of the defaults."""
    loss_hyp, data_hyp = dict(LOSS_HYP), dict(DATA_HYP)
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep:
            raise DarkslimError(f"--hyp {item!r}; expected key=value")
        try:
            v = float(value)
        except ValueError:
            raise DarkslimError(f"--hyp {item!r}: {value!r} is not a number") from None
        if key in loss_hyp:
            loss_hyp[key] = v
        elif key in data_hyp:
            data_hyp[key] = v
        else:
            raise DarkslimError(f"--hyp {item!r}: unknown key; expected one of "
                                + ', '.join(sorted(set(loss_hyp) | set(data_hyp))))
    return loss_hyp, data_hyp


def _plain(v):
    """A value reduced to checkpoint-safe plain types."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return os.fspath(v) if isinstance(v, os.PathLike) else str(v)


def _check_args(args):
    for name, lo in (('epochs', 1), ('batch_size', 1), ('accumulate', 1), ('workers', 0), ('eval_interval', 1)):
        v = getattr(args, name)
        if v < lo:
            raise DarkslimError(f"--{name.replace('_', '-')} {v}; expected an integer >= {lo}")
    if args.cutoff is not None and args.cutoff < 1:
        raise DarkslimError(f"--cutoff {args.cutoff}; expected a positive layer count")
    if args.s < 0:
        raise DarkslimError(f"--s {args.s}; expected a sparsity rate >= 0")
    for name in ('lr0', 'lrf', 'momentum', 'weight_decay', 'warmup_epochs'):
        if getattr(args, name) < 0:
            raise DarkslimError(f"--{name.replace('_', '-')} {getattr(args, name)}; expected >= 0")
    if args.img_size is not None:
        check_img_size(args.img_size)


def _mem_text(device):
    if device.type == 'cuda':
        return f"{torch.cuda.memory_reserved(device) / 1e9:.3g}G"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.3g}G"  # peak RSS (Linux: KiB)


def _append_csv(path, row, new_file):
    line = ','.join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + '\n'
    old = ''
    if not new_file and os.path.isfile(path):
        with open(path) as f:
            old = f.read()
    if not old:
        old = ','.join(RESULTS_HEADER) + '\n'
    write_text_atomic(path, old + line)


def _resolve_resume(args):
    """(checkpoint path, checkpoint dict) for --resume, or (None, None)."""
    if args.resume is None:
        return None, None
    path = args.resume if args.resume != 'auto' else os.path.join(args.out_dir, 'last.pt')
    if not os.path.isfile(path):
        raise DarkslimError(f"--resume: {path} not found; expected a last.pt written by train.py")
    ckpt = read_checkpoint(path)
    for key in ('epoch', 'optimizer'):
        if key not in ckpt:
            raise DarkslimError(f"{path}: checkpoint has no {key!r}; expected a train.py last.pt to resume")
    return path, ckpt


def _restore_args(args, saved):
    """--resume: options left at their defaults take the interrupted run's values (so `--resume` alone
    continues the same run); options given on this command line win. The cfg comes from the checkpoint
    when --cfg is not given."""
    defaults = vars(get_args_parser().parse_args([]))
    explicit = set(getattr(args, 'explicit', ()))
    for k, v in saved.items():
        if k in ('resume', 'cfg', 'explicit') or k not in defaults or k in explicit:
            continue
        setattr(args, k, v)
    _check_args(args)


def build_optimizer(model, args):
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
    opt = torch.optim.SGD([{'params': decay, 'weight_decay': args.weight_decay},
                           {'params': bn_w, 'weight_decay': 0.0},
                           {'params': biases, 'weight_decay': 0.0}],
                          lr=args.lr0, momentum=args.momentum, nesterov=args.momentum > 0)
    return opt


def lr_at(args, epoch, i, nb):
    """(learning rate, momentum) at batch i of `epoch` (nb batches per epoch): warmup, then cosine."""
    x = (epoch + i / nb) / args.epochs
    lr = args.lr0 * (args.lrf + (1 - args.lrf) * (1 + math.cos(math.pi * x)) / 2)
    momentum = args.momentum
    n_warm = args.warmup_epochs * nb
    ni = epoch * nb + i
    if ni < n_warm:
        w = (ni + 1) / n_warm
        lr *= w
        momentum = 0.8 + (args.momentum - 0.8) * w if args.momentum > 0.8 else args.momentum
    return lr, momentum


def train(args):
    """Train as described in the module docstring; returns a summary dict (rank 0; other ranks get {})."""
    _check_args(args)
    loss_hyp, data_hyp = parse_hyp(args.hyp)
    rank, local_rank, world = dist_info()
    ddp = world > 1
    device = select_device(args.device)
    if ddp:
        if device.type == 'cuda':
            device = torch.device('cuda', local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    try:
        return _train(args, loss_hyp, data_hyp, rank, world, device)
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, loss_hyp, data_hyp, rank, world, device):
    main_proc = rank == 0
    log = print if main_proc else (lambda *a, **k: None)
    ddp = world > 1
    t_start = time.time()
    init_seeds(args.seed + rank)
    resume_path, ckpt = _resolve_resume(args)
    if ckpt is not None:
        _restore_args(args, ckpt.get('args') or {})
    if args.data is None:
        raise DarkslimError("no --data given; expected a Darknet .data file")
    if args.cfg is not None:
        defs = parse_cfg(args.cfg)
        cfg_name = args.cfg
    elif ckpt is not None:
        defs = parse_cfg_text(ckpt['cfg'], f"{resume_path}[cfg]")
        infer_shapes(defs)
        cfg_name = resume_path
    else:
        raise DarkslimError("no --cfg given; expected a Darknet .cfg (or --resume with a last.pt)")
    net = defs[0]
    img_size = check_img_size(args.img_size or max(net['width'], net['height']))
    if args.batch_size % world:
        raise DarkslimError(f"--batch-size {args.batch_size} with {world} processes; expected a multiple of {world}")
    batch = args.batch_size // world
    model = Darknet(defs, img_size)
    nc = model.nc

    # data (before any weights are read: a class mismatch is the commonest mistake)
    data = parse_data_cfg(args.data)
    if data['classes'] != nc:
        raise DarkslimError(f"{args.data}: classes = {data['classes']}, but {cfg_name} has {nc} classes; expected "
                            f"equal counts (python models.py make-cfg --base {cfg_name} --classes "
                            f"{data['classes']} --out new.cfg writes the cfg for this data)")
    train_set = LoadImagesAndLabels(data['train'], img_size, batch, augment=True, hyp=data_hyp, cache=args.cache,
                                    mosaic=args.mosaic, nc=nc, skip_bad_labels=args.skip_bad_labels)

    # weights
    start_epoch, best_fitness, ema_state = 0, -1.0, None
    if ckpt is not None:
        ema_state = ckpt.get('ema')
        state = ema_state['train_model'] if ema_state else ckpt['model']
        models.load_state_checked(model, state, resume_path)
        start_epoch = int(ckpt['epoch']) + 1
        best_fitness = float(ckpt.get('best_fitness', -1.0))
        if start_epoch >= args.epochs:
            raise DarkslimError(f"{resume_path}: already trained {start_epoch} epochs; expected --epochs > "
                                f"{start_epoch} to continue")
        log(f"resuming {resume_path} at epoch {start_epoch} (best fitness {best_fitness:.4f})")
    elif args.weights:
        load_weights_any(model, args.weights, args.cutoff)
        if args.cutoff is not None:
            init_head_biases(model, set(range(args.cutoff, len(model.module_defs))))
        log(f"loaded {args.weights}" + (f" (first {args.cutoff} layers)" if args.cutoff else ''))
    else:
        init_head_biases(model, set(range(len(model.module_defs))))
    model.to(device)

    optimizer = build_optimizer(model, args)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
    ema = None
    if args.ema:
        ema = ModelEMA(model)
        if ema_state:
            models.load_state_checked(ema.ema, ckpt['model'], resume_path)
            ema.updates = int(ema_state['updates'])
    amp = device.type == 'cuda'
    scaler = torch.amp.GradScaler('cuda', enabled=amp)
    if ckpt is not None and amp and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])

    sr = None
    layer_set = None
    if args.sr:
        from prune_utils import get_layer_set
        from utils.sparsity import BNSparsity
        layer_set = get_layer_set(model.module_defs, args.prune)
        sr = BNSparsity(model, layer_set, args.s, verbose=main_proc)

    train_model = model
    if ddp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    gen = torch.Generator()
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed) if ddp else None
    loader = DataLoader(train_set, batch_size=batch, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, collate_fn=LoadImagesAndLabels.collate_fn,
                        pin_memory=device.type == 'cuda', generator=gen, drop_last=False)
    val_loader = None
    if main_proc and not args.notest:
        val_set = LoadImagesAndLabels(data['valid'], img_size, batch, augment=False, cache=args.cache, nc=nc)
        val_loader = DataLoader(val_set, batch_size=batch, shuffle=False, num_workers=args.workers,
                                collate_fn=LoadImagesAndLabels.collate_fn)
    nb = len(loader)
    out_dir = args.out_dir
    paths = {k: os.path.join(out_dir, f) for k, f in (('last_pt', 'last.pt'), ('best_pt', 'best.pt'),
                                                      ('last_weights', 'last.weights'),
                                                      ('best_weights', 'best.weights'),
                                                      ('results_csv', 'results.csv'))}
    if main_proc:
        os.makedirs(out_dir, exist_ok=True)
        for k, p in paths.items():  # inputs are never modified
            if args.weights and os.path.exists(p) and os.path.samefile(p, args.weights):
                raise DarkslimError(f"--weights {args.weights} is {p} of --out-dir {out_dir}, which this run "
                                    "overwrites; expected another --out-dir (or a copy of the weights)")
        if ckpt is None:  # a fresh run: a previous run's best.* would be compared with this run's fitness
            for k in ('best_pt', 'best_weights'):
                if os.path.isfile(paths[k]):
                    os.remove(paths[k])
                    log(f"removed {paths[k]} of an earlier run")
    log(f"model {cfg_name}: {sum(p.numel() for p in model.parameters())} params, {nc} classes; "
        f"train {len(train_set)} images ({nb} batches of {batch} x {world} process(es), accumulate "
        f"{args.accumulate}), img-size {img_size}{' multi-scale' if args.multi_scale else ''}, device {device}"
        f"{', AMP' if amp else ''}{', EMA' if ema else ''}, epochs {start_epoch}..{args.epochs - 1}")

    plain_args = _plain(vars(args))
    results, hist_paths, last_res, best_epoch = None, [], None, None
    seen_images, train_seconds = 0, 0.0
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.time()
        train_model.train()
        # per-epoch seeds: a resumed run draws the same batches and augmentations as an uninterrupted one
        torch.manual_seed(args.seed + 1000003 * epoch + rank)
        gen.manual_seed(args.seed + epoch + 7919 * rank)  # DataLoader worker seeds: distinct per rank
        if sampler is not None:
            sampler.set_epoch(epoch)
        mloss = torch.zeros(5)  # running means: box, obj, cls, sparsity, total
        log(('\n' + '%10s' * 9) % ('epoch', 'mem', 'box', 'obj', 'cls', 'sparsity', 'total', 'targets', 'img'))
        if main_proc:
            from tqdm import tqdm
            bar = tqdm(enumerate(loader), total=nb, bar_format='{l_bar}{bar:10}{r_bar}')
        else:
            bar = enumerate(loader)
        optimizer.zero_grad(set_to_none=True)
        size = img_size
        lr = args.lr0
        for i, (imgs, targets, _, _) in bar:
            imgs = imgs.to(device, non_blocking=True)
            targets = targets.to(device)
            if args.multi_scale:
                if i % args.accumulate == 0:
                    lo, hi = (max(32, int(img_size * f) // 32 * 32) for f in MULTI_SCALE)
                    size = int(torch.randint(lo // 32, hi // 32 + 1, ()).item()) * 32
                if size != imgs.shape[-1]:
                    imgs = F.interpolate(imgs, size=(size, size), mode='bilinear', align_corners=False)
            with torch.autocast(device_type=device.type, enabled=amp):
                raw = train_model(imgs)
                loss, items = compute_loss(raw, targets, model, loss_hyp, img_hw=imgs.shape[-2:])
            bad = torch.tensor(0. if torch.isfinite(loss) else 1., device=device)
            if ddp:  # every rank stops together instead of hanging in the gradient all-reduce
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item():
                raise DarkslimError(f"epoch {epoch}, batch {i}: non-finite loss {loss.item()} (box, obj, cls = "
                                    f"{', '.join(f'{v:.4g}' for v in items[:3].tolist())}); expected finite: "
                                    f"lower --lr0 or check the labels")
            scaler.scale(loss / args.accumulate).backward()
            if (i + 1) % args.accumulate == 0 or i == nb - 1:
                lr, momentum = lr_at(args, epoch, i, nb)
                for g in optimizer.param_groups:
                    g['lr'] = lr
                    g['momentum'] = momentum
                if sr is not None:
                    scaler.unscale_(optimizer)
                    sr.step()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
            seen_images += imgs.shape[0]
            if main_proc:
                srl = sr.penalty() if sr is not None else 0.0
                cur = torch.tensor([*items[:3].tolist(), srl, items[3].item() + srl])
                mloss = (mloss * i + cur) / (i + 1)
                bar.set_description(('%10s' * 2 + '%10.4g' * 5 + '%10d%10d') % (
                    f"{epoch}/{args.epochs - 1}", _mem_text(device), *mloss.tolist(), len(targets), size))
        train_seconds += time.time() - t_epoch
        t_train = time.time() - t_epoch

        if main_proc:
            eval_model = ema.ema if ema is not None else model
            final = epoch == args.epochs - 1
            st = None
            if sr is not None:
                from utils.sparsity import format_stats, gamma_histogram_png, sparsity_stats
                st = sparsity_stats(eval_model, layer_set)
                log(f"epoch {epoch} sparsity: " + format_stats(st))
                hp = os.path.join(out_dir, f"gamma_hist_epoch{epoch}.png")
                gamma_histogram_png(eval_model, layer_set, hp, title=f"epoch {epoch}, s={args.s:g}")
                hist_paths.append(hp)
            t_eval = time.time()
            res = None
            if val_loader is not None and (final or (epoch + 1) % args.eval_interval == 0):
                import test as test_module
                res = test_module.test(eval_model, args.data, img_size=img_size, batch_size=batch, device=device,
                                       dataloader=val_loader, verbose=final)
                last_res = {k: res[k] for k in ('precision', 'recall', 'f1', 'mAP50', 'mAP50_95')}
                log(f"epoch {epoch}: P {res['precision']:.4f}  R {res['recall']:.4f}  mAP@0.5 {res['mAP50']:.4f}  "
                    f"mAP@0.5:0.95 {res['mAP50_95']:.4f}  F1 {res['f1']:.4f}  ({time.time() - t_eval:.1f} s)")
            t_eval = time.time() - t_eval
            fi = fitness(res) if res is not None else None
            nan = float('nan')
            metrics = [nan] * 5 if res is None else [res[k] for k in ('precision', 'recall', 'mAP50', 'mAP50_95',
                                                                       'f1')]
            gam = [nan, nan] if st is None else [st['small_share'], st['p50']]
            row = [epoch, *mloss.tolist(), *metrics, nan if fi is None else fi, *gam, lr, img_size, t_train, t_eval]
            _append_csv(paths['results_csv'], row, new_file=epoch == 0 and ckpt is None)
            improved = fi is not None and fi > best_fitness
            if improved:
                best_fitness, best_epoch = fi, epoch
            if not args.nosave or final:
                extra = dict(epoch=epoch, optimizer=optimizer.state_dict(), best_fitness=best_fitness,
                             fitness=fi, results=_plain(last_res), args=plain_args,
                             lr_schedule={'lr0': args.lr0, 'lrf': args.lrf, 'epochs': args.epochs,
                                          'warmup_epochs': args.warmup_epochs, 'batches_per_epoch': nb},
                             ema=None if ema is None else {**ema.state(), 'train_model': {
                                 k: v.detach().cpu() for k, v in model.state_dict().items()}},
                             scaler=scaler.state_dict() if amp else None)
                save_checkpoint(paths['last_pt'], eval_model, **extra)
                save_weights(eval_model, paths['last_weights'])
                if improved and not args.nosave:
                    save_checkpoint(paths['best_pt'], eval_model, **extra)
                    save_weights(eval_model, paths['best_weights'])
        if ddp:
            dist.barrier()

    if not main_proc:
        return {}
    seconds = time.time() - t_start
    summary = {'epochs': args.epochs, 'start_epoch': start_epoch, 'metrics': last_res,
               'best_fitness': best_fitness if best_fitness >= 0 else None, 'best_epoch': best_epoch,
               'seconds': seconds, 'train_seconds': train_seconds,
               'train_images_per_second': seen_images * world / max(train_seconds, 1e-9),
               'paths': {**{k: v for k, v in paths.items() if os.path.isfile(v)}, 'gamma_histograms': hist_paths}}
    log(f"{args.epochs - start_epoch} epochs in {seconds:.1f} s; "
        + (f"best fitness {best_fitness:.4f} (epoch {best_epoch}); " if best_epoch is not None else '')
        + f"wrote {', '.join(v for k, v in summary['paths'].items() if k != 'gamma_histograms')}")
    return summary


class _ArgParser(argparse.ArgumentParser):
    """Records which options the command line gave (`args.explicit`), so --resume restores only the others."""

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        ns, rest = super().parse_known_args(argv, namespace)
        given = {tok.split('=', 1)[0] for tok in argv if tok.startswith('-')}
        ns.explicit = sorted(a.dest for a in self._actions if given & set(a.option_strings))
        return ns, rest


def get_args_parser():
    p = _ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument('--cfg', help='Darknet .cfg (optional with --resume: the checkpoint stores it)')
    p.add_argument('--data', help='Darknet .data file (classes, train, valid[, names])')
    p.add_argument('--weights', help='initial weights: darknet .weights or darkslim .pt (model only)')
    p.add_argument('--cutoff', type=int, help='load only the first K layers of a .weights (e.g. 74, 15)')
    p.add_argument('--epochs', type=int, default=100)
    p.add_argument('--batch-size', type=int, default=16, help='total over all DDP processes')
    p.add_argument('--accumulate', type=int, default=1, help='batches per optimizer step')
    p.add_argument('--img-size', type=int, help='train/eval input side (default: the cfg\'s width/height)')
    p.add_argument('--multi-scale', action='store_true', help='vary the input side 0.67x..1.5x per step')
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N (DDP: cuda uses cuda:LOCAL_RANK)')
    p.add_argument('--workers', type=int, default=2, help='DataLoader worker processes')
    p.add_argument('--cache', action='store_true', help='decode images once into memory')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out-dir', default='weights', help='checkpoints, results.csv, histograms')
    p.add_argument('--resume', nargs='?', const='auto', default=None,
                   help='continue <out-dir>/last.pt, or the given checkpoint')
    p.add_argument('--lr0', type=float, default=0.01, help='initial learning rate')
    p.add_argument('--lrf', type=float, default=0.05, help='final learning rate as a fraction of --lr0')
    p.add_argument('--momentum', type=float, default=0.937)
    p.add_argument('--weight-decay', type=float, default=5e-4, help='on conv weights only')
    p.add_argument('--warmup-epochs', type=float, default=1.0)
    p.add_argument('--hyp', nargs='*', metavar='KEY=VALUE', help='loss/augmentation overrides '
                   '(utils/loss.py DEFAULT_HYP, utils/datasets.py DEFAULT_HYP), e.g. giou=3.54 fliplr=0')
    p.add_argument('--notest', action='store_true', help='no per-epoch evaluation (then no best.pt)')
    p.add_argument('--eval-interval', type=int, default=1, metavar='N',
                   help='evaluate (and pick best.pt) every N epochs and after the last one')
    p.add_argument('--nosave', action='store_true', help='write last.pt/last.weights only after the last epoch')
    p.add_argument('--mosaic', action='store_true', help='4-image mosaic augmentation')
    p.add_argument('--skip-bad-labels', action='store_true', help='drop bad label rows instead of stopping')
    p.add_argument('--ema', action='store_true', help='evaluate and save an exponential moving average')
    p.add_argument('-sr', '--sr', action='store_true', help='sparsity training: L1 on prunable BN gammas')
    p.add_argument('--s', '--sr-rate', dest='s', type=float, default=0.001,
                   help='sparsity rate (with -sr); under torchrun spell it --sr-rate (torchrun takes --s for a '
                        'prefix of its own options)')
    p.add_argument('--prune', type=int, default=0, choices=(0, 1, 2),
                   help='-sr layer set: 0 normal, 1 shortcut, 2 tiny (as the prune script that follows)')
    return p


def main(args):
    train(args)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
