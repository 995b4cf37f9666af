"""Darknet itself as a reference: its forward pass, its .weights writer and its detector CLI, driven through
libdarknet (used by the tests and by bench/darknet_runtime.py). One harness serves both darknets our users meet:

- the original (pjreddie's 2018 darknet) as Debian's `darknet` package ships it: /usr/lib/darknet/libdarknet.so,
  /usr/lib/darknet/include/darknet.h, /usr/bin/darknet (or $DARKNET_LIB, $DARKNET_HEADER) -> `DEBIAN`;
- AlexeyAB's darknet, the one that reads yolov4's layers ([route] groups, scale_x_y, new_coords, mish), built
  from source by utils/darknet_build.py -> `darknet_build.build_alexeyab()`.

A `DarknetRuntime` names one build (its library, header, CLI) and which C API it speaks; every function here takes
one. `network` and `layer` are plain C structs whose layout we never copy by hand: a few-line C shim is compiled
with gcc against the build's own darknet.h and exports accessors (net->n, net->layers[i].output, ...), so every
field offset and the YOLO enum value come from that header.

darknet stops the whole process on bad input (exit(0) or abort() from error()/file_error()), and an exit(0) inside
pytest would end the run looking green. So each job runs in a child Python process (`python -m
utils.darknet_lib`, numpy + ctypes only): `darknet_run` passes the input as .npy and reads the results back from
.npz, and a job that ends without writing them is an error.

    run_cfg = cfg_for_input(cfg, workdir / 'run.cfg', height, width)   # [net] batch=1 and the input's size
    bufs, log = darknet_run(run_cfg, weights, workdir, x=x, resave=out, runtime=rt)
    # bufs: {[yolo] layer index: [n anchors, 5+classes, H, W]}; out: darknet's save_weights of the loaded net

A [yolo] layer's output is its input with logistic applied to x, y, objectness and class scores and w, h left
raw (yolo_layer.c forward_yolo_layer); AlexeyAB's then scales x, y by scale_x_y (x*s - (s-1)/2), and with
new_coords=1 applies no logistic (the head conv's activation did). `to_darknet_space` maps our raw head outputs
there.
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DARKNET_LIB = Path(os.environ.get('DARKNET_LIB', '/usr/lib/darknet/libdarknet.so'))
DARKNET_HEADER = Path(os.environ.get('DARKNET_HEADER', '/usr/lib/darknet/include/darknet.h'))
DARKNET_CLI = shutil.which('darknet') or '/usr/bin/darknet'
APIS = ('pjreddie', 'alexeyab')

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
# AlexeyAB's save_weights takes the network by value (and src/parser.h, not darknet.h, declares it): a wrapper
# that ctypes can call with a pointer. The symbol resolves against libdarknet, loaded RTLD_GLOBAL first.
SHIM_EXTRA = {'pjreddie': '', 'alexeyab': r"""
void save_weights(network net, char *filename);
void dk_save_weights(network *net, char *filename) { save_weights(*net, filename); }
"""}


@dataclass(frozen=True)
class DarknetRuntime:
    """One darknet build. api: the C API its libdarknet speaks ('pjreddie': the 2018 original, 'alexeyab');
    lib: its libdarknet.so; header: the darknet.h it was built from (the accessor shim is compiled against it);
    cli: its `darknet` executable; home: the folder holding the data/labels glyphs its CLI draws with (None when
    the CLI finds its own)."""
    api: str
    lib: Path
    header: Path
    cli: Path
    home: Path = None

    def __post_init__(self):
        if self.api not in APIS:
            raise ValueError(f"darknet api {self.api!r}; expected one of {', '.join(APIS)}")

    def missing(self):
        """Why the library cannot be used here (a sentence), or None."""
        return darknet_missing(self.lib, self.header)

    def cli_missing(self):
        """Why the executable cannot be run here (a sentence), or None."""
        return darknet_cli_missing(self.cli)


DEBIAN = DarknetRuntime('pjreddie', DARKNET_LIB, DARKNET_HEADER, Path(DARKNET_CLI))


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


def build_shim(folder=None, header=DARKNET_HEADER, api='pjreddie'):
    """Compile the accessor shim for `api` (SHIM_SOURCE + SHIM_EXTRA[api]) against `header` (darknet.h) into
    `folder` (default: a temp folder keyed by the header and shim contents, reused by later calls). Returns the
    shared library's path."""
    header = Path(header)
    source = SHIM_SOURCE + SHIM_EXTRA[api]
    key = hashlib.sha256(source.encode() + header.read_bytes()).hexdigest()[:16]
    folder = Path(folder or Path(tempfile.gettempdir()) / f'darkslim-darknet-shim-{key}')
    lib = folder / 'dkshim.so'
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f'.dkshim.{os.getpid()}.c'   # per process: concurrent builds never share a half-written file
    src.write_text(source)
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

