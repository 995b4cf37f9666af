"""Train a Darknet-cfg YOLOv3 model; with -sr, sparsity training (L1 on BN gammas) for network slimming.

    python train.py --cfg C --data D [--weights W [--cutoff K]] [--epochs 100] [--batch-size 16] [--img-size N]
    python train.py --cfg C --data D --weights W -sr --s 0.001 --prune 1      # sparsity training for a prune
    python train.py --cfg pruned.cfg --data D --weights pruned.weights       # fine-tune a pruned model
    python train.py --resume [PATH]                                            # continue <out-dir>/last.pt
    torchrun --nproc_per_node N train.py ... -sr --sr-rate 0.001               # DDP (gloo on CPU, nccl on CUDA)

(Under torchrun write the sparsity rate as --sr-rate: torchrun's parser rejects `--s` as an ambiguous prefix of
its own options.)

Every epoch: training (tqdm bar), evaluation of `valid` (P, R, mAP@0.5, mAP@0.5:0.95, F1) appended to
<out-dir>/results.csv, then last.pt / last.weights and, when the fitness 0.1*mAP50 + 0.9*mAP50_95 improves,
best.pt / best.weights (all written atomically). With -sr also the |gamma| statistics and a histogram
<out-dir>/gamma_hist_epoch<N>.png. After the last epoch, <out-dir>/results.png plots results.csv. With
--tensorboard (and the tensorboard package installed), scalars and the regularized BN-gamma histograms go to
<out-dir>/tensorboard.

The work is done by training.py (build, train_one_epoch, evaluate_epoch, save_checkpoint, fit); this script
parses the options into a training.TrainConfig. Checkpoint contents and the optimisation are described there.
"""
import argparse
import os
import sys

import training
from utils.datasets import check_img_size
from utils.errors import DarkslimError, cli_main
from utils.parse_config import parse_cfg, parse_cfg_text


def _check_args(args):
    for name, lo in (('epochs', 1), ('batch_size', 1), ('accumulate', 1), ('workers', 0), ('eval_interval', 1)):
        v = getattr(args, name)
        if v < lo:
            raise DarkslimError(f"--{name.replace('_', '-')} {v}; expected an integer >= {lo}")
    if args.cutoff is not None and args.cutoff < 1:
        raise DarkslimError(f"--cutoff {args.cutoff}; expected a positive layer count")
    if args.s < 0:
        raise DarkslimError(f"--s {args.s}; expected a sparsity rate >= 0")
    if args.sr_local is not None and not args.sr:
        raise DarkslimError(f"--sr-local {args.sr_local} without -sr; expected -sr (local s decay is a sparsity rate)")
    if args.sr_local is not None and not 0 < args.sr_local <= 1:
        raise DarkslimError(f"--sr-local {args.sr_local}; expected a share of channels in (0, 1]")
    if not 0 <= args.sr_local_start < 1:
        raise DarkslimError(f"--sr-local-start {args.sr_local_start}; expected a fraction of the epochs in [0, 1)")
    for name in ('lr0', 'lrf', 'momentum', 'weight_decay', 'warmup_epochs'):
        if getattr(args, name) < 0:
            raise DarkslimError(f"--{name.replace('_', '-')} {getattr(args, name)}; expected >= 0")
    if args.img_size is not None:
        check_img_size(args.img_size)


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


def resolve_resume(args):
    """(checkpoint path, checkpoint dict) for --resume, or (None, None)."""
    if args.resume is None:
        return None, None
    path = args.resume if args.resume != 'auto' else os.path.join(args.out_dir, 'last.pt')
    if not os.path.isfile(path):
        raise DarkslimError(f"--resume: {path} not found; expected a last.pt written by train.py")
    return path, training.read_resume(path)


# cfg keys darknet trains with that this trainer does not read, and what governs that here instead
CFG_TRAINING_KEYS = {
    'net': {'learning_rate': '--lr0', 'burn_in': '--warmup-epochs (epochs, not batches)',
            'steps': 'the cosine schedule (--lr0, --lrf, --epochs)', 'scales': 'the cosine schedule (--lrf)',
            'policy': 'the cosine schedule', 'max_batches': '--epochs', 'momentum': '--momentum',
            'decay': '--weight-decay', 'angle': '--hyp degrees=', 'saturation': '--hyp hsv_s=',
            'exposure': '--hyp hsv_v=', 'hue': '--hyp hsv_h=', 'mosaic': '--mosaic'},
    'yolo': {'iou_loss': 'the GIoU box loss (its gain: --hyp giou=)', 'iou_normalizer': '--hyp giou=',
             'cls_normalizer': '--hyp cls=', 'obj_normalizer': '--hyp obj=', 'iou_thresh': '--hyp iou_t=',
             'max_delta': 'nothing (no gradient clipping)'},
}


def unused_cfg_keys(defs):
    """Lines naming the cfg's training keys this run ignores ('file:line: key=value -> what governs it'), one
    per key (the first [yolo] that sets it stands for all)."""
    lines, seen = [], set()
    for d in defs:
        for key, instead in CFG_TRAINING_KEYS.get(d['type'], {}).items():
            if key in d and (d['type'], key) not in seen:
                seen.add((d['type'], key))
                where = d.where(key) if hasattr(d, 'where') else f"[{d['type']}]"
                lines.append(f"  {where}: [{d['type']}] {key} -> {instead}")
    return lines


def print_unused_cfg_keys(args, ckpt):
    """Say once, before training, which training keys of the cfg are not used and what to use instead."""
    if int(os.environ.get('RANK', 0)) != 0:
        return
    defs = parse_cfg(args.cfg) if args.cfg is not None else parse_cfg_text(ckpt['cfg'], 'checkpoint cfg')
    lines = unused_cfg_keys(defs)
    if lines:
        print("cfg training keys not used by this trainer (darknet's own training reads them):\n"
              + '\n'.join(lines))


def train(args):
    """Train as the options say; returns training.fit's summary (rank 0; other ranks get {})."""
    _check_args(args)
    resume_path, ckpt = resolve_resume(args)
    if ckpt is not None:
        _restore_args(args, ckpt.get('args') or {})
    if args.data is None:
        raise DarkslimError("no --data given; expected a Darknet .data file")
    if args.cfg is None and ckpt is None:
        raise DarkslimError("no --cfg given; expected a Darknet .cfg (or --resume with a last.pt)")
    print_unused_cfg_keys(args, ckpt)
    return training.fit(training.TrainConfig.from_mapping(vars(args)), ckpt, resume_path)


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
                   help='-sr layer set: 0 normal/regular, 1 shortcut, 2 tiny (as the prune script that follows)')
    p.add_argument('--sr-local', type=float, metavar='SHARE',
                   help='-sr local s decay: from --sr-local-start on, only this share of the prunable channels (the '
                        'smallest |gamma|, re-ranked every epoch) keeps the rate --s, the others get 1%% of it, so '
                        'the channels a prune keeps stop shrinking (e.g. 0.85; default: --s on all)')
    p.add_argument('--sr-local-start', type=float, default=0.5, metavar='FRACTION',
                   help='local s decay starts at this fraction of --epochs (default 0.5; 0: from the first epoch)')
    p.add_argument('--tensorboard', action='store_true',
                   help='log scalars and BN-gamma histograms to <out-dir>/tensorboard (needs the tensorboard '
                        'package; skipped with a message without it)')
    return p


def main(args):
    train(args)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
