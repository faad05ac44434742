"""The inference engine: prefill and decode on explicit KV state, sampling, stop strings,
streaming and chat templates, for native torch models and for llama.cpp.

    import edgequant as eq
    with eq.open("out/smollm2.gguf") as engine:
        print(engine.generate("The capital of France is", max_tokens=16).text)

:class:`Engine` is the interface (:mod:`.base`), :class:`SamplingParams` a request's sampling
and stopping (:mod:`.sampling`); the backends are :mod:`.torch_engine` and
:mod:`.llamacpp_engine`, imported only when used (this package imports no torch).
"""

from __future__ import annotations

from .base import Engine, EngineState, Generation, GenerationResult
from .sampling import EngineError, SamplingParams

__all__ = ["Engine", "EngineError", "EngineState", "Generation", "GenerationResult",
           "SamplingParams"]
