"""Run configuration: one locked ml_collections ConfigDict per run, and its validation.

Config files under configs/ define `get_config()`; they start from `base_config()` and set
the model shape. Every field can be overridden on the command line as
`--config.section.field=value` (read by cli.py); an unknown field is a ConfigError.
"""

from __future__ import annotations

import ast
import importlib.util
import os

import ml_collections

from mlembed_jax.model.kernel_choice import AUTO, KERNELS, seq_len_problem
from mlembed_jax.recipe import MRL_MIN_DIM

# The mesh axes a step's packs are split over: data parallel and FSDP both shard the batch.
BATCH_MESH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes, or None = replicated). One table for the run;
# everything that shards a batch reads the "batch" entry (sharding.batch_axes).
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", BATCH_MESH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("rank", None),
    ("layers", None),
    ("norm", None),
    ("exits", None),
    ("texts", BATCH_MESH_AXES),
    ("activation_embed", None),
)


# What each layer keeps for the backward pass; the rest is recomputed (model/qwen3.py).
# none: everything; full: only its input; dots: matmul outputs; attn_out: the attention
# output; attention: the attention kernel's residuals (q, k, v, output, softmax stats), so
# the backward pass never reruns the kernel; dots_attention: both dots and attention, so
# only elementwise work is recomputed; auto: attention for the flash kernels, full for the
# others (kernel_choice.remat_for).
REMAT_POLICIES = ("none", "full", "dots", "attn_out", "attention", "dots_attention", AUTO)


LR_SCHEDULES = ("cosine", "cosine_to_min_lr", "constant_with_warmup")
KD_EXIT_PAIRINGS = ("position", "layer")  # train_step.teacher_exit_layers


# The projections model.lora.targets may name (model/lora.py TARGETS).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A configuration the run cannot use; the message names the field and the fix."""


# Old field name -> new: each says what it evaluates (the validation loss, retrieval). A
# config or override with an old name is an error naming the new one.
RENAMED = {"train.eval_every": "train.validation_every", "eval.every": "eval.retrieval_every"}


def _renamed(old: str) -> ConfigError:
    return ConfigError(f"{old} was renamed to {RENAMED[old]}: set that instead")


