"""What the export needs to know about how a checkpoint was trained, beyond its params:
`data.prepared.training_text` of its saved config, with the export's own rules on top (a
--tokenizer override is checked against the recorded fingerprint; a missing tokenizer or
manifest is an error or a warning that says what the export will lack).
"""

from __future__ import annotations

import dataclasses
import warnings

from mlembed_jax import storage
from mlembed_jax.data.prepared import tokenizer_fingerprint, training_text
from mlembed_jax.export.errors import ExportError, ExportWarning


@dataclasses.dataclass(frozen=True)
class TrainingSources:
    tokenizer_dir: str
    eos_token_id: int
    max_seq_length: int
    manifest: dict  # dataset name -> manifest_lib.DatasetSpec; {} if unknown


def training_sources(config, tokenizer_override: str | None = None) -> TrainingSources:
    """Tokenizer, EOS, truncation length and manifest of the run that saved `config`."""
    text = training_text(config)
    if tokenizer_override:
        if not storage.isdir(tokenizer_override):
            raise ExportError(f"--tokenizer {tokenizer_override!r} is not a directory")
        tokenizer_dir = storage.absolute(tokenizer_override)
        if text.fingerprint and tokenizer_fingerprint(tokenizer_dir) != text.fingerprint:
            warnings.warn(f"--tokenizer {tokenizer_override!r} is not byte-identical to the "
                          "tokenizer the training data was prepared with (prepared.json "
                          f"fingerprint {text.fingerprint}); make sure it tokenizes the same "
                          "way", ExportWarning, stacklevel=2)
    else:
        tokenizer_dir = text.tokenizer_dir
        if tokenizer_dir is None:
            raise ExportError(text.tokenizer_not_found("pass --tokenizer DIR pointing at it"))

    eos = int(config.model.eos_token_id)
    if text.eos_token_id is not None and text.eos_token_id != eos:
        warnings.warn(f"prepared.json records EOS id {text.eos_token_id} but the config has "
                      f"model.eos_token_id={eos}; exporting with the prepared data's EOS, "
                      "which is what training appended", ExportWarning, stacklevel=2)
        eos = text.eos_token_id
    if not text.manifest:
        warnings.warn("the training manifest was not found (prepared data not present here); "
                      "the export has no instruction prompts and the model card lists no "
                      "datasets", ExportWarning, stacklevel=2)
    return TrainingSources(tokenizer_dir=tokenizer_dir, eos_token_id=eos,
                           max_seq_length=text.max_seq_length, manifest=text.manifest)
