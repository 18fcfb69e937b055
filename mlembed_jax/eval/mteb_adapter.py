"""MTEB at any (MEL rank, MLL exit, MRL dim) point of a model, without exporting it.

    import mteb
    from mlembed_jax.eval.mteb_adapter import MTEBEncoder

    enc = MTEBEncoder.load("runs/demo", "r16:e1:d32")   # workdir, checkpoints/<step>, export
    # or, from a loaded model: MTEBEncoder(encode.load(...), Point(16, 1, 32), TaskPrompts.of(m))
    mteb.evaluate(enc, mteb.get_tasks(tasks=["SciFact"]), cache=mteb.ResultCache("results"))

`MTEBEncoder` satisfies the installed mteb's `EncoderProtocol` (mteb 2.x: `encode(inputs:
DataLoader[BatchedInput], *, task_metadata, hf_split, hf_subset, prompt_type)`): texts are
embedded by `encode.Encoder` (the packed encode, one pack per local device), L2-normalised,
so cosine similarity is a dot product. Each point has its own mteb ModelMeta name and
revision, so the result files of different points never overwrite each other.

Instruction prompts (`TaskPrompts`), first match wins, for each task and prompt type:
  1. a prompts file: mteb's own key format ("<TaskName>-query", "<TaskName>", "<TaskType>-
     document", "<TaskType>", "query", "document"; first match in that order; mteb accepts
     only its registry's task names, so local tasks are keyed by their type);
  2. the training manifest: the prefixes of the datasets of the matching task type
     (Retrieval/Reranking -> retrieval, *Classification -> classification, Clustering ->
     clustering); queries (and both sides of a symmetric task) get the query prefix,
     documents the document prefix, exactly what training put before them;
  3. an exported model's own "query"/"document" prompts;
  4. the paper's evaluation prompt: the task's instruction from mteb's task metadata as
     "Instruct: {instruction}\\nQuery:" on queries and symmetric inputs, nothing on documents
     (the template mteb uses for Qwen3-Embedding).
`--prompts=instruct` (TaskPrompts.of(model, "instruct")) skips 1-3: the instruction for every
task. Every prompt used is recorded with its source (`TaskPrompts.used`) for the summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import warnings
from typing import Any

import numpy as np

from mlembed_jax import storage
from mlembed_jax.embedding import DEFAULT_BATCH_TOKENS, normalize

try:
    from mteb.models.abs_encoder import AbsEncoder as _Base
    from mteb.types import PromptType
except ImportError:  # mteb is an optional extra; MTEBEncoder() says how to install it
    _Base, PromptType = object, None


class MTEBError(ValueError):
    """A request the MTEB evaluation cannot serve; the message names the thing and the fix."""


def require_mteb():
    """The mteb module, or MTEBError saying how to install it."""
    try:
        import mteb
    except ImportError:
        raise MTEBError("mteb is not installed; pip install 'mlembed_jax[mteb]' (or "
                        "pip install 'mteb>=2.26')") from None
    return mteb


# --------------------------------------------------------------------------- points

_PART = re.compile(r"^([red])(\d+)$")


@dataclasses.dataclass(frozen=True)
class Point:
    """A requested point; None = the model's full value (or its export's default dim)."""

    rank: int | None = None
    exit: int | None = None
    dim: int | None = None

    @property
    def text(self) -> str:
        parts = [f"{k[0]}{v}" for k, v in (("rank", self.rank), ("exit", self.exit),
                                            ("dim", self.dim)) if v is not None]
        return ":".join(parts) or "full"


def parse_points(text: str) -> list[Point]:
    """"r8:e2:d16,full,d32" -> Points. Each item is "full" or colon-separated parts r<rank>,
    e<exit>, d<dim>, each at most once; a part left out is the full model's value."""
    points = []
    for item in (x.strip() for x in str(text).split(",")):
        if not item:
            continue
        if item == "full":
            points.append(Point())
            continue
        got: dict[str, int] = {}
        for part in item.split(":"):
            m = _PART.match(part.strip())
            key = {"r": "rank", "e": "exit", "d": "dim"}.get(m.group(1)) if m else None
            if key is None or key in got:
                raise MTEBError(f"--points: {item!r} is not a point; write 'full' or parts "
                                "r<rank>:e<exit>:d<dim> (each at most once), e.g. r8:e2:d16")
            got[key] = int(m.group(2))
        points.append(Point(**got))
    if not points:
        raise MTEBError("--points is empty; give e.g. --points=full or --points=r8:e2:d16,full")
    return points