def base_config() -> ml_collections.ConfigDict:
    """Every field a run has, with the recipe's defaults. Model files override the shape."""
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 151936
    m.hidden_size = 1024
    m.intermediate_size = 3072
    m.num_layers = 28
    m.num_heads = 16
    m.num_kv_heads = 8
    m.head_dim = 128
    m.rope_theta = 1e6
    m.rms_norm_eps = 1e-6
    m.tie_word_embeddings = True
    m.eos_token_id = 151645
    m.mel = True  # factorized token embedding (MEL)
    m.mel_r_max = 512
    m.mel_r_min = 64
    m.exits = ()  # () = the recipe's exits <= num_layers, plus num_layers
    m.param_dtype = "float32"
    m.compute_dtype = "bfloat16"
    m.remat = "auto"  # one of REMAT_POLICIES; auto: "attention" for flash kernels, else "full"
    # dense: the portable reference; "auto": the platform's fastest kernel that passes its
    # start-up check (model/kernel_choice.py; the size configs use it); or a kernel by name.
    m.attention = "dense"
    # Layers per iteration of the compiled layer loop; num_layers unrolls it (no stacked
    # per-layer buffers to fill and slice: faster on CPU for small models, slower to compile).
    m.scan_unroll = 1
    # LoRA (model/lora.py): rank > 0 trains low-rank adapters on `targets`, the base weights
    # (MEL factors included) frozen and out of the optimizer state. 0 = full fine-tuning.
    m.lora = ml_collections.ConfigDict()
    m.lora.rank = 0
    m.lora.alpha = 8.0  # scale alpha / rank (peft's default alpha)
    m.lora.targets = LORA_TARGETS
    m.lora.dropout = 0.0  # only 0: adapter dropout is not implemented

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.num_devices = -1  # use the first N devices; -1 = all
    # Slices joined by the data-center network (DCN), e.g. two TPU v5p-64 slices: the mesh's
    # data axis is dcn_data x mesh.data, and mesh.data/fsdp/tensor describe ONE slice (-1
    # resolved against the chips per slice), so FSDP and tensor collectives stay inside a
    # slice and only gradients cross DCN. -1 = the slices the devices belong to (1 off TPU);
    # on devices without slices (CPU, GPU) N > 1 makes consecutive device chunks the slices.
    c.mesh.dcn_data = -1
    c.mesh.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES

    c.data = d = ml_collections.ConfigDict()
    d.manifest = ""  # JSON/YAML manifest: dataset -> task type, prefixes
    d.prepared_dir = ""  # output of tools/prepare_data.py
    d.max_seq_length = 1024  # truncation length, EOS included
    d.seq_len = 1024  # packed row length
    d.samples_per_pack = 8  # the recipe's per-device batch: every pack holds exactly this
    # Row buckets: each step runs at the smallest that holds its packs (data/plan.py).
    # () = derived from the data: the num_shapes sizes that pad least over the whole run.
    d.rows_per_pack = ()
    d.num_shapes = 3  # derived row buckets, i.e. compiled step shapes
    d.max_negatives = 9  # largest per-task count (clustering)
    d.packs_per_step = -1  # -1 = one pack per batch shard of the mesh
    d.packing = "ffd"  # ffd | pad_to_longest
    d.seed = 0
    d.validation_fraction = 0.01
    d.split_seed = 0  # held-out split seed; separate from data.seed so the split stays put
    # Held-out rows per dataset. reference: n - floor((1 - validation_fraction) * n), the
    # reference's train_test_split(train_size=0.99): one row when n < 100. floor:
    # max(ceil(validation_fraction * n), min_validation_samples), at most half the rows.
    d.holdout = "reference"
    d.min_validation_samples = 32  # the "floor" rule's floor for tiny datasets
    # Which dataset each step draws. static: the reference's weights, each dataset's batch
    # count at the epoch's start (small datasets come late in an epoch); batches_left:
    # weighted by the batches a dataset has left (spread evenly over the epoch).
    d.mixing = "static"
    # Hard-negative columns: per_step, one draw shared by all samples of a step (the
    # reference); per_sample, each sample its own draw.
    d.negatives_draw = "per_step"
    d.task_types = ()  # train only these task types, e.g. ("retrieval",); () = all
    d.prefetch = 2  # batches built ahead in a background thread (0 = none)

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-5
    o.min_lr = 1e-7
    # cosine: the reference's, cosine to 0 after warmup, clamped from below at min_lr;
    # cosine_to_min_lr: cosine down to min_lr itself; constant_with_warmup (optim.lr_schedule).
    o.schedule = "cosine"
    o.warmup_steps = 100
    o.b1 = 0.9
    o.b2 = 0.98
    o.weight_decay = 0.01
    o.grad_clip = 1.0
    o.mel_lr = -1.0  # learning rate of the MEL factors; -1 = same as lr

    c.loss = ls = ml_collections.ConfigDict()
    ls.temperature = 0.05
    ls.mrl_min_dim = MRL_MIN_DIM
    ls.kd_weight = 0.0  # > 0 exactly when loss.teacher is set (the reference uses 1)
    ls.teacher = ""  # HF directory of a frozen teacher; "" = no distillation
    # Which teacher exit each student exit learns from (train_step.teacher_exit_layers).
    # position: the reference's, i-th with i-th, both exit lists deepest first; layer: the
    # same layer number (last with last, a shallower teacher's last for exits it lacks).
    ls.kd_exit_pairing = "position"
    ls.in_batch_block_size = 0  # rows per block of the in-batch logits; 0 = no blocking
    # queries: the in-batch term's gradient reaches the queries only, the gathered positives
    # are constants in it (the reference at any GPU count: its gather is not tracked by
    # autograd); full: the loss's own gradient, reaching the positives too.
    ls.in_batch_gradient = "queries"

    c.train = t = ml_collections.ConfigDict()
    # HF Qwen3 directory, or a training workdir / checkpoint (its params, MEL factors as
    # they are, with a fresh optimizer and data order); "" = random init
    t.init_from = ""
    t.epochs = 2
    t.max_steps = -1  # -1 = epochs decide
    t.seed = 0
    t.log_every = 10
    t.validation_every = 100  # steps between validation losses on the held-out split; 0 = off
    t.checkpoint_every = 500
    t.keep_checkpoints = 3
    # Cached embedding gradients (mlembed_jax/grad_cache.py): 0 = off; k = the step's packs
    # go through the model in k sequential chunks, so activation memory is one chunk's
    # (data.packs_per_step / k / devices packs per device) at one extra forward pass;
    # -1 = as many chunks as packs per device (one pack per device at a time), off at one.
    t.grad_cache_chunks = 0
    # Steps whose loss or gradient norm is NaN/inf are skipped (params and optimizer state
    # unchanged). More than this many in a row stop the run (exit 1); -1 = never stop.
    t.max_nonfinite_steps = 5
    # Divergence: the run stops (exit 1, nothing saved) when the global parameter norm, read
    # at each log and checkpoint step, exceeds this factor times the median of the last
    # divergence_window readings, or is not finite. A healthy AdamW run moves the norm by
    # well under 1% a step; a diverging one (lr x weight_decay >= 1 flips and grows every
    # weight) jumps by orders of magnitude while the loss can stay finite. 0 = off.
    t.divergence_factor = 10.0
    t.divergence_window = 20
    # TEST/DEBUG ONLY: steps (1-based, as logged) whose loss is made NaN inside the jitted
    # step, to exercise the skip above. Leave empty in real runs.
    t.debug_nan_steps = ()

    # Retrieval evaluation during training (mlembed_jax/eval/periodic.py): nDCG@10,
    # Recall@100 and MRR@10 of one (rank, exit, dim) point on a local set.
    c.eval = ev = ml_collections.ConfigDict()
    ev.retrieval_every = 0  # steps between retrieval evaluations; 0 = off
    ev.beir_dir = ""  # BEIR layout (local or gs://): corpus.jsonl, queries.jsonl, qrels/<split>.tsv
    ev.split = "test"  # qrels/<split>.tsv
    ev.heldout = False  # also the held-out split of the retrieval datasets (data.*)
    ev.rank = -1  # MEL rank; -1 = r_max
    ev.exit = -1  # MLL exit; -1 = the last layer
    ev.dim = -1  # MRL dim; -1 = hidden_size
    ev.allow_untrained = False  # allow a rank/exit/dim outside the trained sets
    ev.max_queries = 0  # seeded sample of the judged queries; 0 = all
    ev.max_corpus = 0  # BEIR: judged docs + a seeded sample of the rest; 0 = all
    ev.seed = 0  # seed of those samples
    ev.query_prefix = ""  # instruction prefixes for the BEIR texts
    ev.document_prefix = ""
    ev.tokenizer_dir = ""  # "" = the tokenizer recorded in data.prepared_dir
    ev.batch_tokens = 16384  # tokens per packed encode batch
    return c


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the config and returns it; raises ConfigError naming every bad field."""
    for old in RENAMED:  # a config file that sets an old name
        section, leaf = old.split(".")
        if section in c and leaf in c[section]:
            raise _renamed(old)
    errs = []
    m = c.model
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "scan_unroll"):
        if not isinstance(m[f], int) or m[f] < 1:
            errs.append(f"model.{f}={m[f]!r} must be a positive integer")
    if not errs:
        if m.num_heads % m.num_kv_heads:
            errs.append(f"model.num_heads={m.num_heads} is not a multiple of "
                        f"model.num_kv_heads={m.num_kv_heads}")
        if m.head_dim % 2:
            errs.append(f"model.head_dim={m.head_dim} must be even for RoPE")
        for e in m.exits:
            if not isinstance(e, int) or not 1 <= e <= m.num_layers:
                errs.append(f"model.exits has {e!r}; exits must lie in [1, num_layers="
                            f"{m.num_layers}]")
        if m.mel:
            if not 1 <= m.mel_r_min <= m.mel_r_max:
                errs.append(f"model.mel_r_min={m.mel_r_min} must be in [1, mel_r_max="
                            f"{m.mel_r_max}]")
            if m.mel_r_max > min(m.vocab_size, m.hidden_size):
                errs.append(f"model.mel_r_max={m.mel_r_max} exceeds min(vocab_size, hidden_size)"
                            f"={min(m.vocab_size, m.hidden_size)}, the largest possible rank")
    for f in ("param_dtype", "compute_dtype"):
        if m[f] not in ("float32", "bfloat16"):
            errs.append(f"model.{f}={m[f]!r} must be 'float32' or 'bfloat16'")
    if m.remat not in REMAT_POLICIES:
        errs.append(f"model.remat={m.remat!r} must be one of {', '.join(REMAT_POLICIES)}")
    if m.attention not in KERNELS + (AUTO,):
        errs.append(f"model.attention={m.attention!r} must be one of "
                    f"{sorted(KERNELS + (AUTO,))}")
    elif m.attention.startswith("tokamax_") and importlib.util.find_spec("tokamax") is None:
        errs.append(f"model.attention={m.attention!r} needs the tokamax package: "
                    "`pip install tokamax`, or pick 'cudnn'")
    elif seq_len_problem(m.attention, c.data.seq_len):
        errs.append(f"model.attention={m.attention!r}: "
                    f"{seq_len_problem(m.attention, c.data.seq_len)}")
    for ax in ("data", "fsdp", "tensor"):
        if not isinstance(c.mesh[ax], int) or (c.mesh[ax] < 1 and c.mesh[ax] != -1):
            errs.append(f"mesh.{ax}={c.mesh[ax]!r} must be a positive integer or -1")
    dcn = c.mesh.get("dcn_data", -1)
    if not isinstance(dcn, int) or (dcn < 1 and dcn != -1):
        errs.append(f"mesh.dcn_data={dcn!r} must be a positive integer (slices) or -1")
    if sum(c.mesh[ax] == -1 for ax in ("data", "fsdp", "tensor")) > 1:
        errs.append("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    d = c.data
    if d.seq_len < 2 or d.max_seq_length < 2:
        errs.append("data.seq_len and data.max_seq_length must be at least 2")
    elif d.max_seq_length > d.seq_len:
        errs.append(f"data.max_seq_length={d.max_seq_length} exceeds data.seq_len={d.seq_len}: "
                    "a text could not fit in a packed row")
    if d.packing not in ("ffd", "pad_to_longest"):
        errs.append(f"data.packing={d.packing!r} must be 'ffd' or 'pad_to_longest'")
    rows = d.rows_per_pack
    rows = (rows,) if isinstance(rows, int) else rows
    if not isinstance(rows, (tuple, list)) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rows):
        errs.append(f"data.rows_per_pack={d.rows_per_pack!r} must be () (derived from the data)"
                    " or positive row counts, e.g. (18, 20, 24)")
    if not isinstance(d.num_shapes, int) or d.num_shapes < 1:
        errs.append(f"data.num_shapes={d.num_shapes!r} must be a positive integer")
    for key, allowed in (("holdout", ("reference", "floor")),
                         ("mixing", ("static", "batches_left")),
                         ("negatives_draw", ("per_step", "per_sample"))):
        if d[key] not in allowed:
            errs.append(f"data.{key}={d[key]!r} must be one of {', '.join(allowed)}")
    if not 0 <= d.validation_fraction < 1:
        errs.append(f"data.validation_fraction={d.validation_fraction!r} must be in [0, 1)")
    if not isinstance(d.samples_per_pack, int) or d.samples_per_pack < 1:
        errs.append(f"data.samples_per_pack={d.samples_per_pack!r} must be a positive integer")
    bad_types = [t for t in d.task_types if t not in ("retrieval", "clustering",
                                                       "classification")]
    if bad_types:
        errs.append(f"data.task_types has {bad_types}; use retrieval, clustering, "
                    "classification")
    if c.optim.schedule not in LR_SCHEDULES:
        errs.append(f"optim.schedule={c.optim.schedule!r} must be one of "
                    f"{', '.join(LR_SCHEDULES)}")
    if not isinstance(c.train.grad_cache_chunks, int) or c.train.grad_cache_chunks < -1:
        errs.append(f"train.grad_cache_chunks={c.train.grad_cache_chunks!r} must be 0 (off), "
                    "a positive number of chunks, or -1 (one pack per device at a time)")
    if not c.loss.temperature > 0:
        errs.append(f"loss.temperature={c.loss.temperature} must be > 0")
    t = c.train
    if not isinstance(t.max_nonfinite_steps, int) or t.max_nonfinite_steps < -1:
        errs.append(f"train.max_nonfinite_steps={t.max_nonfinite_steps!r} must be an integer "
                    ">= 0, or -1 (never stop)")
    if not isinstance(t.max_steps, int) or t.max_steps == 0 or t.max_steps < -1:
        errs.append(f"train.max_steps={t.max_steps!r} must be >= 1, or -1 (train.epochs "
                    "decide)")
    if not t.divergence_factor == 0 and not t.divergence_factor > 1:
        errs.append(f"train.divergence_factor={t.divergence_factor!r} must be > 1, or 0 (off)")
    if not isinstance(t.divergence_window, int) or t.divergence_window < 1:
        errs.append(f"train.divergence_window={t.divergence_window!r} must be >= 1")
    if not all(isinstance(s, int) and s >= 1 for s in t.debug_nan_steps):
        errs.append(f"train.debug_nan_steps={t.debug_nan_steps!r} must list steps >= 1")
    if c.loss.mrl_min_dim > m.hidden_size:
        errs.append(f"loss.mrl_min_dim={c.loss.mrl_min_dim} exceeds model.hidden_size")
    if c.loss.teacher and not c.loss.kd_weight > 0:
        errs.append(f"loss.teacher={c.loss.teacher!r} is set but loss.kd_weight="
                    f"{c.loss.kd_weight}: set loss.kd_weight > 0 (the reference uses 1), or "
                    "drop the teacher")
    if not c.loss.teacher and c.loss.kd_weight != 0:
        errs.append(f"loss.kd_weight={c.loss.kd_weight} needs a teacher: set loss.teacher to "
                    "an HF model directory, or loss.kd_weight=0")
    if c.loss.kd_exit_pairing not in KD_EXIT_PAIRINGS:
        errs.append(f"loss.kd_exit_pairing={c.loss.kd_exit_pairing!r} must be 'position' or "
                    "'layer'")
    if c.loss.in_batch_gradient not in ("full", "queries"):
        errs.append(f"loss.in_batch_gradient={c.loss.in_batch_gradient!r} must be 'full' or "
                    "'queries'")
    errs += _lora_problems(c)
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
    return c


def _lora_problems(c) -> list[str]:
    """model.lora's problems, one line each."""
    lora = c.model.get("lora")
    if lora is None:
        return []
    errs = []
    if not isinstance(lora.rank, int) or isinstance(lora.rank, bool) or lora.rank < 0:
        return [f"model.lora.rank={lora.rank!r} must be an integer >= 0 (0 = LoRA off)"]
    if lora.rank == 0:
        return []
    if not lora.alpha > 0:
        errs.append(f"model.lora.alpha={lora.alpha!r} must be > 0 (the scale is alpha / rank)")
    targets = tuple(lora.targets) if isinstance(lora.targets, (tuple, list)) else ()
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
        errs.append(f"model.lora.targets={lora.targets!r} must list distinct projections "
                    f"among {', '.join(LORA_TARGETS)}")
    if lora.dropout != 0:
        errs.append(f"model.lora.dropout={lora.dropout!r}: adapter dropout is not "
                    "implemented; set model.lora.dropout=0")
    if c.optim.mel_lr >= 0 and c.optim.mel_lr != c.optim.lr:
        errs.append(f"optim.mel_lr={c.optim.mel_lr} has no effect with LoRA (the MEL factors "
                    "are frozen with the base); set optim.mel_lr=-1")
    return errs


