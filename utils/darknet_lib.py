"""The original darknet as a reference: its forward pass and its .weights writer, driven through libdarknet
(used by the tests and by bench/darknet_runtime.py).

Debian's `darknet` package (pjreddie's darknet, CPU build) ships /usr/lib/darknet/libdarknet.so and its header
/usr/lib/darknet/include/darknet.h. `network` and `layer` are plain C structs whose layout we never copy by hand:
a few-line C shim is compiled with gcc against the shipped header and exports accessors (net->n,
net->layers[i].output, ...), so every field offset and the YOLO enum value come from that header. The library and
header default to Debian's (or $DARKNET_LIB, $DARKNET_HEADER); the functions here also take them as arguments.

darknet stops the whole process on bad input (exit(0) or abort() from error()/file_error()), and an exit(0) inside
pytest would end the run looking green. So each job runs in a child Python process (`python -m
utils.darknet_lib`, numpy + ctypes only): `darknet_run` passes the input as .npy and reads the results back from
.npz, and a job that ends without writing them is an error.

    run_cfg = cfg_for_input(cfg, workdir / 'run.cfg', height, width)   # [net] batch=1 and the input's size
    bufs, log = darknet_run(run_cfg, weights, workdir, x=x, resave=out)
    # bufs: {[yolo] layer index: [n anchors, 5+classes, H, W]}; out: darknet's save_weights of the loaded net

darknet's [yolo] layer output is its input with logistic applied to x, y, objectness and class scores and w, h
left raw (yolo_layer.c forward_yolo_layer); `to_darknet_space` maps our raw head outputs there.
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DARKNET_LIB = Path(os.environ.get('DARKNET_LIB', '/usr/lib/darknet/libdarknet.so'))
DARKNET_HEADER = Path(os.environ.get('DARKNET_HEADER', '/usr/lib/darknet/include/darknet.h'))
DARKNET_CLI = shutil.which('darknet') or '/usr/bin/darknet'

# accessors compiled against darknet.h: the compiler lays out `network` and `layer` as libdarknet does
SHIM_SOURCE = r"""
#include "darknet.h"
int dk_yolo_type(void) { return YOLO; }
int dk_n_layers(network *net) { return net->n; }
int dk_net_w(network *net) { return net->w; }
int dk_net_h(network *net) { return net->h; }
int dk_net_c(network *net) { return net->c; }
int dk_net_batch(network *net) { return net->batch; }
int dk_type(network *net, int i) { return net->layers[i].type; }
int dk_outputs(network *net, int i) { return net->layers[i].outputs; }
int dk_batch(network *net, int i) { return net->layers[i].batch; }
int dk_out_c(network *net, int i) { return net->layers[i].out_c; }
int dk_out_h(network *net, int i) { return net->layers[i].out_h; }
int dk_out_w(network *net, int i) { return net->layers[i].out_w; }
int dk_n(network *net, int i) { return net->layers[i].n; }
int dk_classes(network *net, int i) { return net->layers[i].classes; }
float *dk_output(network *net, int i) { return net->layers[i].output; }
"""


def darknet_missing(lib=DARKNET_LIB, header=DARKNET_HEADER):
    """Why libdarknet `lib` with its `header` cannot be used here (a sentence), or None when it can."""
    if not Path(lib).is_file():
        return f"{lib} absent (apt-get install darknet)"
    if not Path(header).is_file():
        return f"{header} absent (apt-get install darknet)"
    if shutil.which('gcc') is None:
        return "gcc absent: the accessor shim is compiled against darknet.h"
    return None


def darknet_cli_missing(cli=DARKNET_CLI):
    """Why the darknet executable `cli` cannot be run here (a sentence), or None when it can."""
    if not os.access(cli, os.X_OK):
        return f"{cli} absent (apt-get install darknet)"
    return None


def child_python(module, *args):
    """(argv, cwd) that run `python -m module args` with this repository importable whatever the caller's working
    folder: the child starts in the repository, so give it absolute paths."""
    return [sys.executable, '-m', module, *map(str, args)], REPO


def build_shim(folder=None, header=DARKNET_HEADER):
    """Compile SHIM_SOURCE against `header` (darknet.h) into `folder` (default: a temp folder keyed by the header
    and shim contents, reused by later calls). Returns the shared library's path."""
    header = Path(header)
    key = hashlib.sha256(SHIM_SOURCE.encode() + header.read_bytes()).hexdigest()[:16]
    folder = Path(folder or Path(tempfile.gettempdir()) / f'darkslim-darknet-shim-{key}')
    lib = folder / 'dkshim.so'
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f'.dkshim.{os.getpid()}.c'   # per process: concurrent builds never share a half-written file
    src.write_text(SHIM_SOURCE)
    tmp = folder / f'.dkshim.{os.getpid()}.so'
    # the header is the CPU build's: GPU/CUDNN undefined, as libdarknet was built (checked in open_darknet)
    r = subprocess.run(['gcc', '-shared', '-fPIC', '-O1', f'-I{header.parent}', str(src), '-o', str(tmp)],
                       capture_output=True, text=True)
    src.unlink()
    if r.returncode != 0:
        raise RuntimeError(f"gcc could not compile the darknet.h accessor shim:\n{r.stderr[-2000:]}")
    os.replace(tmp, lib)
    return lib