def open_darknet(shim_path, lib_path=DARKNET_LIB, api='pjreddie'):
    """(libdarknet, shim) as ctypes libraries with the signatures used here; `api`: the C API the library speaks
    (see DarknetRuntime)."""
    lib = ctypes.CDLL(str(lib_path), mode=ctypes.RTLD_GLOBAL)  # global: the shim's wrappers resolve against it
    if hasattr(lib, 'forward_network_gpu'):  # defined only when built with GPU
        raise RuntimeError(f"{lib_path} is a GPU build; the shim is compiled for the CPU layout")
    shim = ctypes.CDLL(str(shim_path))
    vp, c_int, c_str = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    f_ptr = ctypes.POINTER(ctypes.c_float)
    if api == 'alexeyab':   # its free_network and network_predict take the struct by value: the _ptr variants
        lib.load_network_custom.restype, lib.load_network_custom.argtypes = vp, [c_str, c_str, c_int, c_int]
        lib.network_predict_ptr.restype, lib.network_predict_ptr.argtypes = f_ptr, [vp, f_ptr]
        lib.free_network_ptr.restype, lib.free_network_ptr.argtypes = None, [vp]
        shim.dk_save_weights.restype, shim.dk_save_weights.argtypes = None, [vp, c_str]
    else:
        lib.network_predict.restype, lib.network_predict.argtypes = f_ptr, [vp, f_ptr]
        lib.save_weights.restype, lib.save_weights.argtypes = None, [vp, c_str]
        lib.free_network.restype, lib.free_network.argtypes = None, [vp]
    lib.load_network.restype, lib.load_network.argtypes = vp, [c_str, c_str, c_int]
    lib.set_batch_network.restype, lib.set_batch_network.argtypes = None, [vp, c_int]
    for name in ('dk_n_layers', 'dk_net_w', 'dk_net_h', 'dk_net_c', 'dk_net_batch'):
        getattr(shim, name).argtypes = [vp]
    for name in ('dk_type', 'dk_outputs', 'dk_batch', 'dk_out_c', 'dk_out_h', 'dk_out_w', 'dk_n', 'dk_classes'):
        getattr(shim, name).argtypes = [vp, c_int]
    shim.dk_output.restype, shim.dk_output.argtypes = f_ptr, [vp, c_int]
    return lib, shim


class LoadedNet:
    """One cfg + weights loaded in libdarknet (child side), batch 1, whichever API the library speaks.

    `fused`: with AlexeyAB's API, load as its detector and Python API do (load_network_custom: inference buffers,
    BatchNorm folded into the conv weights); fused=False keeps the BN layers, as save_weights needs them. The
    original darknet never folds."""

    def __init__(self, lib, shim, api, cfg, weights, fused=True):
        self.lib, self.shim, self.api = lib, shim, api
        cfg, weights = os.fsencode(cfg), os.fsencode(weights)
        if api == 'alexeyab' and fused:
            self.net = lib.load_network_custom(cfg, weights, 0, 1)  # clear=0 keeps the header's `seen`
        else:
            self.net = lib.load_network(cfg, weights, 0)
            lib.set_batch_network(self.net, 1)

    def input_shape(self):
        s, n = self.shim, self.net
        return 1, s.dk_net_c(n), s.dk_net_h(n), s.dk_net_w(n)

    def predict(self, x):
        """One forward pass of `x` (C-contiguous float32 [1, C, H, W]; the caller keeps it alive)."""
        if x.shape != self.input_shape():
            raise ValueError(f"input {x.shape}; darknet's [net] expects {self.input_shape()}")
        ptr = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        (self.lib.network_predict_ptr if self.api == 'alexeyab' else self.lib.network_predict)(self.net, ptr)

    def yolo_buffers(self):
        return yolo_buffers(self.shim, self.net)

    def save_weights(self, path):
        if self.api == 'alexeyab':
            self.shim.dk_save_weights(self.net, os.fsencode(path))
        else:
            self.lib.save_weights(self.net, os.fsencode(path))

    def close(self):
        (self.lib.free_network_ptr if self.api == 'alexeyab' else self.lib.free_network)(self.net)


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


def child_job(api, lib_path, shim_path, cfg, weights, x_path, out_npz, resave):
    """Load cfg + weights in darknet `lib_path` (speaking `api`), run `x` (.npy [1, 3, H, W] float32) and write
    the [yolo] buffers to `out_npz` (keys 'yolo_<layer>'); with `resave`, also darknet's own save_weights of the
    loaded net (AlexeyAB: of an unfused load, so that BatchNorm is written as read)."""
    lib, shim = open_darknet(shim_path, lib_path, api)
    net = LoadedNet(lib, shim, api, cfg, weights)
    result = {}
    if x_path:
        x = np.ascontiguousarray(np.load(x_path), dtype=np.float32)
        net.predict(x)
        result = {f'yolo_{i}': b for i, b in net.yolo_buffers().items()}
    if resave:
        saver = net if api == 'pjreddie' else LoadedNet(lib, shim, api, cfg, weights, fused=False)
        saver.save_weights(resave)
        if saver is not net:
            saver.close()
    net.close()
    np.savez(out_npz, **result)


# --- parent side ------------------------------------------------------------------------------------------------