def config_json(c: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON types (tuples become lists): what config.json and a
    checkpoint's config item hold."""
    def safe(x):
        if isinstance(x, dict):
            return {k: safe(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [safe(v) for v in x]
        return x
    return safe(c.to_dict())


def load_config_file(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file, applies {"a.b": value} overrides, validates."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_mlembed_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in the user's file: name the file
        raise ConfigError(f"config file {path!r} failed to load: {type(e).__name__}: {e}") \
            from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config()")
    c = module.get_config()
    return validate(apply_overrides(c, overrides or {}))


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets {"a.b": value} fields in place (unlocking if needed) and returns `c`. A string
    value for a non-string field is parsed as that field's type ("true", "3", "1e-4")."""
    for key, value in overrides.items():
        if key in RENAMED:
            raise _renamed(key)
        node = c
        *parents, leaf = key.split(".")
        try:
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise KeyError(leaf)
        except (KeyError, AttributeError):
            raise ConfigError(f"unknown config field {key!r}") from None
        old = node[leaf]
        if isinstance(value, str) and not isinstance(old, str) and old is not None:
            value = _parse_as(key, value, old)
        elif isinstance(old, tuple) and isinstance(value, (int, list)):
            value = tuple(value) if isinstance(value, list) else (value,)
        with c.unlocked():
            node[leaf] = value
    return c


def _parse_as(key: str, text: str, like):
    """`text` read as the type of the field's current value `like` (bool, int, float, or a
    tuple or list: "19", "19,24" or "(19, 24)")."""
    bad = ConfigError(f"config field {key!r} holds {type(like).__name__}; cannot set it to "
                      f"{text!r}")
    try:
        if isinstance(like, (tuple, list)):
            value = ast.literal_eval(text) if text.strip() else ()
            value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            return type(like)(value)
        if isinstance(like, bool):  # before int: bool is an int subclass
            if text.lower() in ("true", "1", "false", "0"):
                return text.lower() in ("true", "1")
        elif isinstance(like, float):
            return float(text)
        elif isinstance(like, int):
            return int(text)
    except (ValueError, SyntaxError):
        raise bad from None
    raise bad
