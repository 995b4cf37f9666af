"""ONNX export (utils/onnx_export.py), specified against onnxruntime: the exported (BN-fused) graph computes what
our unfused PyTorch eval forward computes, for original and pruned models, with fixed or dynamic batch and size;
the file declares its opset and output shapes and is written atomically."""
import os

import numpy as np
import pytest
import torch

from models import Darknet
from prune_utils import compact_model, get_layer_set, make_plan
from tests.helpers import ANCHORS6, REPO, conv, narrow_defs, need_shared, randomize_, sparsify_, write, yolo
from utils.errors import DarkslimError
from utils.onnx_export import export_onnx
from utils.parse_config import parse_cfg
from tests.helpers import one_thread  # noqa: F401 (autouse: one intra-op thread in this file)

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

H, W = 128, 160   # small, non-square
TOL = 1e-4

# name -> (where the cfg is, narrow it (yolov3 / -spp: their graph at a quarter width, for speed), prune mode)
MODELS = {'yolov3': ('cfg', True, 'shortcut'), 'yolov3-spp': ('cfg', True, 'normal'),
          'yolov3-tiny': ('cfg', False, 'tiny'), 'yolov4-tiny': ('shared', False, 'normal')}




def build(name, pruned, seed=0):
    where, narrow, mode = MODELS[name]
    path = REPO / 'cfg' / f'{name}.cfg' if where == 'cfg' else need_shared(f'darknet-cfg/{name}.cfg')
    defs = narrow_defs(path, nc=4, div=4, height=H, width=W) if narrow else parse_cfg(path)
    model = randomize_(Darknet(defs, img_size=(H, W)), seed=seed).eval()
    if not pruned:
        return model
    layer_set = get_layer_set(model.module_defs, mode)
    sparsify_(model, layer_set, share=0.4, seed=seed + 1, beta='random')
    plan = make_plan(model, layer_set, mode, threshold=0.25)   # randomize_ keeps |gamma| >= 0.5 elsewhere
    return compact_model(model, plan).eval()


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=['CPUExecutionProvider'])


def diffs(model, sess, x):
    """(largest |raw difference|, largest detection difference relative to max(1, |value|)) of onnxruntime vs
    our PyTorch eval forward. Detections hold pixels (w, h = exp(t) * anchor reach thousands), where float32
    rounding alone exceeds 1e-4 absolute; scores (0..1) are compared absolutely by the same formula."""
    with torch.no_grad():
        det, raw = model(x)
    got = sess.run(None, {'images': x.numpy()})
    assert [o.shape for o in got] == [tuple(det.shape)] + [tuple(r.shape) for r in raw]
    d_raw = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got[1:], raw))
    ref = det.numpy()
    d_det = float((np.abs(got[0] - ref) / np.maximum(1.0, np.abs(ref))).max())
    return d_raw, d_det


def image(batch=1, h=H, w=W, seed=1):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('pruned', [False, True], ids=['original', 'pruned'])
@pytest.mark.parametrize('name', list(MODELS))
def test_onnxruntime_equals_pytorch(name, pruned, tmp_path):
    model = build(name, pruned)
    info = export_onnx(model, tmp_path / 'm.onnx')
    proto = onnx.load(str(tmp_path / 'm.onnx'))
    onnx.checker.check_model(proto)
    assert {o.domain: o.version for o in proto.opset_import}[''] == 17 == info.opset     # the default opset
    sess = session(tmp_path / 'm.onnx')
    assert [o.name for o in sess.get_outputs()] == ['detections'] + [f'yolo_{i}' for i in model.yolo_layers]
    assert [o.shape for o in sess.get_outputs()] == list(info.outputs.values())   # declared = what it returns
    d_raw, d_det = diffs(model, sess, image())
    assert d_raw <= TOL and d_det <= TOL
    assert isinstance(model.module_list[0][1], torch.nn.BatchNorm2d)            # the caller's model is not fused


def test_dynamic_batch_runs_batch_1_and_3(tmp_path):
    model = build('yolov3-tiny', pruned=False, seed=2)
    export_onnx(model, tmp_path / 'm.onnx', dynamic=True)
    proto = onnx.load(str(tmp_path / 'm.onnx'))
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == 'batch' and not dim0.dim_value
    sess = session(tmp_path / 'm.onnx')
    for b in (1, 3):
        d_raw, d_det = diffs(model, sess, image(batch=b, seed=b))
        assert d_raw <= TOL and d_det <= TOL


