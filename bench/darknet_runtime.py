"""The original darknet (libdarknet, CPU, single-threaded) as a deployment runtime that a benchmark can time pass by
pass, interleaved with other runtimes.

Each network lives in its own child Python process (`python -m bench.darknet_runtime`; numpy + ctypes only):
darknet stops the whole process on bad input (exit(0) or abort()), and a child keeps that from ending the benchmark
silently.
The child loads the cfg + weights once and then answers one-line commands on a pipe:

    input PATH.npy   set the [1, C, H, W] float32 input (0..1 RGB, the tensor the PyTorch model takes)
    run              one network_predict; replies its wall seconds, timed in the child (no pipe overhead)
    yolo PATH.npz    one network_predict; writes each [yolo] layer's output as 'yolo_<layer>' [n, 5+classes, H, W]
    quit

    with DarknetNet(cfg, weights, workdir) as net:
        net.set_input(x)
        seconds = net.run()
        heads = net.yolo_outputs()      # {layer index: darknet's [yolo] buffer}

The cfg must already say batch=1 and the input's height and width in [net] (darknet sizes its buffers from
[net]). Accessors into darknet's `network`/`layer` structs come from utils/darknet_lib.py's shim, compiled against
the shipped darknet.h; `unsupported` says which cfgs pjreddie's darknet cannot run.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from utils.darknet_lib import DARKNET_HEADER, DARKNET_LIB, build_shim, child_python, darknet_missing

# activations pjreddie's darknet parses (activations.c get_activation); it maps others to relu with a warning
DARKNET_ACTIVATIONS = {'logistic', 'loggy', 'relu', 'elu', 'selu', 'relie', 'plse', 'hardtan', 'lhtan', 'linear',
                       'ramp', 'leaky', 'tanh', 'stair'}


def missing(lib=DARKNET_LIB, header=DARKNET_HEADER):
    """Why darknet (libdarknet `lib`, built from `header`) cannot run here (a sentence), or None when it can."""
    return darknet_missing(lib, header)


def unsupported(defs):
    """Why pjreddie's darknet cannot run the cfg sections `defs` ([net] + layers) as we do, or None: it knows no
    [route] groups, no [yolo] scale_x_y or new_coords and a fixed set of activations."""
    for i, d in enumerate(defs[1:]):
        t = d['type']
        if t == 'route' and d.get('groups', 1) != 1:
            return f"layer {i} [route] groups={d['groups']} (pjreddie darknet has no route groups)"
        if t == 'yolo' and (float(d.get('scale_x_y', 1.0)) != 1.0 or d.get('new_coords', 0)):
            return f"layer {i} [yolo] scale_x_y/new_coords (pjreddie darknet decodes without them)"
        if t not in ('convolutional', 'maxpool', 'upsample', 'route', 'shortcut', 'yolo'):
            return f"layer {i} [{t}] (not run here)"
        act = d.get('activation')
        if t in ('convolutional', 'shortcut') and act and act not in DARKNET_ACTIVATIONS:
            return f"layer {i} activation={act} (unknown to pjreddie darknet)"
    return None


class DarknetNet:
    """One darknet network loaded in a child process (see the module docstring). Call close() (or use `with`).
    `lib`: the libdarknet to run, `header`: the darknet.h it was built from."""

    def __init__(self, cfg, weights, workdir, lib=DARKNET_LIB, header=DARKNET_HEADER):
        for p in (cfg, weights):
            if not Path(p).is_file():  # darknet would exit(0) on a missing file
                raise FileNotFoundError(p)
        self.workdir = Path(workdir).resolve()  # the child runs in the repository: it is given absolute paths
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.log_path = str(cfg), self.workdir / f'darknet-{Path(cfg).stem}.log'
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'QT_QPA_PLATFORM': 'offscreen'}
        self._log = open(self.log_path, 'wb')
        args, cwd = child_python('bench.darknet_runtime', os.path.abspath(lib), build_shim(header=header),
                                 os.path.abspath(cfg), os.path.abspath(weights))
        self.proc = subprocess.Popen(args, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     env=env, text=True, bufsize=1)
        self._reply('ready')

    def _reply(self, expect):
        line = self.proc.stdout.readline()
        if not line.startswith(expect):
            self.proc.kill()
            self.proc.wait()
            self._log.flush()
            tail = self.log_path.read_text(errors='replace')[-3000:]
            raise RuntimeError(f"darknet child on {self.cfg} ended or misbehaved (exit {self.proc.returncode}, "
                               f"reply {line!r}); its log:\n{tail}")
        return line[len(expect):].strip()

    def _ask(self, command, expect='ok'):
        self.proc.stdin.write(command + '\n')
        self.proc.stdin.flush()
        return self._reply(expect)

    def set_input(self, x):
        """x: [1, C, H, W] array or tensor, H and W as the cfg's [net]."""
        path = self.workdir / f'darknet-in-{Path(self.cfg).stem}.npy'
        np.save(path, np.ascontiguousarray(np.asarray(x, dtype=np.float32)))
        self._ask(f'input {path}')

    def run(self):
        """Seconds of one forward pass (network_predict), timed in the child."""
        return float(self._ask('run'))

    def yolo_outputs(self):
        """{layer index: [n, 5+classes, H, W]} darknet's [yolo] outputs for the current input (logistic on x, y,
        objectness and classes; w, h raw)."""
        path = self.workdir / f'darknet-out-{Path(self.cfg).stem}.npz'
        self._ask(f'yolo {path}')
        with np.load(path) as z:
            return {int(k.split('_')[1]): z[k] for k in z.files}

    def close(self):
        if self.proc.poll() is None:
            try:
                self._ask('quit', expect='bye')
            except (RuntimeError, OSError):
                pass
            self.proc.wait(timeout=30)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- child side ---------------------------------------------------------------------------------------------------

def serve(lib_path, shim_path, cfg, weights):
    """The child's loop: replies go to the original stdout; fd 1 is pointed at stderr first, so that darknet's own
    printf output cannot interleave with them."""
    import ctypes
    import time

    from utils.darknet_lib import open_darknet, yolo_buffers
    reply = os.fdopen(os.dup(1), 'w', buffering=1)
    os.dup2(2, 1)
    lib, shim = open_darknet(shim_path, lib_path)
    net = lib.load_network(os.fsencode(cfg), os.fsencode(weights), 0)
    lib.set_batch_network(net, 1)
    shape = (1, shim.dk_net_c(net), shim.dk_net_h(net), shim.dk_net_w(net))
    x = ptr = None  # x stays referenced while darknet reads it through ptr
    reply.write('ready\n')
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(' ')
        if cmd == 'input':
            x = np.ascontiguousarray(np.load(arg), dtype=np.float32)
            if x.shape != shape:
                raise ValueError(f"input {x.shape}; darknet's [net] expects {shape}")
            ptr = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            reply.write('ok\n')
        elif cmd in ('run', 'yolo') and ptr is None:
            raise RuntimeError(f"{cmd!r} before any 'input'")
        elif cmd == 'run':
            t = time.perf_counter()
            lib.network_predict(net, ptr)
            reply.write(f'ok {time.perf_counter() - t:.9f}\n')
        elif cmd == 'yolo':
            lib.network_predict(net, ptr)
            np.savez(arg, **{f'yolo_{i}': b for i, b in yolo_buffers(shim, net).items()})
            reply.write('ok\n')
        elif cmd == 'quit':
            break
    lib.free_network(net)
    reply.write('bye\n')


if __name__ == '__main__':
    serve(*sys.argv[1:5])
