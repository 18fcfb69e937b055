"""What the export needs to know about how a checkpoint was trained, beyond its params.

The saved run config names the prepared data directory; its prepared.json records the
tokenizer, the EOS id appended to every text, the truncation length and the manifest
(task types and instruction prefixes, which are baked into the training tokens).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

from mlembed_jax.data import manifest as manifest_lib
from mlembed_jax.export.errors import ExportError, ExportWarning

# The package's parent: a relative tokenizer_dir in prepared.json is usually relative to the
# repository root, where tools/prepare_data.py is run.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class TrainingSources:
    tokenizer_dir: str
    eos_token_id: int
    max_seq_length: int
    manifest: dict  # dataset name -> manifest_lib.DatasetSpec; {} if unknown


def _prepared_info(config) -> tuple[dict | None, str]:
    prepared_dir = config.data.get("prepared_dir", "")
    path = os.path.join(prepared_dir, "prepared.json") if prepared_dir else ""
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f), prepared_dir
    return None, prepared_dir


def _resolve_dir(path: str, prepared_dir: str) -> str | None:
    """An existing directory for `path`: as given, else relative to the current directory,
    the prepared data directory or any directory above it, or the repository root."""
    if os.path.isabs(path):
        return path if os.path.isdir(path) else None
    anchors = [os.getcwd()]
    d = os.path.abspath(prepared_dir) if prepared_dir else ""
    while d and d not in anchors:
        anchors.append(d)
        parent = os.path.dirname(d)
        d = parent if parent != d else ""
    anchors.append(_REPO_ROOT)
    for a in anchors:
        cand = os.path.join(a, path)
        if os.path.isdir(cand):
            return os.path.abspath(cand)
    return None


def training_sources(config, tokenizer_override: str | None = None) -> TrainingSources:
    """Tokenizer, EOS, truncation length and manifest of the run that saved `config`."""
    info, prepared_dir = _prepared_info(config)
    if tokenizer_override:
        if not os.path.isdir(tokenizer_override):
            raise ExportError(f"--tokenizer {tokenizer_override!r} is not a directory")
        tokenizer_dir = os.path.abspath(tokenizer_override)
    else:
        recorded = (info or {}).get("tokenizer_dir")
        tokenizer_dir = _resolve_dir(recorded, prepared_dir) if recorded else None
        if tokenizer_dir is None:
            where = (f"prepared.json names {recorded!r}, which is not found here" if recorded
                     else f"the prepared data {prepared_dir!r} is not found here")
            raise ExportError(f"cannot find the training tokenizer ({where}); pass "
                              "--tokenizer DIR with the tokenizer the data was prepared with")

    recorded_fp = (info or {}).get("tokenizer_fingerprint")
    if tokenizer_override and recorded_fp:
        from mlembed_jax.data.prepare import _tokenizer_fingerprint

        if _tokenizer_fingerprint(tokenizer_dir) != recorded_fp:
            warnings.warn(f"--tokenizer {tokenizer_override!r} is not byte-identical to the "
                          "tokenizer the training data was prepared with (prepared.json "
                          f"fingerprint {recorded_fp}); make sure it tokenizes the same way",
                          ExportWarning, stacklevel=2)

    eos = int(config.model.eos_token_id)
    if info is not None and int(info.get("eos_token_id", eos)) != eos:
        warnings.warn(f"prepared.json records EOS id {info['eos_token_id']} but the config has "
                      f"model.eos_token_id={eos}; exporting with the prepared data's EOS, "
                      "which is what training appended", ExportWarning, stacklevel=2)
        eos = int(info["eos_token_id"])
    max_len = int((info or {}).get("max_seq_length", config.data.max_seq_length))

    manifest = {}
    if info is not None and "manifest" in info:
        manifest = manifest_lib.parse_manifest(info["manifest"], source=prepared_dir)
    manifest_path = config.data.get("manifest", "")
    if manifest_path and os.path.isfile(manifest_path):
        given = manifest_lib.load_manifest(manifest_path)
        # Prefixes are baked into the prepared tokens, so those come from prepared.json; task
        # types and negative counts are what the run's manifest file said (as load_prepared).
        manifest = {n: dataclasses.replace(given[n], query_prefix=s.query_prefix,
                                           document_prefix=s.document_prefix)
                    if n in given else s for n, s in manifest.items()} or given
    if not manifest:
        warnings.warn("the training manifest was not found (prepared data not present here); "
                      "the export has no instruction prompts and the model card lists no "
                      "datasets", ExportWarning, stacklevel=2)
    return TrainingSources(tokenizer_dir=tokenizer_dir, eos_token_id=eos, max_seq_length=max_len,
                           manifest=manifest)
