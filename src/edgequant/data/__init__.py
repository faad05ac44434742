"""Data: corpora, token streams cached per tokenizer, seeded window sampling, and tasks.

    from edgequant.data import corpus_tokens, sample_windows
    stream = corpus_tokens("wiki", tokenizer)            # int64 (N,), cached per tokenizer
    calib = sample_windows(stream, n=128, seq_len=512, seed=0)   # (128, 512)
"""

from .corpora import corpus_names, load_corpus
from .tasks import MCItem, load_task, task_names
from .tokens import HFTextTokenizer, as_text_tokenizer, corpus_tokens, fingerprint, sample_windows

__all__ = ["HFTextTokenizer", "MCItem", "as_text_tokenizer", "corpus_names", "corpus_tokens",
           "fingerprint", "load_corpus", "load_task", "sample_windows", "task_names"]
