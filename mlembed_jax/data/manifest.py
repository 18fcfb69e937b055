"""The dataset manifest: which datasets exist, their task type and instruction prefixes.

A manifest is a JSON (or YAML) file mapping dataset name -> entry:

    {"my_retrieval": {"task_type": "retrieval", "query_prefix": "query: "},
     "my_clusters":  {"task_type": "clustering", "num_negatives": 5}}

Per-type defaults follow the recipe: retrieval uses 7 hard negatives and the in-batch loss,
clustering 9 negatives, classification 1 (both without in-batch loss). The manifest order
defines each dataset's `dataset_id` in the batch.

For the released training data, `manifest_for_files` writes the manifest from the task type
the reference code gives each of its 502 dataset names (reference_task_types.json, shipped
with the package; tools/make_manifest.py is the command line).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from mlembed_jax import storage

REFERENCE_TASK_TYPES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "reference_task_types.json")

TASK_TYPES = ("retrieval", "clustering", "classification")
DEFAULT_NEGATIVES = {"retrieval": 7, "clustering": 9, "classification": 1}
_ENTRY_KEYS = {"task_type", "query_prefix", "document_prefix", "num_negatives"}
# '+' and '#' for the reference's own names (xcodeeval_code2code_C++, ..._C#); no '/',
# whitespace or leading '.', since a name is also a file name and a metric key.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+#\-]*$")


class ManifestError(ValueError):
    """The manifest is missing, unreadable or inconsistent with the data files."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    task_type: str
    query_prefix: str = ""
    document_prefix: str = ""
    num_negatives: int = 0  # resolved: the per-type default unless overridden

    @property
    def in_batch(self) -> bool:
        """The in-batch loss applies to retrieval datasets only."""
        return self.task_type == "retrieval"

    def to_json(self) -> dict:
        """The manifest entry (without the name, which is its key)."""
        d = dataclasses.asdict(self)
        del d["name"]
        return d


def parse_manifest(data: object, source: str = "<manifest>") -> dict[str, DatasetSpec]:
    """Validates a parsed manifest mapping; returns name -> DatasetSpec in file order."""
    if not isinstance(data, dict) or not data:
        raise ManifestError(f"{source}: a manifest must be a non-empty mapping of dataset name "
                            "-> {task_type: ...}")
    specs = {}
    for name, entry in data.items():
        where = f"{source}: dataset {name!r}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ManifestError(f"{where}: names may hold letters, digits, '_', '-', '.', "
                                  "'+', '#' only, starting with a letter or digit")
        if isinstance(entry, str):  # shorthand: "name": "retrieval"
            entry = {"task_type": entry}
        if not isinstance(entry, dict):
            raise ManifestError(f"{where}: entry must be a mapping, got {type(entry).__name__}")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise ManifestError(f"{where}: unknown keys {sorted(unknown)}; allowed "
                                f"{sorted(_ENTRY_KEYS)}")
        task = entry.get("task_type")
        if task not in TASK_TYPES:
            raise ManifestError(f"{where}: task_type={task!r} must be one of {TASK_TYPES}")
        negs = entry.get("num_negatives", DEFAULT_NEGATIVES[task])
        if not isinstance(negs, int) or isinstance(negs, bool) or negs < 1:
            raise ManifestError(f"{where}: num_negatives={negs!r} must be a positive integer")
        prefixes = {}
        for key in ("query_prefix", "document_prefix"):
            value = entry.get(key, "")
            if not isinstance(value, str):
                raise ManifestError(f"{where}: {key} must be a string")
            prefixes[key] = value
        specs[name] = DatasetSpec(name=name, task_type=task, num_negatives=negs, **prefixes)
    return specs


def load_manifest(path: str) -> dict[str, DatasetSpec]:
    """Reads a .json / .yaml / .yml manifest file."""
    storage.check_location(path, "manifest")
    if not storage.isfile(path):
        raise ManifestError(f"manifest {path!r} does not exist")
    text = storage.read_text(path)
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml  # optional; only YAML manifests need it

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # any parse failure gets the file name
        raise ManifestError(f"manifest {path!r} could not be parsed: {e}") from e
    return parse_manifest(data, source=path)


def check_files_match(specs: dict[str, DatasetSpec], file_names: list[str], where: str) -> None:
    """Every data file needs a manifest entry and every entry a file; errors name them."""
    missing_entry = sorted(set(file_names) - set(specs))
    if missing_entry:
        raise ManifestError(f"{where}: dataset file(s) without a manifest entry: "
                            f"{', '.join(missing_entry)} (add them to the manifest with a "
                            "task_type, or remove the files)")
    missing_file = sorted(set(specs) - set(file_names))
    if missing_file:
        raise ManifestError(f"{where}: manifest lists dataset(s) with no data file: "
                            f"{', '.join(missing_file)}")


def reference_task_types(path: str = REFERENCE_TASK_TYPES) -> dict[str, str]:
    """Dataset name -> task type: by default the reference code's 502 training datasets."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ManifestError(f"task types file {path!r} could not be read: {e}") from e
    types = data.get("task_types") if isinstance(data, dict) else None
    if not isinstance(types, dict) or not types:
        raise ManifestError(f"{path}: expected {{\"task_types\": {{name: task type}}}}")
    bad = sorted(n for n, t in types.items() if t not in TASK_TYPES)
    if bad:
        raise ManifestError(f"{path}: unknown task types for {bad[:5]}; use {TASK_TYPES}")
    return dict(types)


def manifest_for_files(file_names: list[str], task_types: dict[str, str],
                       negative_counts: dict[str, int] | None = None) -> dict:
    """The manifest (name -> {"task_type": ...}, in sorted name order) of data files named
    `<name>.parquet` or plain names, from a name -> task type table. Every file must be in
    the table: the error lists all that are not. negative_counts (name -> negative columns
    in the file): a file with fewer than its task type samples gets an explicit
    "num_negatives" of that count, so the departure is written where a reader sees it."""
    names = sorted(n[: -len(".parquet")] if n.endswith(".parquet") else n for n in file_names)
    if not names:
        raise ManifestError("no dataset files given (expected <name>.parquet files)")
    unknown = [n for n in names if n not in task_types]
    if unknown:
        raise ManifestError(
            f"{len(unknown)} dataset file(s) have no known task type: "
            f"{', '.join(f'{n}.parquet' for n in unknown)}. Write their entries by hand "
            "(name -> retrieval / clustering / classification) or pass a task types file "
            "that has them")
    manifest = {n: {"task_type": task_types[n]} for n in names}
    for n, have in (negative_counts or {}).items():
        if n in manifest and have < DEFAULT_NEGATIVES[manifest[n]["task_type"]]:
            manifest[n]["num_negatives"] = have
    parse_manifest(manifest, source="generated manifest")  # same checks as a written one
    return manifest

