"""Evaluation: perplexity, KL divergence, task accuracy, speed, memory, size, generations —
computed against the ``Runnable`` interface only, so every backend is measured by the same code.

The entry point is ``edgequant.evaluate`` (:func:`edgequant.eval.evaluate.evaluate`). This
package imports nothing at load time: the memory subprocess imports it without torch.
"""