def resolve_points(model, points, allow_untrained: bool = False) -> list[tuple[Point, tuple]]:
    """[(point, (rank, exit, dim))] with the model's values filled in, each checked against
    the trained sets (EncodeError otherwise), duplicates after resolution dropped."""
    out, seen = [], set()
    for p in points:
        r = model.check(p.rank, p.exit, p.dim, allow_untrained)
        if r not in seen:
            seen.add(r)
            out.append((p, r))
    return out


def point_label(rank, exit, dim) -> str:
    """"r16-e1-d32" (no r part for a model without MEL): the per-point model-name suffix."""
    return "-".join(([f"r{rank}"] if rank is not None else []) + [f"e{exit}", f"d{dim}"])


def point_params(model, rank: int | None, exit: int) -> int:
    """Parameters of the model cut to `exit` layers at MEL rank `rank` (the factors kept as
    two matrices: vocab*r + r*d), plus the final norm; a plain table counts vocab*d."""
    import jax

    cfg = model.cfg
    per_layer = sum(int(np.prod(x.shape[1:]))
                    for x in jax.tree_util.tree_leaves(model.params["layers"]))
    if cfg.mel:
        r = cfg.mel_r_max if rank is None else rank
        embed = cfg.vocab_size * r + r * cfg.hidden_size
    else:
        embed = cfg.vocab_size * cfg.hidden_size
    return int(embed + exit * per_layer + cfg.hidden_size)


def model_revision(model) -> str:
    """"step<N>" for a training checkpoint; for an HF directory a hash of its config and its
    files' names and sizes (a re-export with other weights gets another revision)."""
    if model.step is not None:
        return f"step{model.step}"
    path = model.source
    if not path or not storage.isdir(path):  # built from params in memory
        return "no_revision_available"  # mteb's own word for it
    h = hashlib.sha256()
    for name in sorted(storage.listdir(path)):
        full = os.path.join(path, name)
        if storage.isfile(full):
            h.update(f"{name}:{storage.size_and_version(full)[0]}\n".encode())
    cfg = os.path.join(path, "config.json")
    if storage.isfile(cfg):
        h.update(storage.read_text(cfg).encode())
    return "export-" + h.hexdigest()[:12]


def default_name(model) -> str:
    """mlembed_jax/<run directory name> (a checkpoints/<step> path names its run)."""
    if not model.source:
        return "mlembed_jax/model"
    path = os.path.normpath(storage.normalized(model.source))
    parts = path.split(os.sep)
    if len(parts) >= 2 and parts[-2] == "checkpoints":
        parts = parts[:-2]
    return "mlembed_jax/" + (parts[-1] if parts and parts[-1] else "model")


# --------------------------------------------------------------------------- prompts

# mteb task type -> the training manifest's task type (mlembed_jax.data.manifest.TASK_TYPES).
MANIFEST_TYPE = {
    "Retrieval": "retrieval", "Reranking": "retrieval", "InstructionRetrieval": "retrieval",
    "InstructionReranking": "retrieval", "Classification": "classification",
    "MultilabelClassification": "classification", "PairClassification": "classification",
    "Clustering": "clustering",
}


INSTRUCT = "instruct"  # --prompts=instruct: rule 4 for every task


def instruction_prompt(instruction: str) -> str:
    """The paper's query prompt around a task instruction (mteb's Qwen3-Embedding template,
    mteb/models/model_implementations/qwen3_models.py)."""
    return f"Instruct: {instruction}\nQuery:"


