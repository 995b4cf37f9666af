"""The training config and the loss terms: one spec for train.py and the library, one list of named terms.

- Every train.py option is one TrainConfig field with the same default, and its range is checked once, by
  TrainConfig.validate(): a library caller reads the field's name, the command line its flag.
- results.csv's loss columns are the loss terms' names; the sparsity column is the L1 penalty s * sum|gamma|.
"""
import csv
import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import models
import train as train_module
import training
import utils.parse_config
from data.make_shapes import make_shapes
from prune_utils import get_layer_set
from tests.helpers import REPO, mini_tiny, mini_yolov3, write
from utils.errors import DarkslimError
from utils.parse_config import parse_cfg_text

SHAPES_NC = 5


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """8 train / 4 val make_shapes images at 64 px (5 classes)."""
    return make_shapes(tmp_path_factory.mktemp('shapes') / 'shapes', n_train=8, n_val=4, img_size=64, seed=0)


def parse(argv):
    return train_module.get_args_parser().parse_args([str(a) for a in argv])


def _csv(path):
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


# ------------------------------------------------------------------------------------------------ one spec

# a few options as a user knows them, written out by hand: flag -> (field, default)
KNOWN_OPTIONS = {'--cfg': ('cfg', None), '--epochs': ('epochs', 100), '--batch-size': ('batch_size', 16),
                 '--out-dir': ('out_dir', 'weights'), '--hyp': ('hyp', None), '-sr': ('sr', False),
                 '--sr': ('sr', False), '--s': ('s', 0.001), '--sr-rate': ('s', 0.001), '--prune': ('prune', 0),
                 '--sr-local': ('sr_local', None), '--sr-local-start': ('sr_local_start', 0.5),
                 '--weight-decay': ('weight_decay', 5e-4), '--tensorboard': ('tensorboard', False)}


def test_every_option_is_exactly_one_config_field_with_the_same_default():
    parser = train_module.get_args_parser()
    fields = {f.name: f.default for f in dataclasses.fields(training.TrainConfig)}
    actions = [a for a in parser._actions if a.dest not in ('help', 'resume')]  # --resume: the CLI's own
    assert sorted(a.dest for a in actions) == sorted(fields)                    # one option per field, no other
    assert all(a.default == fields[a.dest] for a in actions)
    by_flag = {flag: (a.dest, a.default) for a in actions for flag in a.option_strings}
    assert {flag: by_flag[flag] for flag in KNOWN_OPTIONS} == KNOWN_OPTIONS
    parsed = vars(parse([]))
    assert {k: parsed[k] for k in fields} == dataclasses.asdict(training.TrainConfig())
    assert training.TrainConfig.from_mapping(parsed) == training.TrainConfig()


def test_flags_table_names_each_field_by_its_first_flag():
    assert train_module.FLAGS == training.option_flags()
    assert {k: train_module.FLAGS[k] for k in ('sr', 's', 'sr_local', 'batch_size', 'img_size')} == {
        'sr': '-sr', 's': '--s', 'sr_local': '--sr-local', 'batch_size': '--batch-size', 'img_size': '--img-size'}
    parsed = parse(['--sr-rate', '0.02', '-sr', '--batch-size', '4'])        # aliases still land in one field
    assert (parsed.s, parsed.sr, parsed.batch_size) == (0.02, True, 4)