def test_fixed_batch_export_refuses_another_batch(tmp_path):
    model = build('yolov3-tiny', pruned=False)
    export_onnx(model, tmp_path / 'm.onnx', batch=2)
    sess = session(tmp_path / 'm.onnx')
    assert sess.get_inputs()[0].shape == [2, 3, H, W]
    with pytest.raises(Exception, match='(?i)dimension|shape'):
        sess.run(None, {'images': image(batch=3).numpy()})


def test_dynamic_size_runs_other_multiples_of_the_stride(tmp_path):
    model = build('yolov4-tiny', pruned=False, seed=3)
    export_onnx(model, tmp_path / 'm.onnx', dynamic_hw=True)
    sess = session(tmp_path / 'm.onnx')
    for h, w in ((96, 224), (160, 128)):
        d_raw, d_det = diffs(model, sess, image(2, h, w, seed=h))
        assert d_raw <= TOL and d_det <= TOL


def test_dynamic_size_refuses_a_traced_size_with_a_fractional_stride(tmp_path):
    # one head behind two stride-2 convs: 102 -> 51 -> 26 rows, 102 / 26 is no whole stride to keep
    text = "[net]\nwidth=128\nheight=128\nchannels=3\n" + conv(8, 3, 2) + conv(8, 3, 2)
    text += conv(3 * 7, 1, bn=0, act='linear') + yolo([0, 1, 2], ANCHORS6[:3], 2)
    model = randomize_(Darknet(write(tmp_path, 'one.cfg', text))).eval()
    with pytest.raises(DarkslimError, match=r'102x128: \[yolo\] layer 3 has a 26x32 grid, stride not whole'):
        export_onnx(model, tmp_path / 'odd.onnx', img_size=(102, 128), dynamic_hw=True)
    assert not (tmp_path / 'odd.onnx').exists()
    export_onnx(model, tmp_path / 'ok.onnx', img_size=(96, 128), dynamic_hw=True)   # 96 / 24 = 4


def test_requested_opset_is_recorded_in_the_model(tmp_path):
    model = build('yolov3-tiny', pruned=True)
    info = export_onnx(model, tmp_path / 'm.onnx', opset=18)
    proto = onnx.load(str(tmp_path / 'm.onnx'))
    assert {o.domain: o.version for o in proto.opset_import}[''] == 18 == info.opset
    d_raw, d_det = diffs(model, session(tmp_path / 'm.onnx'), image(seed=5))
    assert d_raw <= TOL and d_det <= TOL


def test_too_old_opset_is_refused_without_writing(tmp_path):
    with pytest.raises(DarkslimError, match='opset 9; expected 11 or higher'):
        export_onnx(build('yolov3-tiny', pruned=False), tmp_path / 'm.onnx', opset=9)
    assert list(tmp_path.iterdir()) == []


def test_written_atomically(tmp_path, monkeypatch):
    model = build('yolov3-tiny', pruned=False)
    out = tmp_path / 'm.onnx'
    export_onnx(model, out)
    assert sorted(os.listdir(tmp_path)) == ['m.onnx']                  # no temp file left behind
    before = out.read_bytes()

    def half_written(module, args, f, **kw):                          # the exporter dies mid-write
        with open(f, 'wb') as fh:
            fh.write(before[:100])
        raise RuntimeError('disk full')
    monkeypatch.setattr(torch.onnx, 'export', half_written)
    with pytest.raises(RuntimeError, match='disk full'):
        export_onnx(model, out)
    assert sorted(os.listdir(tmp_path)) == ['m.onnx'] and out.read_bytes() == before


def test_models_py_export_command_writes_what_onnxruntime_runs(tmp_path):
    """`python models.py export` end to end: a cfg + .weights pair in, an ONNX file out whose detections and raw
    heads equal our forward of the same files (dynamic batch run at batch 2)."""
    import subprocess
    import sys
    from models import load_model
    from utils.darknet_weights import save_weights
    cfg = write(tmp_path, 't.cfg', (REPO / 'cfg' / 'yolov3-tiny.cfg').read_text())
    weights = save_weights(randomize_(Darknet(cfg), seed=5), tmp_path / 't.weights')
    out = tmp_path / 't.onnx'
    r = subprocess.run([sys.executable, 'models.py', 'export', '--cfg', str(cfg), '--weights', str(weights),
                        '--out', str(out), '--img-size', '128', '--dynamic'], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'opset 17' in r.stdout and 'detections' in r.stdout
    model = load_model(cfg, weights, img_size=128)
    raw, det = diffs(model, session(out), torch.rand(2, 3, 128, 128))
    assert raw < TOL and det < TOL