def cfg_for_input(src, dst, height=None, width=None):
    """Copy `src` cfg text to `dst` with [net] batch=1, subdivisions=1 and, when given, height/width replaced
    (darknet sizes its input from [net]). Other lines are kept byte for byte; `src` is not modified."""
    lines = Path(src).read_text().splitlines()
    want = {'batch': 1, 'subdivisions': 1}
    if height is not None:
        want.update(height=height, width=width)
    out, in_net, done = [], False, set()
    for line in lines:
        s = line.strip()
        if s.startswith('['):
            if in_net:
                out += [f'{k}={v}' for k, v in want.items() if k not in done]
            in_net = s.lower() in ('[net]', '[network]')
        elif in_net:
            m = re.match(r'\s*([A-Za-z_]+)\s*=', line)
            if m and m.group(1) in want:
                line = f'{m.group(1)}={want[m.group(1)]}'
                done.add(m.group(1))
        out.append(line)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_text('\n'.join(out) + '\n')
    return Path(dst)


# --- child side: libdarknet in this process ---------------------------------------------------------------------

def open_darknet(shim_path, lib_path=DARKNET_LIB):
    """(libdarknet, shim) as ctypes libraries with the signatures used here."""
    lib = ctypes.CDLL(str(lib_path))
    if hasattr(lib, 'forward_network_gpu'):  # defined only when built with GPU
        raise RuntimeError(f"{lib_path} is a GPU build; the shim is compiled for the CPU layout")
    shim = ctypes.CDLL(str(shim_path))
    vp, c_int = ctypes.c_void_p, ctypes.c_int
    lib.load_network.restype, lib.load_network.argtypes = vp, [ctypes.c_char_p, ctypes.c_char_p, c_int]
    lib.set_batch_network.restype, lib.set_batch_network.argtypes = None, [vp, c_int]
    lib.network_predict.restype = ctypes.POINTER(ctypes.c_float)
    lib.network_predict.argtypes = [vp, ctypes.POINTER(ctypes.c_float)]
    lib.save_weights.restype, lib.save_weights.argtypes = None, [vp, ctypes.c_char_p]
    lib.free_network.restype, lib.free_network.argtypes = None, [vp]
    for name in ('dk_n_layers', 'dk_net_w', 'dk_net_h', 'dk_net_c', 'dk_net_batch'):
        getattr(shim, name).argtypes = [vp]
    for name in ('dk_type', 'dk_outputs', 'dk_batch', 'dk_out_c', 'dk_out_h', 'dk_out_w', 'dk_n', 'dk_classes'):
        getattr(shim, name).argtypes = [vp, c_int]
    shim.dk_output.restype, shim.dk_output.argtypes = ctypes.POINTER(ctypes.c_float), [vp, c_int]
    return lib, shim


def yolo_buffers(shim, net):
    """{layer index: [n, 5+classes, out_h, out_w] copy of layer.output} for every [yolo] layer (batch 1)."""
    yolo, out = shim.dk_yolo_type(), {}
    for i in range(shim.dk_n_layers(net)):
        if shim.dk_type(net, i) != yolo:
            continue
        n, h, w, nc = shim.dk_n(net, i), shim.dk_out_h(net, i), shim.dk_out_w(net, i), shim.dk_classes(net, i)
        size = shim.dk_outputs(net, i)
        assert size == n * (5 + nc) * h * w, f"layer {i}: {size} outputs, expected n*(5+classes)*h*w"
        buf = np.ctypeslib.as_array(shim.dk_output(net, i), shape=(size,))
        out[i] = buf.reshape(n, 5 + nc, h, w).copy()
    return out


