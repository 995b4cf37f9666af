"""Build AlexeyAB darknet (CPU only: libdarknet.so, its header and the `darknet` CLI) from its source tree into a
per-user cache, once per source tree and make flags, so the tests can use it as a reference runtime.

    runtime = build_alexeyab()      # utils.darknet_lib.DarknetRuntime, or BuildError saying why not
    runtime, why = alexeyab()       # the same, once per process; (None, why) when it cannot be built here

    python -m utils.darknet_build   # build (or find) it and print where; exit 1 with the reason when it cannot

The source is never built in place (make writes objects into its tree, and ../shared is read-only in CI): it is
copied into a temp folder inside the cache, built there, and renamed to `<cache>/alexeyab-<key>` only after
make succeeded. So an interrupted build leaves no entry that looks complete, and two processes building at once
each build in their own folder; the first rename wins and the other discards its copy.

The key is a sha256 of the make flags and of every file of the source tree, its relative path and its contents
(8 MB, ~1000 files: a few tens of ms). Not the commit named in its README plus sizes or mtimes: a local edit
keeps the commit and can keep the size, and a copy (cp -r, a CI checkout) changes every mtime and would rebuild
for nothing. The compiler is not in the key: rebuild after a compiler change by removing the cache entry.

Flags: GPU, CUDNN and OpenCV off (a reference anyone can build); AVX=0 because the cache may outlive the CPU it
was built on and AVX only changes speed; OPENMP=1 as upstream suggests for CPU (the harness runs it with
OMP_NUM_THREADS=1 anyway).
"""
import argparse
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from utils.darknet_lib import DarknetRuntime

REPO = Path(__file__).resolve().parents[1]
ALEXEYAB_SRC = Path(os.environ.get('ALEXEYAB_SRC', REPO.parent / 'shared' / 'darknet-src' / 'alexeyab'))
MAKE_FLAGS = ('GPU=0', 'CUDNN=0', 'CUDNN_HALF=0', 'OPENCV=0', 'AVX=0', 'OPENMP=1', 'LIBSO=1')
TOOLS = ('make', 'gcc', 'g++')   # the Makefile compiles C with gcc and links the library and CLI with g++
PRODUCTS = ('libdarknet.so', 'darknet', 'include/darknet.h')
STAMP = 'darkslim-build.txt'     # written last inside the temp folder: what was built, from what, how long it took
TAIL_LINES = 25                  # of make's output, in a failure's reason


class BuildError(RuntimeError):
    """AlexeyAB darknet cannot be built here: the message says why (a missing tool, or make's last lines)."""


def cache_root():
    """$DARKSLIM_CACHE, else $XDG_CACHE_HOME/darkslim, else ~/.cache/darkslim."""
    if os.environ.get('DARKSLIM_CACHE'):
        return Path(os.environ['DARKSLIM_CACHE'])
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'darkslim'


def source_key(source, flags=MAKE_FLAGS):
    """16 hex digits of the sha256 of `flags` and every file under `source` (relative path, size, contents)."""
    source = Path(source)
    h = hashlib.sha256('\0'.join(flags).encode() + b'\1')
    for f in sorted(p for p in source.rglob('*') if p.is_file()):
        data = f.read_bytes()
        h.update(f'{f.relative_to(source).as_posix()}\0{len(data)}\0'.encode())
        h.update(data)
    return h.hexdigest()[:16]


def tools_missing(tools=TOOLS):
    """Why the build tools are not all on PATH (a sentence), or None."""
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        return f"{', '.join(absent)} not found on PATH: AlexeyAB darknet is built from source with make, gcc and g++"
    return None


def runtime_in(folder):
    """The DarknetRuntime of a finished build in `folder`, or None when it holds none."""
    folder = Path(folder)
    if not (folder / STAMP).is_file() or not all((folder / p).is_file() for p in PRODUCTS):
        return None
    return DarknetRuntime('alexeyab', folder / 'libdarknet.so', folder / 'include' / 'darknet.h',
                          folder / 'darknet', home=folder)


def weights_version(runtime):
    """(major, minor, revision) that AlexeyAB's save_weights writes into a .weights header: its own version
    (src/version.h of the build), whatever the header of the file it loaded said."""
    text = (Path(runtime.home) / 'src' / 'version.h').read_text()
    found = dict(re.findall(r'#define\s+(MAJOR|MINOR|PATCH)_VERSION\s+(\d+)', text))
    return int(found['MAJOR']), int(found['MINOR']), int(found['PATCH'])


