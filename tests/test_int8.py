"""INT8 export (utils/quantize.py via `models.py export --int8`) and the evaluation of exported models
(`test.py --onnx`, utils/onnx_export.OnnxDetector behind utils/evaluate.py), specified against onnxruntime and
against the PyTorch evaluation of the same weights.

The model is a small detector trained here for a few seconds to overfit 8 synthetic images (make_shapes), so
that its mAP on them is far from 0 and an INT8 model that lost the function would show it; "self.data" scores
it on those training images."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import models
import test as test_cli
from data.make_shapes import make_shapes
from models import Darknet, save_checkpoint
from tests.helpers import REPO, mini_tiny
from tests.helpers import one_thread  # noqa: F401 (autouse: one intra-op thread in this file)
from utils import datasets, quantize
from utils.errors import DarkslimError, cli_main
from utils.evaluate import evaluate
from utils.loss import compute_loss

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

S = 64          # input side
N_TRAIN = 8     # images the model overfits
STEPS = 150     # Adam steps on the whole batch: mAP@0.5 ~0.7 on the training images


def _train(cfg, train_list, seed=0):
    """mini_tiny trained on every image of `train_list` at once (no augmentation), eval mode."""
    torch.manual_seed(seed)
    model = Darknet(str(cfg))
    ds = datasets.LoadImagesAndLabels(str(train_list), S, augment=False, nc=5)
    imgs, targets, _, _ = ds.collate_fn([ds[i] for i in range(len(ds))])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for step in range(STEPS):
        for g in opt.param_groups:
            g['lr'] = 0.02 * (1 - step / STEPS)
        loss = compute_loss(model(imgs), targets, model)
        loss = loss[0] if isinstance(loss, tuple) else loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """{'pt': checkpoint (stores its cfg), 'data': .data scoring the training images, 'train': their paths,
    'dir': a folder, 'fp32': the fixed-size FP32 export}."""
    d = tmp_path_factory.mktemp('int8')
    make_shapes(d / 'shapes', n_train=N_TRAIN, n_val=2, img_size=S, seed=1)
    text = (d / 'shapes' / 'shapes.data').read_text()
    (d / 'shapes' / 'self.data').write_text(text.replace('valid = val.txt', 'valid = train.txt'))
    cfg = d / 'm.cfg'
    cfg.write_text(mini_tiny(nc=5, width=S, height=S))
    model = _train(cfg, d / 'shapes' / 'train.txt')
    pt = save_checkpoint(d / 'm.pt', model)
    models.export(None, pt, d / 'fp32.onnx')
    return {'pt': str(pt), 'data': str(d / 'shapes' / 'self.data'), 'dir': d, 'fp32': str(d / 'fp32.onnx'),
            'train': datasets.list_images(d / 'shapes' / 'train.txt')}


@pytest.fixture(scope='module')
def int8(trained):
    """The INT8 export of the trained model through the command line: (path, its stdout)."""
    out = trained['dir'] / 'int8.onnx'
    r = subprocess.run([sys.executable, 'models.py', 'export', '--weights', trained['pt'], '--out', str(out),
                        '--int8', '--data', trained['data']], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(out), r.stdout


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=['CPUExecutionProvider'])


def signature(sess):
    return ([(i.name, i.shape, i.type) for i in sess.get_inputs()],
            [(o.name, o.shape, o.type) for o in sess.get_outputs()])


def onnx_map(path, data, **kw):
    from utils.onnx_export import OnnxDetector
    return evaluate(OnnxDetector(path, threads=1), data, rect=False, workers=0, verbose=False, **kw)


# --- INT8 export ---------------------------------------------------------------------------------------------------

def test_int8_export_has_the_fp32_interface_and_runs(trained, int8):
    path, stdout = int8
    assert f'on {N_TRAIN} train images' in stdout          # default --calib 100 > 8: the whole train split
    fp32, q = session(trained['fp32']), session(path)
    assert signature(q) == signature(fp32)
    x = datasets.LoadImagesAndLabels(trained['train'][:1], S)[0][0][None].numpy()
    got, ref = q.run(None, {'images': x}), fp32.run(None, {'images': x})
    assert [g.shape for g in got] == [r.shape for r in ref]
    assert all(np.isfinite(g).all() for g in got)
    # the integer model approximates the float one: raw head outputs (logits) close, not equal
    err = max(float(np.abs(g - r).max() / (np.abs(r).max() + 1e-9)) for g, r in zip(got[1:], ref[1:]))
    assert 0 < err < 0.2


def _feeding_path(producer, tensor):
    """The nodes that compute `tensor`, walking back along first inputs to the nearest Conv (included)."""
    path, node = [], producer.get(tensor)
    while node is not None:
        path.append(node)
        if node.op_type == 'Conv':
            break
        node = producer.get(node.input[0])
    return path


def test_int8_quantizes_every_backbone_conv_per_channel_and_leaves_heads_and_decoding_float(int8):
    proto = onnx.load(int8[0])
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: i for i in proto.graph.initializer}
    heads = {_feeding_path(producer, o.name)[-1].name for o in proto.graph.output if o.name.startswith('yolo_')}
    convs = [n for n in proto.graph.node if n.op_type == 'Conv']
    assert len(heads) == 2 and len(convs) == 9                  # mini_tiny: 7 backbone convs, 2 head convs
    for n in convs:
        w = producer.get(n.input[1])
        if n.name in heads:                                      # default: the head convs stay float
            assert w is None and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT, n.name
            continue
        assert w is not None and w.op_type == 'DequantizeLinear', n.name
        q, scale = inits[w.input[0]], inits[w.input[1]]
        assert q.data_type == onnx.TensorProto.INT8
        assert list(scale.dims) == [q.dims[0]]                 # one scale per output channel
        x = producer[n.input[0]]
        assert x.op_type == 'DequantizeLinear' and inits[x.input[2]].data_type == onnx.TensorProto.UINT8
    decode = [n for n in proto.graph.node if n.op_type in ('Sigmoid', 'Exp')]
    assert len(decode) == 6                                      # per head: sigmoid xy, exp wh, sigmoid scores
    for n in decode:                                             # fed by a float head conv, no (de)quantization
        path = _feeding_path(producer, n.input[0])
        assert path[-1].name in heads and not {'QuantizeLinear', 'DequantizeLinear'} & {p.op_type for p in path}


def test_int8_map_within_003_of_fp32(trained, int8):
    fp32 = onnx_map(trained['fp32'], trained['data'])
    q = onnx_map(int8[0], trained['data'])
    assert fp32['mAP50'] > 0.5                             # a model that detects: the comparison means something
    assert abs(q['mAP50'] - fp32['mAP50']) <= 0.03


def test_calibration_reads_only_the_train_split(trained, tmp_path, monkeypatch, capsys):
    """valid= names a list file of absent images (listing it would fail); every image read is a train image,
    --calib 5 of the 8 read once each."""
    data = tmp_path / 'calib.data'
    (tmp_path / 'valid.txt').write_text('absent/0.jpg\nabsent/1.jpg\n')
    text = (trained['dir'] / 'shapes' / 'shapes.data').read_text()
    folder = trained['dir'] / 'shapes'
    data.write_text(f"classes = 5\ntrain = {folder / 'train.txt'}\nvalid = {tmp_path / 'valid.txt'}\n")
    assert 'valid = val.txt' in text
    read = []
    real = datasets.imread
    monkeypatch.setattr(datasets, 'imread', lambda p: read.append(p) or real(p))
    models.export(None, trained['pt'], tmp_path / 'q.onnx', int8=True, data=data, calib=5)
    assert 'on 5 train images' in capsys.readouterr().out
    assert len(read) == len(set(read)) == 5 and set(read) <= set(trained['train'])
    session(tmp_path / 'q.onnx')


def test_calibration_method_and_float_heads_are_honoured(trained, tmp_path):
    for method, float_heads in zip(quantize.METHODS, (False, True, False)):
        res = quantize.quantize_onnx(trained['fp32'], tmp_path / f'{method}.onnx', trained['train'][:2], S,
                                     method=method, float_heads=float_heads, verbose=False)
        assert res.method == method and len(res.float_convs) == (2 if float_heads else 0)   # mini_tiny: 2 heads
        proto = onnx.load(str(tmp_path / f'{method}.onnx'))
        producer = {o: n for n in proto.graph.node for o in n.output}
        for o in proto.graph.output[1:]:
            conv = _feeding_path(producer, o.name)[-1]
            assert (conv.input[1] in producer) is not float_heads   # int8 weights come from a DequantizeLinear
    with pytest.raises(DarkslimError, match="calibration method 'kl'; expected one of minmax, entropy"):
        quantize.quantize_onnx(trained['fp32'], tmp_path / 'x.onnx', trained['train'], S, method='kl')
    assert not (tmp_path / 'x.onnx').exists()


def test_int8_dynamic_size_export_runs_at_other_sizes(trained, tmp_path):
    """--int8 --dynamic-size: calibrated at the cfg's size, run at others (as test.py's rectangular batches
    need); the outputs have the FP32 dynamic export's shapes and stay close to them."""
    models.export(None, trained['pt'], tmp_path / 'f.onnx', dynamic_size=True)
    models.export(None, trained['pt'], tmp_path / 'q.onnx', dynamic_size=True, int8=True, data=trained['data'])
    fp32, q = session(tmp_path / 'f.onnx'), session(tmp_path / 'q.onnx')
    assert signature(q) == signature(fp32)
    for h, w in ((S, S), (S + 32, S), (S, S + 64)):
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h + w)).numpy()
        got, ref = q.run(None, {'images': x}), fp32.run(None, {'images': x})
        assert [g.shape for g in got] == [r.shape for r in ref]
        assert max(float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got[1:], ref[1:])) < 0.2


