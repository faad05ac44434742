"""Load a model from any source: a zoo name, an HF folder, a ``.gguf`` file, or a hub id.

Every path ends in the same :class:`LoadedSource`: an fp32 (or ``dtype``) HF causal LM in
eval mode, its tokenizer, and the source's identity (name, local path, sha256 of the weights)
that artifacts and reports record. The architecture is checked against the tensor-role table
(:func:`~edgequant.models.architectures.spec_for`) after reading the config and before
loading any weights. Library exceptions about missing or corrupt files become
:class:`~edgequant.errors.ModelLoadError` with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..errors import EdgequantError, ModelLoadError
from ..io_utils import sha256_file
from . import zoo
from .architectures import ArchSpec, spec_for

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SourceKind = Literal["zoo", "hf_dir", "hub", "gguf"]
WEIGHT_PATTERNS = ("*.safetensors",)


@dataclass
class LoadedSource:
    """A loaded model and where it came from.

    Attributes:
        model: the HF causal LM, in eval mode.
        tokenizer: its tokenizer (with the chat template when the source has one).
        name: the name the user gave (zoo name, hub id) or the folder/file name.
        path: the local folder (zoo, hf_dir, hub) or ``.gguf`` file it was read from.
        sha256: of the weights: the ``.gguf`` file, the single ``*.safetensors`` file, or
            for several files the sha256 of their ``"<name> <sha256>\\n"`` lines sorted by name.
        kind: ``zoo`` | ``hf_dir`` | ``hub`` | ``gguf``.
        spec: the architecture's tensor-role table entry.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: Path
    sha256: str
    kind: SourceKind
    spec: ArchSpec


def load_source(source: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> LoadedSource:
    """Resolve and load ``source``.

    Resolution order: a zoo name (:func:`edgequant.models.zoo.pull`); an existing folder with
    ``config.json``; an existing ``.gguf`` file (dequantized by transformers); a hub id (online,
    then the local HF cache only).

    Raises:
        ModelLoadError: nothing matches, or the files are missing/corrupt.
        UnsupportedArchitectureError: the architecture has no tensor-role table entry.

    Example:
        >>> src = load_source("smollm2-135m")
        >>> src.kind, src.model.config.num_hidden_layers
        ('zoo', 30)
    """
    if isinstance(source, str) and source in zoo.ZOO:
        path = zoo.pull(source)
        return _load_hf_dir(path, dtype, name=source, kind="zoo")
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder without config.json; point at an HF "
                                 "checkpoint folder (config.json + *.safetensors)")
        return _load_hf_dir(path, dtype, name=path.name, kind="hf_dir")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; give a .gguf file, an HF "
                                 "checkpoint folder, a zoo name or a hub id")
        return _load_gguf(path, dtype)
    if not isinstance(source, str) or _looks_like_path(source):
        raise ModelLoadError(f"{source} does not exist (no such file or folder)")
    return _load_hub(source, dtype)


def weights_sha256(folder: Path) -> str:
    """sha256 identifying a folder's weights (see :class:`LoadedSource`)."""
    files = sorted(f for pat in WEIGHT_PATTERNS for f in folder.glob(pat))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights; edgequant loads safetensors "
                             "only (nothing pickled)")
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def dequantize_gguf(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file into a plain (saveable) HF causal LM and its tokenizer.

    transformers marks a GGUF-loaded model as quantized and refuses ``save_pretrained``; the
    weights are copied into a fresh model built from the config without that mark. The
    tokenizer's special tokens come from the GGUF metadata (see :func:`gguf_tokenizer`).

    Raises:
        ModelLoadError: truncated/corrupt file. UnsupportedArchitectureError: no table entry.
    """
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    reader = _guard(path, "GGUF", lambda: GGUFReader(str(path)))  # parses every tensor's extent
    config = _guard(path, "GGUF metadata", lambda: AutoConfig.from_pretrained(
        str(path.parent), gguf_file=path.name))
    spec_for(config)
    loaded = _from_pretrained(path, "GGUF", str(path.parent), config=config, dtype=dtype,
                              gguf_file=path.name)
    state = loaded.state_dict()
    config = loaded.config
    del loaded
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _guard(path, "GGUF tensors", lambda: model.load_state_dict(state, strict=True))
    model.tie_weights()
    tokenizer = _guard(path, "GGUF tokenizer", lambda: gguf_tokenizer(path, reader))
    return model.eval(), tokenizer


# --- the four kinds -------------------------------------------------------------------------


def _load_hf_dir(path: Path, dtype: torch.dtype, name: str, kind: SourceKind) -> LoadedSource:
    from transformers import AutoConfig, AutoTokenizer

    config = _guard(path, "config", lambda: AutoConfig.from_pretrained(str(path)))
    spec = spec_for(config)
    sha = weights_sha256(path)
    _check_safetensors(path)
    model = _from_pretrained(path, "weights", str(path), config=config, dtype=dtype)
    tokenizer = _guard(path, "tokenizer", lambda: AutoTokenizer.from_pretrained(str(path)))
    return LoadedSource(model.eval(), tokenizer, name, path, sha, kind, spec)


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedSource:
    sha = sha256_file(path)
    model, tokenizer = dequantize_gguf(path, dtype)
    return LoadedSource(model, tokenizer, path.name, path, sha, "gguf", spec_for(model))


def _load_hub(repo_id: str, dtype: torch.dtype) -> LoadedSource:
    from transformers import AutoConfig

    errors = []
    modes = (False, True) if _hub_reachable() else (True,)  # no 40 s of retries when offline
    if len(modes) == 1:
        errors.append("hub host unreachable")
    for local_only in modes:
        try:
            folder = _hub_fetch(repo_id, "config.json", local_only)
            spec_for(AutoConfig.from_pretrained(folder))
            folder = _hub_snapshot(repo_id, local_only)
            return _load_hf_dir(Path(folder), dtype, name=repo_id, kind="hub")
        except EdgequantError:
            raise
        except Exception as exc:  # hub errors come in many types; report them all
            errors.append(_hub_error(exc, local_only))
    raise ModelLoadError(
        f"cannot load {repo_id!r}: not a zoo name ({', '.join(zoo.list_models())}), not a "
        f"folder, not a .gguf file, and the hub is unreachable or has no such model "
        f"({'; '.join(errors)})")


def _hub_error(exc: Exception, local_only: bool) -> str:
    if local_only and type(exc).__name__ == "LocalEntryNotFoundError":
        return "not in the local HF cache"
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint (honours ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_fetch(repo_id: str, filename: str, local_only: bool) -> str:
    from huggingface_hub import hf_hub_download

    return os.path.dirname(hf_hub_download(repo_id, filename, local_files_only=local_only,
                                           etag_timeout=5))


def _hub_snapshot(repo_id: str, local_only: bool) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only,
                             etag_timeout=5)


# --- helpers --------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else was meant as a local path."""
    return (source.startswith((".", "/", "~")) or source.lower().endswith(".gguf")
            or source.count("/") > 1 or "\\" in source)


def _guard(path: Path, what: str, fn):  # type: ignore[no-untyped-def]
    """Run a library call; turn its exceptions into a ModelLoadError naming the file."""
    try:
        return fn()
    except EdgequantError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot read the {what} of {path}: {msg} ({type(exc).__name__}); "
                             "the file is truncated, corrupt or not a model — fetch it again"
                             ) from exc


