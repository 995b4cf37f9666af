"""Distillation during training: `train.py --teacher CFG WEIGHTS [--kd W]`.

- The loss term 'kd' (its own results.csv column) is W x the objectness-weighted MSE between the student's raw
  head outputs and the frozen teacher's on the same batch; a teacher equal to the student adds exactly 0 and
  changes nothing.
- The teacher runs in eval mode without gradients and is never modified; the student may be a pruned (narrower)
  copy, as long as the head outputs have the same shapes; its class count must be the student's.
- --resume rebuilds the teacher from the checkpoint's options; under DDP every rank has its own.
"""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import models
import train as train_module
import training
from data.make_shapes import make_shapes
from models import Darknet, load_model
from tests.helpers import (REPO, free_port, interrupted_after_first_last_pt, mini_tiny, narrow_defs, randomize_,
                           write)
from tests.helpers import one_thread  # noqa: F401 (autouse: one intra-op thread in this file)
from utils.errors import DarkslimError
from utils.parse_config import infer_shapes, parse_cfg_text, write_cfg

SHAPES_NC = 5  # make_shapes classes
COMMON = ['--img-size', 64, '--workers', 0, '--notest', '--seed', 3, '--warmup-epochs', 0]


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """8 train / 4 val make_shapes images at 64 px (5 classes)."""
    return make_shapes(tmp_path_factory.mktemp('shapes') / 'shapes', n_train=8, n_val=4, img_size=64, seed=0)


def run_train(*argv):
    return train_module.train(train_module.get_args_parser().parse_args([str(a) for a in argv]))


def rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def model_files(tmp_path, name, text, seed):
    """(cfg path, .pt path) of a randomized model of cfg `text`."""
    cfg = write(tmp_path, f"{name}.cfg", text)
    defs = parse_cfg_text(text)
    infer_shapes(defs)
    pt = tmp_path / f"{name}.pt"
    models.save_checkpoint(pt, randomize_(Darknet(defs), seed))
    return cfg, pt