@dataclasses.dataclass
class TaskPrompts:
    """The prompt put before each text, per (task, prompt type); see the module docstring.

    custom: mteb-format keys -> prompt (a prompts file). by_type: manifest task type ->
    {"query": ..., "document": ...}, or an error string when the manifest's datasets of that
    type disagree. default: an export's {"query", "document"} prompts (None: none).
    """

    custom: dict = dataclasses.field(default_factory=dict)
    by_type: dict = dataclasses.field(default_factory=dict)
    default: dict | None = None
    used: dict = dataclasses.field(default_factory=dict)  # (task, type) -> (prompt, source)

    @classmethod
    def of(cls, model, prompts_file: str = "") -> "TaskPrompts":
        """From a loaded encode.Encoder (its training manifest, or an export's prompts) and an
        optional JSON prompts file; prompts_file="instruct": the task instructions (rule 4)
        for every task, whatever the manifest says."""
        if prompts_file == INSTRUCT:
            return cls()
        custom = read_prompts_file(prompts_file) if prompts_file else {}
        by_type: dict = {}
        if model.train_config is not None:
            from mlembed_jax.data.prepared import training_text

            groups: dict[str, dict] = {}
            for name, spec in training_text(model.train_config).manifest.items():
                pair = (spec.query_prefix or "", spec.document_prefix or "")
                groups.setdefault(spec.task_type, {}).setdefault(pair, []).append(name)
            for task_type, pairs in groups.items():
                if len(pairs) == 1:
                    q, d = next(iter(pairs))
                    by_type[task_type] = {"query": q, "document": d}
                else:
                    by_type[task_type] = (
                        f"the training manifest gives its {task_type} datasets different "
                        "prefixes (" + "; ".join(f"{', '.join(v)}: query {q!r}, document "
                                                 f"{d!r}" for (q, d), v in pairs.items())
                        + "); choose with --prompts=FILE (keys as mteb's, e.g. "
                        "\"Retrieval-query\"), or --prompts=instruct for the tasks' "
                        "instructions")
        default = model.prefixes.get("default") if model.prefixes else None
        return cls(custom=custom, by_type=by_type, default=default)

    def prompt(self, task_metadata, prompt_type) -> str:
        """The prompt for this task's texts of this prompt type (None: a symmetric task)."""
        from mteb.models.abs_encoder import get_prompt_name

        side = "document" if prompt_type is not None and prompt_type.value == "document" \
            else "query"
        key = get_prompt_name(self.custom, task_metadata, prompt_type) if self.custom else None
        if key is not None:
            text, source = self.custom[key], f"prompts file [{key!r}]"
        elif MANIFEST_TYPE.get(task_metadata.type) in self.by_type:
            entry = self.by_type[MANIFEST_TYPE[task_metadata.type]]
            if isinstance(entry, str):
                raise MTEBError(f"task {task_metadata.name}: {entry}")
            text = entry[side]
            source = f"training manifest ({MANIFEST_TYPE[task_metadata.type]} {side} prefix)"
        elif self.default is not None:
            text, source = self.default.get(side, ""), f"model's {side} prompt"
        elif side == "document":
            text, source = "", "none for documents (paper's evaluation)"
        else:
            text, source = instruction_prompt(task_instruction(task_metadata, prompt_type)), \
                "task instruction (paper's evaluation)"
        self.used[(task_metadata.name, prompt_type.value if prompt_type else None)] = (
            text, source)
        return text


def task_instruction(task_metadata, prompt_type) -> str:
    """mteb's instruction for a task: its metadata prompt (the query one for a dict), else
    mteb's per-task-class default."""
    p = task_metadata.prompt
    if isinstance(p, dict):
        p = p.get(prompt_type.value if prompt_type else "query") or next(iter(p.values()), "")
    if p:
        return p
    from mteb.abstasks.abstask import get_abstask_prompt

    return get_abstask_prompt(task_metadata.name) or ""


def read_prompts_file(path: str) -> dict:
    """A JSON object of mteb prompt keys -> prompt strings; MTEBError on a bad file or key."""
    import json

    if not storage.isfile(path):
        raise MTEBError(f"--prompts file {path!r} does not exist")
    try:
        data = json.loads(storage.read_text(path))
    except ValueError as e:
        raise MTEBError(f"--prompts {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise MTEBError(f"--prompts {path}: expected a JSON object of strings, e.g. "
                        "{\"Retrieval-query\": \"Instruct: ...\\nQuery:\"}")
    from mteb.models.abs_encoder import AbsEncoder

    with warnings.catch_warnings():  # mteb warns per bad key; one error line says it here
        warnings.simplefilter("ignore")
        valid, _ = AbsEncoder.validate_task_to_prompt_name(data, raise_for_invalid_keys=False)
    bad = sorted(set(data) - set(valid or {}))
    if bad:
        what = "is not an mteb prompt key" if len(bad) == 1 else "are not mteb prompt keys"
        raise MTEBError(f"--prompts {path}: {', '.join(map(repr, bad))} {what} (an mteb task "
                        "name or task type, optionally with -query/-document, or query/document; "
                        "local tasks are keyed by their type, e.g. Retrieval-query)")
    return data