def _from_pretrained(path: Path, what: str, *args: Any, **kw: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` that refuses missing or mis-shaped weights
    (transformers would initialise them at random and only log a report)."""
    from transformers import AutoModelForCausalLM

    model, info = _guard(path, what, lambda: AutoModelForCausalLM.from_pretrained(
        *args, output_loading_info=True, **kw))
    bad = [*info.get("missing_keys", ()), *(str(k) for k in info.get("mismatched_keys", ()))]
    if bad:
        shown = ", ".join(sorted(bad)[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ModelLoadError(f"{path} is missing {len(bad)} tensor(s) the model needs "
                             f"({shown}); the {what} are incomplete or for another model")
    return model


def _check_safetensors(folder: Path) -> None:
    """Open each safetensors header before loading: truncated files fail here, clearly."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        def _open(f: Path = f) -> None:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        _guard(f, "safetensors header", _open)


def _gguf_list(reader: Any, key: str) -> list[Any]:
    """A GGUF array field as a list (str for strings, else numbers), fast for 262k entries."""
    field = reader.fields[key]
    if field.types[-1].name == "STRING":
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return [field.parts[i][0].item() for i in field.data]


def _gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_tokenizer(path: str | os.PathLike[str], reader: Any = None) -> PreTrainedTokenizerBase:
    """The tokenizer stored in a GGUF file, checked against llama.cpp's reading of it.

    Two fixes over transformers 5.17's GGUF tokenizer conversion:

    - special tokens (bos/eos/unk/pad) come from the ``tokenizer.ggml.*_token_id`` fields
      (transformers sets SmolLM2's eos to ``<|im_start|>``, it is ``<|im_end|>``);
    - a SentencePiece-BPE vocabulary without a space prefix (Gemma) becomes a BPE tokenizer
      with merges ranked by the GGUF scores, control and user-defined tokens matched whole, and
      BOS added when ``tokenizer.ggml.add_bos_token`` says so. transformers builds a Unigram
      model from these scores (wrong pieces) that reloads as a merge-less BPE (characters).
    """
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    path = Path(path)
    reader = reader if reader is not None else GGUFReader(str(path))
    spm = _gguf_value(reader, "tokenizer.ggml.model") == "llama"
    if spm and not _gguf_value(reader, "tokenizer.ggml.add_space_prefix", True):
        tokenizer = _spm_bpe_tokenizer(reader)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = _gguf_value(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            token = tokenizer.convert_ids_to_tokens(int(token_id))
            if token is not None:
                setattr(tokenizer, f"{kind}_token", token)
    template = _gguf_value(reader, "tokenizer.chat_template")
    if template is not None and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = str(template)
    return tokenizer


# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


def _spm_bpe_tokenizer(reader: Any) -> PreTrainedTokenizerBase:
    """A Gemma-style BPE tokenizer from a GGUF's SentencePiece tokens, scores and types."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    tokens = _gguf_list(reader, "tokenizer.ggml.tokens")
    scores = _gguf_list(reader, "tokenizer.ggml.scores")
    types = _gguf_list(reader, "tokenizer.ggml.token_type")
    whole = [i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = generate_merges(vocab, dict(zip(tokens, scores, strict=True)),
                             skip_tokens={tokens[i] for i in whole})
    tokenizer = GemmaTokenizer(
        vocab=vocab, merges=merges,
        add_bos_token=bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", True)),
        add_eos_token=bool(_gguf_value(reader, "tokenizer.ggml.add_eos_token", False)))
    tokenizer.add_tokens([AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
                          for i in whole])
    return tokenizer