@pytest.fixture
def kept_runs(monkeypatch):
    """The Runs training.fit builds (to look at the teacher after the run)."""
    runs, real = [], training.build

    def build(*args, **kwargs):
        runs.append(real(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(training, 'build', build)
    return runs


def test_a_teacher_equal_to_the_student_adds_zero_and_changes_nothing(tmp_path, shapes):
    """A model without BatchNorm (so the teacher's eval mode computes what the student's training mode does)
    and one optimizer step (8 images, batch 8): the step starts from equal models, where the term and its
    gradient are exactly 0; later steps would start from a moved student."""
    cfg, start = model_files(tmp_path, 'nobn', mini_tiny(nc=SHAPES_NC, width=64, height=64).replace(
        'batch_normalize=1', 'batch_normalize=0'), seed=0)
    common = ['--cfg', cfg, '--data', shapes, '--weights', start, '--batch-size', 8, '--epochs', 1, *COMMON]
    run_train(*common, '--out-dir', tmp_path / 'plain')
    run_train(*common, '--teacher', cfg, start, '--kd', 2.0, '--out-dir', tmp_path / 'kd')
    plain, kd = rows(tmp_path / 'plain' / 'results.csv'), rows(tmp_path / 'kd' / 'results.csv')
    assert list(kd[0])[:6] == ['epoch', 'box', 'obj', 'cls', 'kd', 'total'] and 'kd' not in plain[0]
    assert float(kd[0]['kd']) == 0.0 and kd[0]['total'] == plain[0]['total']
    a = torch.load(tmp_path / 'plain' / 'last.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'kd' / 'last.pt', weights_only=True)['model']
    before = torch.load(start, weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], before[k]) for k in a)      # the step did move the weights


def test_gradients_never_reach_the_teacher(tmp_path, shapes, kept_runs):
    text = mini_tiny(nc=SHAPES_NC, width=64, height=64)
    cfg, student = model_files(tmp_path, 'student', text, seed=0)
    t_cfg, teacher = model_files(tmp_path, 'teacher', text, seed=1)
    run_train('--cfg', cfg, '--data', shapes, '--weights', student, '--batch-size', 4, '--epochs', 2, *COMMON,
              '--teacher', t_cfg, teacher, '--out-dir', tmp_path / 'run')
    t = kept_runs[0].teacher
    assert t is not None and not t.training and not any(m.training for m in t.modules())
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    ref = load_model(t_cfg, teacher).state_dict()
    assert all(torch.equal(v.cpu(), ref[k]) for k, v in t.state_dict().items())  # running stats too
    kd = [float(r['kd']) for r in rows(tmp_path / 'run' / 'results.csv')]
    assert len(kd) == 2 and all(math.isfinite(v) and v > 0 for v in kd)


def _reference_kd(student_raw, teacher_raw, w):
    """W x sum over heads of mean(weight * (s - t)^2), weight 1 on objectness and sigmoid(t_obj) + 0.01 on the
    other values of the anchor and cell (the head loss as distill.py's docstring states it), in float64 numpy."""
    total = 0.0
    for s, t in zip(student_raw, teacher_raw):
        s, t = s.double().numpy(), t.double().numpy()
        weight = np.repeat(1 / (1 + np.exp(-t[..., 4:5])) + 0.01, t.shape[-1], axis=-1)
        weight[..., 4] = 1.0
        total += (weight * (s - t) ** 2).mean()
    return w * total


def test_kd_is_w_times_the_objectness_weighted_mse_and_a_pruned_student_learns_from_a_full_teacher(
        tmp_path, shapes, monkeypatch):
    """The student has half the channels of the teacher in every non-head conv (a prune's shape); its raw
    outputs and the batch it saw are recorded by an extra term, the teacher's recomputed here."""
    t_cfg, teacher = model_files(tmp_path, 'teacher', mini_tiny(nc=SHAPES_NC, width=64, height=64), seed=1)
    s_cfg = tmp_path / 'narrow.cfg'
    write_cfg(s_cfg, narrow_defs(t_cfg, nc=SHAPES_NC, div=2, height=64, width=64))
    assert Darknet(str(s_cfg)).module_list[8][0].out_channels == 24       # teacher: 48
    seen = {}

    def spy(model, outputs, targets, imgs):
        seen.update(imgs=imgs.detach().clone(), raw=[o.detach().clone() for o in outputs])
        return outputs[0].sum() * 0

    real_terms = training.loss_terms
    monkeypatch.setattr(training, 'loss_terms', lambda run: real_terms(run) + [training.LossTerm('spy', spy)])
    w = 0.5
    run_train('--cfg', s_cfg, '--data', shapes, '--batch-size', 8, '--epochs', 1, *COMMON,
              '--teacher', t_cfg, teacher, '--kd', w, '--out-dir', tmp_path / 'run')
    with torch.no_grad():
        t_raw = load_model(t_cfg, teacher).eval()(seen['imgs'])[1]
    logged = float(rows(tmp_path / 'run' / 'results.csv')[0]['kd'])
    assert logged > 0 and logged == pytest.approx(_reference_kd(seen['raw'], t_raw, w), rel=2e-5)


def test_the_teacher_must_have_the_students_classes_and_head_shapes(tmp_path, shapes):
    cfg = write(tmp_path, 'five.cfg', mini_tiny(nc=SHAPES_NC, width=64, height=64))
    t3_cfg, t3 = model_files(tmp_path, 't3', mini_tiny(nc=3, width=64, height=64), seed=1)
    r = subprocess.run([sys.executable, 'train.py', '--cfg', str(cfg), '--data', str(shapes), '--epochs', '1',
                        '--workers', '0', '--teacher', str(t3_cfg), str(t3), '--out-dir', str(tmp_path / 'o')],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"error: --teacher {t3_cfg} has 3 classes, {cfg} 5; expected a teacher with "
                                     "the student's class count"]
    assert not (tmp_path / 'o' / 'last.pt').exists()
    # a teacher whose first maxpool keeps the resolution: every head grid twice as large
    fine_cfg, fine = model_files(tmp_path, 'fine', mini_tiny(nc=SHAPES_NC, width=64, height=64).replace(
        '[maxpool]\nsize=2\nstride=2\n', '[maxpool]\nsize=2\nstride=1\n', 1), seed=1)
    common = ['--cfg', cfg, '--data', shapes, '--epochs', 1, *COMMON, '--out-dir', tmp_path / 'o']
    with pytest.raises(DarkslimError, match=r'^--teacher: heads \(anchors, H, W, 5\+classes, new_coords\) at input '
                                            r'64x64: teacher \[\(3, 16, 16, 10, False\), \(3, 32, 32, 10, False\)\], '
                                            r'student \[\(3, 8, 8, 10, False\), \(3, 16, 16, 10, False\)\]; expected '
                                            r'equal head outputs$'):
        run_train(*common, '--teacher', fine_cfg, fine)
    with pytest.raises(DarkslimError, match=r'^--teacher \S+nope\.pt: no such file; expected the teacher\'s cfg and '
                                            r'weights$'):
        run_train(*common, '--teacher', fine_cfg, tmp_path / 'nope.pt')


def test_resume_rebuilds_the_teacher_and_continues_exactly(tmp_path, shapes, monkeypatch):
    text = mini_tiny(nc=SHAPES_NC, width=64, height=64)
    cfg, student = model_files(tmp_path, 'student', text, seed=0)
    t_cfg, teacher = model_files(tmp_path, 'teacher', text, seed=1)
    common = ['--cfg', cfg, '--data', shapes, '--weights', student, '--batch-size', 4, '--epochs', 2, *COMMON,
              '--teacher', t_cfg, teacher, '--kd', 3.0]
    run_train(*common, '--out-dir', tmp_path / 'full')
    with interrupted_after_first_last_pt(monkeypatch):
        run_train(*common, '--out-dir', tmp_path / 'cut')
    args = torch.load(tmp_path / 'cut' / 'last.pt', weights_only=True)['args']
    assert args['teacher'] == [str(t_cfg), str(teacher)] and args['kd'] == 3.0
    assert run_train('--resume', tmp_path / 'cut' / 'last.pt', '--workers', 0)['start_epoch'] == 1
    a = torch.load(tmp_path / 'full' / 'last.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'cut' / 'last.pt', weights_only=True)['model']
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    full, cut = rows(tmp_path / 'full' / 'results.csv'), rows(tmp_path / 'cut' / 'results.csv')
    assert [float(r['kd']) for r in cut] == pytest.approx([float(r['kd']) for r in full], rel=1e-4)
    assert float(cut[1]['kd']) > 0          # the resumed epoch had its teacher


def test_two_process_ddp_gives_each_rank_its_teacher(tmp_path, shapes):
    port = free_port()
    if port is None:
        pytest.skip('cannot bind a local port for torch.distributed')
    text = mini_tiny(nc=SHAPES_NC, width=64, height=64)
    cfg, student = model_files(tmp_path, 'student', text, seed=0)
    t_cfg, teacher = model_files(tmp_path, 'teacher', text, seed=1)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    argv = ['--cfg', cfg, '--data', shapes, '--weights', student, '--batch-size', 4, '--epochs', 1, *COMMON,
            '--teacher', t_cfg, teacher, '--out-dir', tmp_path / 'ddp']
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--nnodes', '1',
                        '--master_addr', '127.0.0.1', '--master_port', str(port), 'train.py',
                        *map(str, argv)], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(f"teacher {t_cfg} + {teacher}") == 1      # rank 0 logs; both ranks trained with one
    kd = [float(x['kd']) for x in rows(tmp_path / 'ddp' / 'results.csv')]
    assert len(kd) == 1 and math.isfinite(kd[0]) and kd[0] > 0
    assert json.dumps(torch.load(tmp_path / 'ddp' / 'last.pt', weights_only=True)['args']['teacher']) == json.dumps(
        [str(t_cfg), str(teacher)])