# (TrainConfig keywords, the same values as train.py options, the library's line, the command line's line)
BAD_VALUES = [
    (dict(sr=True, sr_local=1.5), ['-sr', '--sr-local', 1.5],
     "sr_local 1.5; expected a share of channels in (0, 1]", "--sr-local 1.5; expected a share of channels in (0, 1]"),
    (dict(sr_local=0.5), ['--sr-local', 0.5],
     "sr_local 0.5 without sr; expected sr (local s decay is a sparsity rate)",
     "--sr-local 0.5 without -sr; expected -sr (local s decay is a sparsity rate)"),
    (dict(epochs=0), ['--epochs', 0], "epochs 0; expected an integer >= 1", "--epochs 0; expected an integer >= 1"),
    (dict(workers=-1), ['--workers', -1], "workers -1; expected an integer >= 0",
     "--workers -1; expected an integer >= 0"),
    (dict(s=-1.0), ['--s', -1], "s -1.0; expected a sparsity rate >= 0", "--s -1.0; expected a sparsity rate >= 0"),
    (dict(sr_local_start=1.0), ['--sr-local-start', 1], "sr_local_start 1.0; expected a fraction of the epochs "
     "in [0, 1)", "--sr-local-start 1.0; expected a fraction of the epochs in [0, 1)"),
    (dict(img_size=100), ['--img-size', 100], "img_size 100; expected a positive multiple of 32",
     "--img-size 100; expected a positive multiple of 32"),
    (dict(hyp=['giou']), ['--hyp', 'giou'], "hyp 'giou'; expected key=value", "--hyp 'giou'; expected key=value"),
]


@pytest.mark.parametrize('kwargs, argv, library, cli', BAD_VALUES, ids=[c[2].split(';')[0] for c in BAD_VALUES])
def test_validate_names_the_field_and_train_py_the_flag_in_the_same_line(kwargs, argv, library, cli):
    with pytest.raises(DarkslimError) as lib:
        training.TrainConfig(**kwargs).validate()
    assert str(lib.value) == library
    assert lib.value.param == library.split()[0]                   # the error carries the field it is about
    with pytest.raises(DarkslimError) as cmd:
        train_module.train(parse(['--cfg', 'any.cfg', '--data', 'any.data', *argv]))
    assert str(cmd.value) == cli and cmd.value.param == lib.value.param


def test_validate_refuses_what_argparse_would_for_library_callers():
    for kwargs, line in ((dict(prune=3), "prune 3; expected one of 0, 1, 2"),
                         (dict(epochs='3'), "epochs '3'; expected an integer >= 1"),
                         (dict(lr0=None), "lr0 None; expected >= 0")):
        with pytest.raises(DarkslimError) as e:
            training.TrainConfig(**kwargs).validate()
        assert str(e.value) == line
    assert training.TrainConfig(cutoff=None, img_size=None, sr_local=None).validate().epochs == 100


def test_the_command_line_prints_the_flag_and_exits_2_without_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, 'train.py', '--cfg', 'any.cfg', '--data', 'any.data', '--sr-local', '0.5',
                        '--out-dir', str(tmp_path / 'o')], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["error: --sr-local 0.5 without -sr; expected -sr (local s decay is a sparsity "
                                     "rate)"]
    assert not (tmp_path / 'o').exists()


def test_fit_validates_before_it_touches_anything(tmp_path):
    with pytest.raises(DarkslimError, match=r'^batch_size 0; expected an integer >= 1$'):
        training.fit(training.TrainConfig(cfg='any.cfg', data='any.data', batch_size=0, out_dir=str(tmp_path / 'o')))
    assert not (tmp_path / 'o').exists()


def test_unused_cfg_keys_name_fields_for_the_library_and_flags_for_train_py():
    defs = parse_cfg_text(mini_tiny(nc=2).replace('[net]\n', '[net]\nlearning_rate=0.001\nhue=.1\n', 1), 'k.cfg')
    assert [line.split(' -> ')[1] for line in training.unused_cfg_keys(defs)] == ['lr0', 'hyp hsv_h=']
    assert [line.split(' -> ')[1] for line in training.unused_cfg_keys(defs, train_module.FLAGS)] == [
        '--lr0', '--hyp hsv_h=']


def test_the_cfg_is_parsed_once_per_run(tmp_path, shapes, monkeypatch):
    cfg = write(tmp_path, 't.cfg', mini_tiny(nc=SHAPES_NC, width=64, height=64))
    calls = []
    real = utils.parse_config.parse_cfg

    def counted(path):
        calls.append(str(path))
        return real(path)

    for module in (utils.parse_config, training, models):
        monkeypatch.setattr(module, 'parse_cfg', counted)
    train_module.train(parse(['--cfg', cfg, '--data', shapes, '--img-size', 64, '--batch-size', 8, '--workers', 0,
                              '--epochs', 1, '--notest', '--out-dir', tmp_path / 'run']))
    assert calls == [str(cfg)]


