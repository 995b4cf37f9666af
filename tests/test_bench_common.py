"""bench/common.py: the commit a bench records is '+dirty' only when code changed, not when the benches' own
outputs (bench/results, the docs' pictures) did."""
import subprocess

from bench.common import git_commit


def _git(repo, *args):
    return subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_the_commit_is_dirty_for_code_changes_only(tmp_path):
    (tmp_path / 'bench' / 'results').mkdir(parents=True)
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'code.py').write_text('x = 1\n')
    (tmp_path / 'docs' / 'GUIDE.md').write_text('hand-written\n')
    (tmp_path / 'bench' / 'results' / 'a.json').write_text('{}\n')
    _git(tmp_path, 'init', '-q')
    _git(tmp_path, 'add', '.')
    _git(tmp_path, 'commit', '-q', '-m', 'one')
    head = _git(tmp_path, 'rev-parse', 'HEAD')
    assert git_commit(tmp_path) == head
    (tmp_path / 'bench' / 'results' / 'a.json').write_text('{"new": 1}\n')   # a bench rewrote its result
    (tmp_path / 'bench' / 'results' / 'b.json').write_text('{}\n')
    (tmp_path / 'docs' / 'picture.png').write_bytes(b'png')
    assert git_commit(tmp_path) == head
    (tmp_path / 'docs' / 'GUIDE.md').write_text('edited\n')               # a document, not a bench output
    assert git_commit(tmp_path) == head + '+dirty'
    _git(tmp_path, 'checkout', '-q', '--', 'docs/GUIDE.md')
    (tmp_path / 'new.py').write_text('y = 1\n')                            # new, untracked code
    assert git_commit(tmp_path) == head + '+dirty'
    (tmp_path / 'new.py').unlink()
    (tmp_path / 'code.py').write_text('x = 2\n')
    assert git_commit(tmp_path) == head + '+dirty'
    assert git_commit(tmp_path / 'nowhere') == 'unknown'
