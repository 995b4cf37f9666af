"""The sparsity rate's schedule (-sr --s S --s-final F) and the estimate of how long sparsifying takes.

- The rate is linear per epoch from S (first epoch) to S x F (last epoch); with local decay the scheduled rate is
  the pressed channels' rate and 1 % of it the others'.
- The sparsity line of every epoch gives the epochs the median prunable |gamma| needs to reach 0 at the current
  rate: median x (1 - momentum) / (lr x s) optimizer steps, checked against running the training's own
  optimizer on the L1 subgradient alone.
"""
import csv
import re
from types import SimpleNamespace

import pytest
import torch

import train as train_module
import training
from data.make_shapes import make_shapes
from models import Darknet
from prune_utils import get_layer_set
from tests.helpers import conv, mini_tiny, write
from tests.helpers import one_thread  # noqa: F401 (autouse: one intra-op thread in this file)
from utils.errors import DarkslimError
from utils.parse_config import infer_shapes, parse_cfg_text
from utils.sparsity import BNSparsity, epochs_to_zero, optimizer_steps, scheduled_rate

SHAPES_NC = 5


def test_the_rate_is_linear_from_s_to_s_times_final_over_the_epochs():
    # by hand: s = 0.01 to 0.01 x 0.1 = 0.001 over 5 epochs, steps of 0.009 / 4 = 0.00225
    assert [scheduled_rate(0.01, 0.1, e, 5) for e in range(5)] == pytest.approx(
        [0.01, 0.00775, 0.0055, 0.00325, 0.001], rel=1e-12)
    assert [scheduled_rate(0.002, 3.0, e, 3) for e in range(3)] == pytest.approx([0.002, 0.004, 0.006], rel=1e-12)
    assert [scheduled_rate(0.01, None, e, 4) for e in range(4)] == [0.01] * 4      # no schedule: constant
    assert scheduled_rate(0.01, 0.1, 0, 1) == 0.01                                   # one epoch: the start rate


def one_bn_layer(channels):
    """A Darknet of one BN conv (no heads) and the layer set that regularizes it."""
    defs = parse_cfg_text("[net]\nwidth=32\nheight=32\nchannels=3\n" + conv(channels, 3))
    infer_shapes(defs)
    return Darknet(defs), SimpleNamespace(prunable=[0], excluded={})


def test_local_decay_keeps_its_channels_under_a_new_rate():
    model, layers = one_bn_layer(10)
    with torch.no_grad():
        model.module_list[0][1].weight.copy_(torch.arange(1, 11, dtype=torch.float32))   # |gamma| 1..10
    sr = BNSparsity(model, layers, 0.1, verbose=False)
    assert sr.local_decay(0.3) == 3
    sr.set_rate(0.02)
    expected = torch.tensor([0.02] * 3 + [0.02 * 0.01] * 7)      # the 3 smallest pressed, the rest at 1 %
    assert torch.allclose(sr.rates[0], expected, rtol=1e-6)
    with pytest.raises(DarkslimError, match='sparsity rate s=-1.0; expected >= 0'):
        sr.set_rate(-1.0)


