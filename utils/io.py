"""Atomic output: write to a temp file in the target folder, then rename over the target."""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; on success rename it onto `path`, on failure remove it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, 'w') as f:
            f.write(text)


def write_bytes_atomic(path, data):
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)