# ------------------------------------------------------------------------------------------------ loss terms

def test_loss_terms_are_detection_then_sparsity_with_sr():
    plain = training.loss_terms(SimpleNamespace(loss_hyp={}, sr=None))
    assert [t.name for t in plain] == ['detection']
    assert training.results_header(plain)[:5] == ['epoch', 'box', 'obj', 'cls', 'total']
    with_sr = training.loss_terms(SimpleNamespace(loss_hyp={}, sr=object()))
    assert [t.name for t in with_sr] == ['detection', 'sparsity']
    assert training.loss_columns(with_sr) == ['box', 'obj', 'cls', 'sparsity', 'total']


def test_results_columns_are_the_loss_terms_and_sparsity_logs_s_times_sum_abs_gamma(tmp_path, shapes, monkeypatch):
    """One optimizer step (8 images, batch 8, no EMA): the logged sparsity is s * sum|gamma| over the prunable
    BN layers of the weights saved after that step; a term added in loss_terms gets its own column."""
    real_terms = training.loss_terms
    zero = training.LossTerm('zero', loss=lambda model, outputs, targets, imgs: sum(o.sum() for o in outputs) * 0)
    monkeypatch.setattr(training, 'loss_terms', lambda run: real_terms(run) + [zero])
    cfg = write(tmp_path, 'y.cfg', mini_yolov3(nc=SHAPES_NC, width=64, height=64))
    s = 0.05
    train_module.train(parse(['--cfg', cfg, '--data', shapes, '--img-size', 64, '--batch-size', 8, '--workers', 0,
                              '--epochs', 1, '--notest', '-sr', '--s', s, '--prune', 0, '--out-dir', tmp_path / 'r']))
    header, rows = _csv(tmp_path / 'r' / 'results.csv')
    assert header == ['epoch', 'box', 'obj', 'cls', 'sparsity', 'zero', 'total', *training.METRIC_COLUMNS]
    row = {k: float(v) for k, v in rows[0].items()}
    layers = get_layer_set(parse_cfg_text(cfg.read_text())[1:], 0).prunable
    state = torch.load(tmp_path / 'r' / 'last.pt', weights_only=True)['model']
    l1 = sum(state[f"module_list.{i}.BatchNorm2d.weight"].double().abs().sum().item() for i in layers)
    assert row['sparsity'] == pytest.approx(s * l1, rel=1e-5)
    assert row['zero'] == 0
    assert row['total'] == pytest.approx(row['box'] + row['obj'] + row['cls'] + row['sparsity'], rel=1e-5)


def test_a_resume_with_other_terms_keeps_every_column(tmp_path):
    path = tmp_path / 'results.csv'
    path.write_text('epoch,box,obj,cls,total,lr\n0,1,2,3,6,0.01\n')
    header = ['epoch', 'box', 'obj', 'cls', 'sparsity', 'total', 'lr']
    row = {'epoch': 1, 'box': 1.5, 'obj': 2.0, 'cls': 3.0, 'sparsity': 0.25, 'total': 6.75, 'lr': 0.005}
    path.write_text(training._results_text(path, header, row, keep=True))
    columns, rows = _csv(path)
    assert columns == header
    assert rows[0] == {'epoch': '0', 'box': '1', 'obj': '2', 'cls': '3', 'sparsity': 'nan', 'total': '6', 'lr': '0.01'}
    assert rows[1] == {k: f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in row.items()}
    path.write_text(training._results_text(path, ['epoch', 'total'], {'epoch': 2, 'total': 1.0}, keep=True))
    columns, rows = _csv(path)
    assert columns == ['epoch', 'total', 'box', 'obj', 'cls', 'sparsity', 'lr']     # nothing written is lost
    assert rows[2]['sparsity'] == 'nan' and rows[1]['sparsity'] == '0.25'