def darknet_run(cfg, weights, workdir, x=None, resave=None, runtime=DEBIAN):
    """Run one darknet job in a child process (see the module docstring). `x`: [1, 3, H, W] array or tensor
    with H, W equal to the cfg's [net] height, width; `runtime`: the darknet build to run (DarknetRuntime).
    Returns ({layer index: yolo buffer}, darknet's stdout+stderr)."""
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
    files = (runtime.lib, build_shim(header=runtime.header, api=runtime.api), cfg, weights, x_path, out_npz, resave)
    args, cwd = child_python('utils.darknet_lib', runtime.api, *(os.path.abspath(f) if f else '' for f in files))
    env = {**os.environ, 'QT_QPA_PLATFORM': 'offscreen', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    log = r.stdout + r.stderr
    if r.returncode != 0 or not out_npz.is_file():
        raise RuntimeError(f"darknet job failed (exit {r.returncode}) on {cfg}, {weights}:\n{log[-3000:]}")
    with np.load(out_npz) as z:
        return {int(k.split('_')[1]): z[k] for k in z.files}, log


# both CLIs print `name: NN%` per detection; AlexeyAB's -ext_output adds the box in the image's pixels
DETECTION_LINE = re.compile(r'^(.+?): (\d+)%(?:\s*\(left_x:\s*(-?\d+)\s+top_y:\s*(-?\d+)\s+width:\s*(-?\d+)'
                            r'\s+height:\s*(-?\d+)\))?')


@dataclass
class CliDetection:
    """One line of `darknet detector test`: class name, score in percent (objectness x class probability) and,
    when printed, the box (left, top, width, height) in the original image's pixels."""
    name: str
    percent: int
    box: tuple = None


def darknet_detect(runtime, data, cfg, weights, image, workdir, thresh=0.25, timeout=300):
    """`darknet detector test` of `runtime`'s CLI on one image, run in `workdir` (it writes its drawn image
    there) without opening a window; relative paths inside the `data` file (names=) are read from `workdir`.
    Returns ([CliDetection], the CLI's stdout+stderr); raises RuntimeError when it fails. AlexeyAB's CLI resizes
    the image to the network size without letterboxing."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    labels = runtime.home and Path(runtime.home) / 'data' / 'labels'
    if labels and labels.is_dir() and not (workdir / 'data' / 'labels').exists():
        (workdir / 'data').mkdir(exist_ok=True)     # the CLI reads its glyphs from ./data/labels
        (workdir / 'data' / 'labels').symlink_to(labels)
    files = [os.path.abspath(f) for f in (data, cfg, weights, image)]
    # no window to wait on; AlexeyAB's prints each box too
    extra = ['-dont_show', '-ext_output'] if runtime.api == 'alexeyab' else ['-out', 'predictions']
    r = subprocess.run([str(runtime.cli), 'detector', 'test', *files, '-thresh', str(thresh), *extra],
                       cwd=workdir, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, 'QT_QPA_PLATFORM': 'offscreen', 'OMP_NUM_THREADS': '1'})
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"{runtime.cli} detector test failed (exit {r.returncode}):\n{log[-3000:]}")
    found = []
    for m in map(DETECTION_LINE.match, r.stdout.splitlines()):
        if m:
            box = tuple(int(v) for v in m.groups()[2:]) if m.group(3) is not None else None
            found.append(CliDetection(m.group(1), int(m.group(2)), box))
    return found, log


def to_darknet_space(raw, scale_x_y=1.0, new_coords=False):
    """Our raw head output [1, na, H, W, 5+nc] (tensor or array: the head conv's output) -> the [yolo] layer's
    output [na, 5+nc, H, W]: logistic on x, y, objectness and classes (none with new_coords: the conv's
    activation did it), w and h raw, then x, y scaled about 0.5: x*s - (s-1)/2 (s=1: unchanged, the original)."""
    a = np.asarray(raw, dtype=np.float64)[0].transpose(0, 3, 1, 2).copy()
    if not new_coords:
        act = np.r_[0:2, 4:a.shape[1]]
        a[:, act] = 1 / (1 + np.exp(-a[:, act]))
    a[:, :2] = a[:, :2] * scale_x_y - (scale_x_y - 1) / 2
    return a


def max_yolo_diff(ours_raw, theirs, heads=None):
    """Largest |difference| between our raw heads (mapped by to_darknet_space) and darknet's [yolo] buffers.
    heads: per head, its (scale_x_y, new_coords); default (1.0, False) each, as the original darknet decodes."""
    assert len(ours_raw) == len(theirs), (len(ours_raw), len(theirs))
    heads = heads or [(1.0, False)] * len(theirs)
    worst = 0.0
    for r, t, (s, new) in zip(ours_raw, theirs, heads):
        o = to_darknet_space(r, s, new)
        assert o.shape == t.shape, (o.shape, t.shape)
        worst = max(worst, float(np.abs(o - t).max()))
    return worst


if __name__ == '__main__':
    child_job(*sys.argv[1:8], sys.argv[8] or None)