def child_job(lib_path, shim_path, cfg, weights, x_path, out_npz, resave):
    """Load cfg + weights in darknet `lib_path`, run `x` (.npy [1, 3, H, W] float32) and write the [yolo] buffers
    to `out_npz` (keys 'yolo_<layer>'); with `resave`, also darknet's own save_weights of the loaded net."""
    lib, shim = open_darknet(shim_path, lib_path)
    net = lib.load_network(os.fsencode(cfg), os.fsencode(weights), 0)  # clear=0 keeps the header's `seen`
    lib.set_batch_network(net, 1)
    result = {}
    if x_path:
        x = np.ascontiguousarray(np.load(x_path), dtype=np.float32)
        shape = (1, shim.dk_net_c(net), shim.dk_net_h(net), shim.dk_net_w(net))
        if x.shape != shape:
            raise ValueError(f"input {x.shape}; darknet's [net] expects {shape}")
        lib.network_predict(net, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        result = {f'yolo_{i}': b for i, b in yolo_buffers(shim, net).items()}
    if resave:
        lib.save_weights(net, os.fsencode(resave))
    lib.free_network(net)
    np.savez(out_npz, **result)


# --- parent side ------------------------------------------------------------------------------------------------

def darknet_run(cfg, weights, workdir, x=None, resave=None, lib=DARKNET_LIB, header=DARKNET_HEADER):
    """Run one darknet job in a child process (see the module docstring). `x`: [1, 3, H, W] array or tensor
    with H, W equal to the cfg's [net] height, width; `lib`: the libdarknet to run, `header`: the darknet.h it was
    built from (the accessor shim is compiled against it). Returns ({layer index: yolo buffer}, darknet's
    stdout+stderr)."""
    for p in (cfg, weights):
        if not Path(p).is_file():  # darknet would exit(0) on a missing file
            raise FileNotFoundError(p)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out_npz = workdir / 'darknet_out.npz'
    if out_npz.exists():
        out_npz.unlink()
    x_path = ''
    if x is not None:
        x_path = workdir / 'darknet_in.npy'
        np.save(x_path, np.asarray(x, dtype=np.float32))
    files = (lib, build_shim(header=header), cfg, weights, x_path, out_npz, resave)
    args, cwd = child_python('utils.darknet_lib', *(os.path.abspath(f) if f else '' for f in files))
    env = {**os.environ, 'QT_QPA_PLATFORM': 'offscreen', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    log = r.stdout + r.stderr
    if r.returncode != 0 or not out_npz.is_file():
        raise RuntimeError(f"darknet job failed (exit {r.returncode}) on {cfg}, {weights}:\n{log[-3000:]}")
    with np.load(out_npz) as z:
        return {int(k.split('_')[1]): z[k] for k in z.files}, log


def to_darknet_space(raw):
    """Our raw head output [1, na, H, W, 5+nc] (tensor or array, before any activation) -> darknet's [yolo] output
    layout [na, 5+nc, H, W] with logistic on x, y, objectness and classes, w and h raw."""
    a = np.asarray(raw, dtype=np.float64)[0].transpose(0, 3, 1, 2).copy()
    act = np.r_[0:2, 4:a.shape[1]]
    a[:, act] = 1 / (1 + np.exp(-a[:, act]))
    return a


def max_yolo_diff(ours_raw, theirs):
    """Largest |difference| between our raw heads (mapped by to_darknet_space) and darknet's [yolo] buffers."""
    assert len(ours_raw) == len(theirs), (len(ours_raw), len(theirs))
    worst = 0.0
    for r, t in zip(ours_raw, theirs):
        o = to_darknet_space(r)
        assert o.shape == t.shape, (o.shape, t.shape)
        worst = max(worst, float(np.abs(o - t).max()))
    return worst


if __name__ == '__main__':
    child_job(*sys.argv[1:7], sys.argv[7] or None)