def test_int8_without_data_or_onnxruntime_is_one_line(trained, tmp_path, monkeypatch, capsys):
    args = models.get_args_parser().parse_args(['export', '--weights', trained['pt'], '--out',
                                                str(tmp_path / 'q.onnx'), '--int8'])
    with pytest.raises(SystemExit) as e:
        cli_main(models.main, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and '--int8 without --data' in err
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)             # import onnxruntime -> ImportError
    args.data = trained['data']
    with pytest.raises(SystemExit) as e:
        cli_main(models.main, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "error: INT8 export needs the onnxruntime package; expected `pip install " \
                                        "onnxruntime`\n"
    args = test_cli.get_args_parser().parse_args(['--onnx', trained['fp32'], '--data', trained['data']])
    with pytest.raises(SystemExit) as e:
        cli_main(test_cli.main, args)
    assert e.value.code == 2 and 'needs the onnxruntime package' in capsys.readouterr().err
    assert not (tmp_path / 'q.onnx').exists()


# --- test.py --onnx -----------------------------------------------------------------------------------------------

def _run_test_py(argv, tmp_path, name):
    report, dets = tmp_path / f'{name}.json', tmp_path / f'{name}-dets.json'
    args = test_cli.get_args_parser().parse_args(argv + ['--report', str(report), '--save-json', str(dets),
                                                         '--workers', '0'])
    test_cli.main(args)
    return json.loads(report.read_text()), json.loads(dets.read_text())


def assert_same_detections(a, b, box_tol=1e-2, score_tol=1e-4):
    """Every detection of `a` has one in `b` (same image, class, box within box_tol px, score within score_tol)
    and the other way round: matched one to one, image by image, in score order."""
    assert len(a) == len(b) and len(a) > 0
    free = list(b)
    for u in a:
        k = next((k for k, v in enumerate(free) if (v['image_id'], v['category_id']) == (u['image_id'],
                  u['category_id']) and abs(v['score'] - u['score']) <= score_tol
                  and np.abs(np.subtract(v['bbox'], u['bbox'])).max() <= box_tol), None)
        assert k is not None, f"no match for {u}"
        free.pop(k)


def test_test_py_onnx_fp32_equals_test_py_square_on_the_same_weights(trained, tmp_path, capsys):
    ours, d1 = _run_test_py(['--weights', trained['pt'], '--data', trained['data'], '--square'], tmp_path, 'pt')
    theirs, d2 = _run_test_py(['--onnx', trained['fp32'], '--data', trained['data']], tmp_path, 'onnx')
    assert f"fixed {S}x{S} input, so square letterbox at {S}" in capsys.readouterr().out
    assert ours['mAP50'] > 0.5
    for k in ('mAP50', 'mAP50_95', 'precision', 'recall'):
        assert abs(ours[k] - theirs[k]) <= 1e-3, k
    assert_same_detections(d1, d2)


def test_test_py_onnx_dynamic_size_export_equals_default_rect_test_py(trained, tmp_path):
    """An export with dynamic height and width is evaluated in test.py's rectangular batches (make_shapes has
    non-square images, so the batches differ in shape), equal to test.py's default evaluation."""
    path = tmp_path / 'dyn.onnx'
    models.export(None, trained['pt'], path, dynamic_size=True)
    ours, d1 = _run_test_py(['--weights', trained['pt'], '--data', trained['data'], '--batch-size', '3'],
                            tmp_path, 'pt')
    theirs, d2 = _run_test_py(['--onnx', str(path), '--data', trained['data'], '--batch-size', '3'],
                              tmp_path, 'onnx')
    for k in ('mAP50', 'mAP50_95'):
        assert abs(ours[k] - theirs[k]) <= 1e-3, k
    assert_same_detections(d1, d2)


def test_onnx_fixed_batch_is_served_in_slices(trained, tmp_path):
    """A batch-2 export evaluated in batches of 3: slices of 2, the last padded; the same result as batch 1."""
    path = tmp_path / 'b2.onnx'
    models.export(None, trained['pt'], path, batch=2)
    one = onnx_map(trained['fp32'], trained['data'], batch_size=3)
    two = onnx_map(str(path), trained['data'], batch_size=3)
    assert one['mAP50'] == pytest.approx(two['mAP50'], abs=1e-6) and one['images'] == two['images'] == N_TRAIN


def test_test_py_onnx_refuses_another_size_and_weights(trained, capsys):
    for argv, msg in ((['--img-size', '96'], f'has a fixed {S}x{S} input, expected {S}'),
                      (['--weights', trained['pt']], '--onnx with --weights/--cfg')):
        args = test_cli.get_args_parser().parse_args(['--onnx', trained['fp32'], '--data', trained['data']] + argv)
        with pytest.raises(SystemExit) as e:
            cli_main(test_cli.main, args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count('\n') == 1 and msg in err
