"""Every prune strategy writes the same .cfg and .weights bytes as the recorded reference run.

`tests/data/prune_identity.json` holds, for a fixed set of prunes (each strategy, layer and layer + channel,
with and without `--calib 8`, on the demo cfgs and on narrow copies of yolov3, yolov3-spp and yolov4-tiny
with seeded weights), the SHA-256 of the written .cfg and .weights and a probe of the weights (every k-th
float). It was recorded by running this module as a script before the pruning code was restructured:

    python -m tests.test_prune_identity --record     # rewrites tests/data/prune_identity.json

A cfg is integer text: its bytes must match everywhere. Weights come from float kernels: on the machine and
library versions that recorded them they must match byte for byte; elsewhere the probe must agree to 1e-4
(another CPU's kernels may round differently).
"""
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import layer_prune
import normal_prune
import regular_prune
import shortcut_prune
import tiny_prune
from models import Darknet
from tests.helpers import REPO, narrow_defs, randomize_
from utils.darknet_weights import save_weights
from utils.parse_config import parse_cfg, write_cfg

RECORD = Path(__file__).parent / 'data' / 'prune_identity.json'
SCRIPTS = {'normal': normal_prune, 'regular': regular_prune, 'shortcut': shortcut_prune, 'tiny': tiny_prune,
           'layer': layer_prune}
MODELS = {  # name -> (cfg file under cfg/, narrowed?, weight seed)
    'v3demo': ('yolov3-demo.cfg', False, 1),
    'tinydemo': ('yolov3-tiny-demo.cfg', False, 2),
    'yolov3': ('yolov3.cfg', True, 3),
    'spp': ('yolov3-spp.cfg', True, 4),
    'v4tiny': ('yolov4-tiny.cfg', True, 5),
}
BASE_CASES = [  # (model, script, options)
    ('v3demo', 'normal', ['--percent', '0.5']),
    ('v3demo', 'regular', ['--percent', '0.5']),
    ('v3demo', 'regular', ['--percent', '0.5', '--round-to', '8']),
    ('v3demo', 'shortcut', ['--percent', '0.5']),
    ('v3demo', 'layer', ['--shortcuts', '1']),
    ('v3demo', 'layer', ['--shortcuts', '2', '--percent', '0.3']),
    ('tinydemo', 'tiny', ['--percent', '0.3']),
    ('yolov3', 'normal', ['--percent', '0.5']),
    ('yolov3', 'shortcut', ['--percent', '0.5']),
    ('yolov3', 'layer', ['--shortcuts', '3', '--percent', '0.3']),
    ('spp', 'shortcut', ['--percent', '0.5']),
    ('spp', 'layer', ['--shortcuts', '2']),
    ('v4tiny', 'tiny', ['--percent', '0.3']),
    ('v4tiny', 'regular', ['--percent', '0.3', '--round-to', '8']),
]
CALIB = ['--calib', '8', '--img-size', '64']
CASES = BASE_CASES + [(m, s, o + CALIB) for m, s, o in BASE_CASES if s != 'layer']  # layer --calib is newer


def case_id(case):
    model, script, options = case
    return '-'.join([model, script] + [o.lstrip('-') for o in options])


def machine():
    """What the weights bytes may depend on: the CPU model and the float libraries' versions."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return {'cpu': cpu, 'torch': torch.__version__, 'numpy': np.__version__}


def make_inputs(root):
    """Each model's cfg + seeded .weights, and an 8-image calibration dataset, under `root`."""
    from data.make_shapes import make_shapes
    files = {}
    for name, (cfg, narrow, seed) in MODELS.items():
        defs = narrow_defs(REPO / 'cfg' / cfg, nc=5, div=8, height=96, width=128) if narrow else \
            parse_cfg(REPO / 'cfg' / cfg)
        model = randomize_(Darknet(defs), seed=seed).eval()
        files[name] = (write_cfg(root / f'{name}.cfg', defs), save_weights(model, root / f'{name}.weights'))
    data = make_shapes(root / 'shapes', n_train=8, n_val=1, img_size=64, seed=3)
    return files, data


def run_case(case, files, data, out_dir):
    """Run one prune in-process; returns the output prefix."""
    model, script, options = case
    cfg, weights = files[model]
    prefix = out_dir / case_id(case)
    args = ['--cfg', str(cfg), '--weights', str(weights), '--latency-runs', '0', '--out', str(prefix), *options]
    if '--calib' in options:
        args += ['--data', str(data)]
    module = SCRIPTS[script]
    module.main(module.get_args_parser().parse_args(args))
    return prefix


def fingerprint(prefix):
    """{'cfg', 'weights'} SHA-256 and 'probe': at most 512 floats of the weights file, evenly spaced."""
    cfg, weights = Path(f'{prefix}.cfg').read_bytes(), Path(f'{prefix}.weights').read_bytes()
    floats = np.frombuffer(weights[20:], dtype=np.float32)     # after darknet's 20-byte header
    step = max(1, len(floats) // 512)
    return {'cfg': hashlib.sha256(cfg).hexdigest(), 'weights': hashlib.sha256(weights).hexdigest(),
            'probe': floats[::step].astype(float).tolist(), 'n_floats': len(floats)}


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp('identity'))


@pytest.fixture(scope='module')
def record():
    return json.loads(RECORD.read_text())


@pytest.mark.parametrize('case', CASES, ids=case_id)
def test_prune_outputs_equal_the_recorded_reference(case, inputs, record, tmp_path):
    torch.set_num_threads(1)
    files, data = inputs
    got = fingerprint(run_case(case, files, data, tmp_path))
    want = record['cases'][case_id(case)]
    assert got['cfg'] == want['cfg']
    assert got['n_floats'] == want['n_floats']
    if machine() == record['machine']:
        assert got['weights'] == want['weights']
    else:
        np.testing.assert_allclose(got['probe'], want['probe'], rtol=1e-4, atol=1e-4)


def main():
    """Record the reference (see the module docstring)."""
    import tempfile
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files, data = make_inputs(root)
        cases = {case_id(c): fingerprint(run_case(c, files, data, root)) for c in CASES}
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps({'machine': machine(), 'cases': cases}, indent=1) + '\n')
    print(f"wrote {RECORD}: {len(cases)} cases")


if __name__ == '__main__' and sys.argv[1:] == ['--record']:
    main()