def _copy_writable(source, dst):
    """Copy the tree `source` into the new folder `dst` with owner write permission everywhere (the source may
    be read-only; make writes obj/ and chmods the scripts)."""
    shutil.copytree(source, dst, symlinks=False)
    for root, dirs, files in os.walk(dst):
        for name in dirs + files:
            p = os.path.join(root, name)
            os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
    os.chmod(dst, os.stat(dst).st_mode | stat.S_IWUSR)


def _make(folder, flags, jobs, timeout):
    """Run make in `folder`; raise BuildError with its last lines when it fails."""
    cmd = ['make', f'-j{jobs}', *flags]
    try:
        r = subprocess.run(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           errors='replace', timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors='replace') if isinstance(e.stdout, bytes) else (e.stdout or '')
        raise BuildError(f"`{' '.join(cmd)}` ran over {timeout} s; its last lines:\n{_tail(out)}") from None
    except OSError as e:   # make itself cannot start
        raise BuildError(f"`{' '.join(cmd)}` could not start: {e}") from None
    if r.returncode != 0:
        raise BuildError(f"`{' '.join(cmd)}` failed (exit {r.returncode}); its last lines:\n{_tail(r.stdout)}")
    absent = [p for p in PRODUCTS if not (Path(folder) / p).is_file()]
    if absent:
        raise BuildError(f"`{' '.join(cmd)}` succeeded without writing {', '.join(absent)}; its last lines:\n"
                         f"{_tail(r.stdout)}")


def _tail(text, n=TAIL_LINES):
    return '\n'.join(text.rstrip().splitlines()[-n:])


def build_alexeyab(source=ALEXEYAB_SRC, cache=None, flags=MAKE_FLAGS, jobs=2, timeout=1800):
    """The DarknetRuntime of AlexeyAB darknet built from `source` with `make -j<jobs> <flags>`, from the cache
    (`cache`, default cache_root()) when this source and these flags were built before, else built now (see the
    module docstring). `source` is only read. Raises BuildError when it cannot be built here."""
    source = Path(source)
    if not (source / 'Makefile').is_file():
        raise BuildError(f"{source / 'Makefile'} absent: no AlexeyAB darknet source tree there")
    key = source_key(source, flags)
    root = Path(cache) if cache else cache_root()
    final = root / f'alexeyab-{key}'
    found = runtime_in(final)
    if found:
        return found
    why = tools_missing()
    if why:
        raise BuildError(why)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f'.alexeyab-{key}-'))
    try:
        tree = tmp / 'tree'
        _copy_writable(source, tree)
        t = time.perf_counter()
        _make(tree, flags, jobs, timeout)
        seconds = time.perf_counter() - t
        shutil.rmtree(tree / 'obj', ignore_errors=True)   # objects are linked in already
        (tree / STAMP).write_text(f"source {source.resolve()}\nkey {key}\nmake -j{jobs} {' '.join(flags)}\n"
                                  f"seconds {seconds:.1f}\n")
        try:
            os.rename(tree, final)
        except OSError:
            if not runtime_in(final):   # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return runtime_in(final)


_RESULTS = {}


def alexeyab(source=ALEXEYAB_SRC, cache=None):
    """(DarknetRuntime, None) or (None, why it cannot be built here), once per process for each source and cache:
    a failing build is not retried by every caller."""
    k = (str(source), str(cache))
    if k not in _RESULTS:
        try:
            _RESULTS[k] = build_alexeyab(source, cache), None
        except (BuildError, OSError) as e:   # OSError: an unreadable tree, a cache that cannot be written
            _RESULTS[k] = None, str(e)
    return _RESULTS[k]


def get_args_parser():
    p = argparse.ArgumentParser(description="Build AlexeyAB darknet (CPU, libdarknet.so + CLI) into the cache, or "
                                            "find it there; prints the build folder.")
    p.add_argument('--source', type=Path, default=ALEXEYAB_SRC, help='its source tree (only read)')
    p.add_argument('--cache', type=Path, default=None, help=f'cache folder (default {cache_root()})')
    p.add_argument('--jobs', type=int, default=2, help='make -j')
    return p


def main(args):
    t = time.perf_counter()
    try:
        runtime = build_alexeyab(args.source, args.cache, jobs=args.jobs)
    except BuildError as e:
        print(f"AlexeyAB darknet not built: {e}", file=sys.stderr)
        return 1
    print(f"AlexeyAB darknet: {runtime.home} ({time.perf_counter() - t:.1f} s)")
    return 0


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))
