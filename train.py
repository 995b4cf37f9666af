"""Train a Darknet-cfg YOLOv3 model; with -sr, sparsity training (L1 on BN gammas) for network slimming.

    python train.py --cfg C --data D [--weights W [--cutoff K]] [--epochs 100] [--batch-size 16] [--img-size N]
    python train.py --cfg my-3cls.cfg --data D --weights yolov3-tiny.weights  # transfer: another class count
    python train.py --data D --weights last.pt                                # the cfg stored in the .pt
    python train.py --cfg C --data D --weights W -sr --s 0.001 --prune 1      # sparsity training for a prune
    python train.py ... -sr --s 0.01 --s-final 0.1                            # rate linear from s to s x 0.1
    python train.py --cfg pruned.cfg --data D --weights pruned.weights       # fine-tune a pruned model
    python train.py ... --teacher dense.cfg dense.weights [--kd 1.0]          # + distillation from a teacher
    python train.py --resume [PATH]                                            # continue <out-dir>/last.pt
    torchrun --nproc_per_node N train.py ... -sr --sr-rate 0.001               # DDP (gloo on CPU, nccl on CUDA)

(Under torchrun write the sparsity rate as --sr-rate: torchrun's parser rejects `--s` as an ambiguous prefix of
its own options.)

--weights loads every layer whose tensors fit the cfg (all or nothing per layer) and names, in one line, the layers
it left at their initialisation: from a model of another class count (a .pt, or a darknet .weights whose class
count is solved from its length), the convs feeding [yolo]; those get prior biases. --cutoff K reads exactly the
first K layers of a .weights instead. --teacher CFG WEIGHTS adds the loss term `kd` (results.csv column):
--kd x the objectness-weighted MSE between the teacher's raw head outputs and the student's on the same batch
(distill.head_loss); the teacher (same class count and head shapes; the student may be a pruned copy) runs
frozen, in eval mode, on every DDP rank, and a --resume rebuilds it.

Every epoch: training (tqdm bar), evaluation of `valid` (P, R, mAP@0.5, mAP@0.5:0.95, F1) appended to
<out-dir>/results.csv, then last.pt / last.weights and, when the fitness 0.1*mAP50 + 0.9*mAP50_95 improves,
best.pt / best.weights (all written atomically). With -sr also the |gamma| statistics, the epochs the median
prunable |gamma| needs to reach 0 at the current rate (lr*s/(1-momentum) per optimizer step: see --s), and a
histogram <out-dir>/gamma_hist_epoch<N>.png. After the last epoch, <out-dir>/results.png plots results.csv. With
--tensorboard (and the tensorboard package installed), scalars and the regularized BN-gamma histograms go to
<out-dir>/tensorboard.

The work is done by training.py (build, train_one_epoch, evaluate_epoch, save_checkpoint, fit); this script
parses the options into a training.TrainConfig. Checkpoint contents and the optimisation are described there.
"""
import argparse
import contextlib
import dataclasses
import os
import sys

import training
from utils.errors import DarkslimError, cli_main

# The options are TrainConfig's fields: flags, help, defaults and ranges are declared there once (training.Option);
# an error about a field (DarkslimError.param) is shown with the field's flag from this table.
FLAGS = training.option_flags()  # {TrainConfig field: the flag messages name it by}, e.g. 'sr' -> '-sr'


@contextlib.contextmanager
def flag_errors():
    """Re-raise a DarkslimError about a TrainConfig field (`param`) as the same line naming fields by their
    flags (e.g. 'sr_local 1.5; ...' -> '--sr-local 1.5; ...')."""
    try:
        yield
    except DarkslimError as e:
        if e.param is None:
            raise
        raise DarkslimError(e.shown(FLAGS), param=e.param) from None


def _config(args):
    """The validated TrainConfig of the parsed options."""
    return training.TrainConfig.from_mapping(vars(args)).validate()


def _restore_args(args, saved):
    """--resume: options left at their defaults take the interrupted run's values (so `--resume` alone
    continues the same run); options given on this command line win. The cfg comes from the checkpoint
    when --cfg is not given."""
    fields = {f.name for f in dataclasses.fields(training.TrainConfig)}
    explicit = set(getattr(args, 'explicit', ()))
    for k, v in saved.items():
        if k != 'cfg' and k in fields and k not in explicit:
            setattr(args, k, v)


def resolve_resume(args):
    """(checkpoint path, checkpoint dict) for --resume, or (None, None)."""
    if args.resume is None:
        return None, None
    path = args.resume if args.resume != 'auto' else os.path.join(args.out_dir, 'last.pt')
    if not os.path.isfile(path):
        raise DarkslimError(f"--resume: {path} not found; expected a last.pt written by train.py")
    return path, training.read_resume(path)


def train(args):
    """Train as the options say; returns training.fit's summary (rank 0; other ranks get {})."""
    with flag_errors():
        _config(args)
        resume_path, ckpt = resolve_resume(args)
        if ckpt is not None:
            _restore_args(args, ckpt.get('args') or {})
        return training.fit(_config(args), ckpt, resume_path, names=FLAGS)


class _ArgParser(argparse.ArgumentParser):
    """Records which options the command line gave (`args.explicit`), so --resume restores only the others."""

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        ns, rest = super().parse_known_args(argv, namespace)
        given = {tok.split('=', 1)[0] for tok in argv if tok.startswith('-')}
        ns.explicit = sorted(a.dest for a in self._actions if given & set(a.option_strings))
        return ns, rest


def argparse_keywords(f, opt):
    """add_argument keywords of TrainConfig field `f` with Option `opt`: a bool is a switch, an int or float
    option converts its text, the field's default is the option's."""
    kw = {'dest': f.name, 'default': f.default, **opt.argparse}
    if f.type is bool:
        kw['action'] = 'store_true'
    elif f.type in (int, float):
        kw['type'] = f.type
    if opt.help is not None:
        kw['help'] = opt.help
    return kw


def get_args_parser():
    p = _ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    for f, opt in training.options():
        p.add_argument(*opt.spellings(f.name), **argparse_keywords(f, opt))
        if f.name == 'out_dir':  # the command line's own option (training.fit takes the checkpoint itself)
            p.add_argument('--resume', nargs='?', const='auto', default=None,
                           help='continue <out-dir>/last.pt, or the given checkpoint')
    return p


def main(args):
    train(args)
    return 0


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