def brute_force_epochs(momentum, lr, s, batches, accumulate, median, channels=15, limit=100000):
    """The epoch (1-based) in which the channel with the median |gamma| first reaches 0, running
    training.build_optimizer's SGD with only BNSparsity's subgradient, stepping where train_one_epoch does (every
    `accumulate` batches and after the last). Checked after every step: past 0 the subgradient turns and gamma
    hovers around 0 by about a step, so at an epoch's end it may be back above."""
    model, layers = one_bn_layer(channels)
    gamma = model.module_list[0][1].weight
    with torch.no_grad():
        gamma.copy_(torch.linspace(0.5, 1.5, channels) * median)     # the middle one (index 7) is the median
    opt = training.build_optimizer(model, training.TrainConfig(lr0=lr, momentum=momentum))
    sr = BNSparsity(model, layers, s, verbose=False)
    for epoch in range(1, limit + 1):
        for i in range(batches):
            if (i + 1) % accumulate == 0 or i == batches - 1:
                sr.step()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if gamma[channels // 2].item() <= 0:
                    return epoch
    raise AssertionError('never crossed 0')


@pytest.mark.parametrize('momentum, accumulate', [(0.937, 1), (0.937, 2), (0.0, 2), (0.8, 3)])
def test_the_epochs_needed_agree_with_running_the_optimizer(momentum, accumulate):
    """The run may take longer than the estimate by up to one epoch (the crossing is counted in whole epochs)
    plus the lag the estimate leaves out: the momentum buffer starts empty, so the first steps are
    shorter, by momentum^2 / (1 - momentum) steps in all (~14 at 0.937, 0 without momentum)."""
    lr, s, batches = 0.01, 0.001, 5
    steps = optimizer_steps(batches, accumulate)
    assert steps == -(-batches // accumulate)                        # 5 batches: 5, 3 or 2 steps
    median = 1000 * lr * s / (1 - momentum)                          # ~1000 steps to 0
    estimate = epochs_to_zero(median, lr, s, momentum, steps)
    counted = brute_force_epochs(momentum, lr, s, batches, accumulate, median)
    lag = momentum ** 2 / (1 - momentum) / steps
    assert estimate <= counted <= estimate + lag + 1, (counted, estimate, lag)
    assert epochs_to_zero(median, lr, 0.0, momentum, steps) == float('inf')


# ------------------------------------------------------------------------------------------------ train.py

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """8 train / 4 val make_shapes images at 64 px (5 classes)."""
    return make_shapes(tmp_path_factory.mktemp('shapes') / 'shapes', n_train=8, n_val=4, img_size=64, seed=0)


def run_train(*argv):
    return train_module.train(train_module.get_args_parser().parse_args([str(a) for a in argv]))


def test_training_follows_the_schedule_and_logs_the_epochs_needed(tmp_path, shapes, capsys):
    """3 epochs of one optimizer step each (batch 8 of 8 images), s 0.05 -> 0.05 x 0.2: the last epoch's
    sparsity column (s x sum|gamma| after its step) over the L1 norm of last.pt's prunable gammas is 0.01."""
    cfg = write(tmp_path, 'five.cfg', mini_tiny(nc=SHAPES_NC, width=64, height=64))
    run_train('--cfg', cfg, '--data', shapes, '--img-size', 64, '--batch-size', 8, '--workers', 0, '--epochs', 3,
              '--notest', '--warmup-epochs', 0, '--lrf', 1, '-sr', '--s', 0.05, '--s-final', 0.2, '--prune', 2,
              '--out-dir', tmp_path / 'run')
    out = capsys.readouterr().out
    logged = [float(x) for x in re.findall(r'epoch \d sparsity rate s=(\S+) ', out)]
    assert logged == pytest.approx([0.05, 0.03, 0.01], rel=1e-6)
    with open(tmp_path / 'run' / 'results.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    state = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)['model']
    layers = get_layer_set(parse_cfg_text(cfg.read_text())[1:], 2).prunable
    l1 = sum(state[f"module_list.{i}.BatchNorm2d.weight"].double().abs().sum().item() for i in layers)
    assert float(rows[-1]['sparsity']) / l1 == pytest.approx(0.01, rel=1e-5)
    # the needs line: median x (1 - 0.937) / (lr x s) steps, one step an epoch, with results.csv's median and lr
    needs = re.findall(r'epoch (\d) sparsity: .*; median \|gamma\| (\S+) needs ~(\S+) epochs to reach 0 at s=(\S+), '
                       r'lr=(\S+) \(momentum 0.937, 1 optimizer step/epoch, (\d) epochs left\)', out)
    assert [(int(e), int(left)) for e, _, _, _, _, left in needs] == [(0, 2), (1, 1), (2, 0)]
    for (epoch, _, n, s, lr, _), row in zip(needs, rows):
        assert (float(s), float(lr)) == pytest.approx((logged[int(epoch)], float(row['lr'])), rel=1e-3)
        assert float(n) == pytest.approx(float(row['gamma_p50']) * (1 - 0.937) / (float(lr) * float(s)), rel=5e-3)
    with pytest.raises(DarkslimError, match=r'^--s-final 0.2 without -sr; expected -sr \(a schedule of the sparsity '
                                            r'rate\)$'):
        run_train('--cfg', cfg, '--data', shapes, '--s-final', 0.2, '--out-dir', tmp_path / 'bad')
