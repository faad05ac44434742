"""Model + recipe → files other engines load. Today: GGUF for llama.cpp (:mod:`.gguf`,
from :mod:`.convert`'s tensors and :mod:`.imatrix`'s importance matrices); the numpy block
encoders and file formats live in :mod:`edgequant.gguf`."""
