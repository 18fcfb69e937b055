"""Release a trained checkpoint as a Hugging Face Qwen3 + sentence-transformers directory.

`export_checkpoint` is the library entry point; tools/export_hf.py is its command line.

Modules:
  hf_export                    checkpoint -> HF Qwen3 directory at a chosen (R, K, M) cut
  training_sources             the tokenizer, EOS, length and manifest a run trained with
  tokenizer_files              the exported tokenizer, appending EOS as training did
  sentence_transformers_files  Transformer -> last-token Pooling -> Normalize, prompts
  model_card                   the export's README.md
  peft_files                   a LoRA checkpoint's adapters as a peft adapter directory
  errors                       ExportError and ExportWarning
"""

from mlembed_jax.export.hf_export import ExportError, ExportWarning, export_checkpoint, fold_mel

__all__ = ["ExportError", "ExportWarning", "export_checkpoint", "fold_mel"]
