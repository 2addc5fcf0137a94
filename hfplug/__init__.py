"""hfplug: fine-tune and chat with Hugging Face models on modest hardware.

Small importable pieces (data, callbacks, metrics, model options) that the thin
scripts in ``recipes/`` put together around ``transformers.Trainer``.
"""

__version__ = "0.1.0"