# --------------------------------------------------------------------------- the encoder

class MTEBEncoder(_Base):
    """mteb's EncoderProtocol over an encode.Encoder at one point.

    model: encode.Encoder. point: a Point (None parts: the full model). prompts: TaskPrompts.
    name: mteb model name (default mlembed_jax/<run>); the point's label is appended.
    shared: an optional dict shared by the encoders of one rank in a grid: each text list is
    then encoded once for all `grid_exits` and every dim is a prefix of that (the report).
    encode() returns [n, dim] float32, L2-normalised, in input order.
    """

    def __init__(self, model, point: Point | None = None, prompts: TaskPrompts | None = None,
                 *, name: str | None = None, allow_untrained: bool = False,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = False,
                 shared: dict | None = None, grid_exits: tuple = ()):
        require_mteb()
        point = point or Point()
        self.model = model
        self.rank, self.exit, self.dim = model.check(point.rank, point.exit, point.dim,
                                                     allow_untrained)
        self.allow_untrained = allow_untrained
        self.prompts = prompts if prompts is not None else TaskPrompts.of(model)
        self.batch_tokens = batch_tokens
        self.progress = progress
        self.shared = shared
        self.grid_exits = tuple(grid_exits) or (self.exit,)
        self.label = point_label(self.rank, self.exit, self.dim)
        self.base_name = name or default_name(model)
        self.mteb_model_meta = self._meta()

    @classmethod
    def load(cls, path: str, point: str = "full", *, prompts_file: str = "",
             allow_untrained: bool = False, name: str | None = None, **load_kwargs
             ) -> "MTEBEncoder":
        """An MTEBEncoder for a training workdir, checkpoints/<step> or HF/exported directory
        at one point ("full", "r8:e2:d16", ...); load_kwargs go to encode.load."""
        from mlembed_jax import encode as encode_lib

        points = parse_points(point)
        if len(points) != 1:
            raise MTEBError(f"point {point!r}: an MTEBEncoder serves one point; make one per "
                            "point")
        model = encode_lib.load(path, **load_kwargs)
        return cls(model, points[0], TaskPrompts.of(model, prompts_file), name=name,
                   allow_untrained=allow_untrained)

    def _meta(self):
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        return ModelMeta(
            loader=None, name=f"{self.base_name}-{self.label}",
            revision=model_revision(self.model), release_date=None, languages=None,
            n_parameters=point_params(self.model, self.rank, self.exit), memory_usage_mb=None,
            max_tokens=self.model.max_seq_length, embed_dim=self.dim, license=None,
            open_weights=None, public_training_code=None, public_training_data=None,
            framework=["JAX"], similarity_fn_name=ScoringFunction.COSINE,
            use_instructions=True, training_datasets=None)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type=None, **kwargs: Any) -> np.ndarray:
        """inputs: mteb's DataLoader of {"text": [...]} batches -> [n, dim] float32."""
        texts = [t for batch in inputs for t in batch["text"]]
        prefix = self.prompts.prompt(task_metadata, prompt_type)
        if self.shared is None:
            return self.model.encode(texts, rank=self.rank, exit=self.exit, dim=self.dim,
                                     prefix=prefix, batch_tokens=self.batch_tokens,
                                     allow_untrained=self.allow_untrained,
                                     progress=self.progress, desc=task_metadata.name)
        key = (self.rank, prefix, hashlib.sha256("\0".join(texts).encode()).hexdigest(),
               len(texts))
        if key not in self.shared:
            ids = self.model.tokenize(texts, prefix)
            self.shared[key] = self.model.encode_exits(
                ids, self.grid_exits, rank=self.rank, batch_tokens=self.batch_tokens,
                allow_untrained=self.allow_untrained, progress=self.progress)
        return normalize(self.shared[key][self.exit], self.dim)
