"""Release a trained checkpoint as a Hugging Face Qwen3 + sentence-transformers directory.

`export_checkpoint` is the library entry point; tools/export_hf.py is its command line.
"""

from mlembed_jax.export.hf_export import ExportError, ExportWarning, export_checkpoint, fold_mel

__all__ = ["ExportError", "ExportWarning", "export_checkpoint", "fold_mel"]
