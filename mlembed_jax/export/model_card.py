"""The export's README.md: what was trained, at which 3D-ML size it was cut, how to use it."""

from __future__ import annotations

import json
import math

from mlembed_jax.metrics_log import read_metrics
from mlembed_jax.model import hf_names
from mlembed_jax.recipe import mel_rank_set, mrl_dims


def final_metrics(workdir: str, step: int) -> dict[str, tuple[int, dict]]:
    """The last logged train and validation metrics at or before `step`, from metrics.jsonl:
    {"train": (step, {name: value}), "val": (...)}; per-sample and per-exit entries (names
    ending in an index) are left out."""
    out = {}
    for rec in read_metrics(workdir):
        if rec.get("step", math.inf) > step:
            continue
        for kind in ("train", "val"):
            if f"{kind}/total" in rec:
                out[kind] = (rec["step"], {k: v for k, v in rec.items()
                                           if k.startswith(f"{kind}/")
                                           and not k.rsplit("/", 1)[-1].isdigit()})
    return out


def _num_params(enc, cut) -> int:
    cfg = enc.truncated(cut.layers)
    return sum(math.prod(hf_names.hf_shape(r, cfg)) * (cut.layers if r.per_layer else 1)
               for r in hf_names.RULES)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render(*, config, step, checkpoint, cut, enc, mode, dtype, manifest, prompts, metrics,
           exits, mrl_min_dim) -> str:
    """Markdown of the model card (with sentence-transformers front matter)."""
    d, M = enc.hidden_size, cut.dim
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, feature-extraction, qwen3, matryoshka, mlembed_jax]",
        "---",
        "",
        "# Qwen3 embedding model (mlembed_jax, ML-Embed 3D Matryoshka recipe)",
        "",
        f"Exported by `tools/export_hf.py` from checkpoint `{checkpoint}` (step {step}). A "
        "standard Qwen3 checkpoint: it loads with plain `transformers` and "
        "`sentence-transformers`, no custom code.",
        "",
        "## Size (3D-ML choices)",
        "",
        "| dimension | exported | trained |",
        "|---|---|---|",
    ]
    if enc.mel:
        lines.append(f"| MEL rank R (token embedding U[:, :R] @ V[:R]) | {cut.rank} | ranks "
                     f"{list(mel_rank_set(enc.mel_r_min, enc.mel_r_max))} (r_max "
                     f"{enc.mel_r_max}) |")
    else:
        lines.append("| MEL rank R | - (plain embedding table) | MEL off |")
    lines += [
        f"| layers K (MLL exit) | {cut.layers} | exits {list(exits)} of L={enc.num_layers} |",
        f"| output dim M (MRL) | {M} | dims {sorted(mrl_dims(d, mrl_min_dim))} of d={d} |",
        "",
        f"Mode `{mode}`, weights in {dtype}, {_num_params(enc, cut):,} parameters "
        f"(vocabulary {enc.vocab_size:,}, hidden {d}, {enc.num_heads} query / "
        f"{enc.num_kv_heads} KV heads, tied embeddings: {enc.tie_word_embeddings}).",
        "",
        "Every text ends with the EOS token (the tokenizer appends it, as in training) and its "
        "embedding is the final hidden state at that token (last-token pooling), "
        f"{'cut to its first ' + str(M) + ' dimensions and ' if M < d else ''}"
        "L2-normalised.",
        "",
        "## Usage: sentence-transformers",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("PATH/TO/THIS/DIR")',
        'emb = model.encode(["first text", "second text"], normalize_embeddings=True)'
        f"  # [2, {M}]",
        "scores = model.similarity(emb, emb)  # cosine",
        "```",
        "",
    ]
    if M < d:
        lines += [
            f"`truncate_dim` is {M}. sentence-transformers cuts after its Normalize module, so "
            "pass `normalize_embeddings=True` for unit-length vectors (cosine similarity is "
            f"the same either way). `truncate_dim=None` gives the full {d} dimensions.",
            "",
        ]
    if prompts:
        lines += ["Instruction prompts from training (`prompt_name=`):", "",
                  "| prompt name | text |", "|---|---|"]
        lines += [f"| `{n}` | `{t!r}` |" for n, t in prompts.items()]
        lines.append("")
    lines += [
        "Last-token pooling reads the last position the attention mask keeps, so batches "
        "padded on the right (the default) or on the left give the same embeddings.",
        "",
        "## Usage: transformers",
        "",
        "```python",
        "import torch",
        "import torch.nn.functional as F",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIR")',
        'model = AutoModel.from_pretrained("PATH/TO/THIS/DIR")',
        'batch = tok(["first text", "second text"], padding=True, truncation=True, '
        'return_tensors="pt")  # appends EOS',
        "hidden = model(**batch).last_hidden_state",
        'last = batch["attention_mask"].sum(1) - 1  # the EOS position (right padding)',
        f"emb = F.normalize(hidden[torch.arange(len(last)), last, :{M}], dim=-1)",
        "```",
        "",
    ]
    if mode == "factorized":
        lines += factorized_usage(enc.vocab_size, d, cut.rank, dtype)
    lines += _manifest_section(manifest) + _metrics_section(metrics)
    lines += [
        "## Training config",
        "",
        "```json",
        json.dumps(config.to_dict(), indent=1, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


FACTORIZED_SNIPPET = '''\
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer


class FactorizedEmbedding(torch.nn.Module):
    """Token ids -> U[ids] @ V: the MEL factors instead of the [vocab, d] table."""

    def __init__(self, u, v):
        super().__init__()
        self.u = torch.nn.Embedding.from_pretrained(u, freeze=True)
        self.v = torch.nn.Parameter(v, requires_grad=False)

    def forward(self, ids):
        return self.u(ids) @ self.v


path = "PATH/TO/THIS/DIR"
model = SentenceTransformer(path)
factors = load_file(f"{path}/mel_factors.safetensors")
backbone = model[0].auto_model
table = backbone.get_input_embeddings().weight
backbone.set_input_embeddings(FactorizedEmbedding(
    factors["embed_tokens.U"].to(table.dtype), factors["embed_tokens.V"].to(table.dtype)))
del table  # the folded table is freed once nothing refers to it
'''


def factorized_usage(vocab: int, d: int, rank: int, dtype: str) -> list[str]:
    nbytes = 2 if dtype == "bf16" else 4
    full, fact = vocab * d, vocab * rank + rank * d
    return [
        "## Factorized embedding (saves memory)",
        "",
        f"`model.safetensors` holds the folded table W = U[:, :{rank}] @ V[:{rank}] "
        f"([{vocab}, {d}], {full * nbytes / 2**20:.1f} MiB) so the model loads anywhere. "
        f"`{'mel_factors.safetensors'}` holds the factors U [{vocab}, {rank}] and "
        f"V [{rank}, {d}] ({fact * nbytes / 2**20:.1f} MiB). Swapping them in for the table "
        "computes the same embeddings (up to rounding) in less memory:",
        "",
        "```python",
        FACTORIZED_SNIPPET.rstrip("\n"),
        "```",
        "",
    ]


def _manifest_section(manifest: dict) -> list[str]:
    lines = ["## Training data manifest", ""]
    if not manifest:
        return lines + ["(not available where this export was made)", ""]
    lines += ["| dataset | task type | query prefix | document prefix | hard negatives |",
              "|---|---|---|---|---|"]
    lines += [f"| {n} | {s.task_type} | `{s.query_prefix!r}` | `{s.document_prefix!r}` | "
              f"{s.num_negatives} |" for n, s in manifest.items()]
    return lines + [""]


def _metrics_section(metrics: dict) -> list[str]:
    lines = ["## Final metrics", ""]
    if not metrics:
        return lines + ["(no metrics.jsonl found next to the checkpoint)", ""]
    for kind, title in (("train", "training (last logged interval)"),
                        ("val", "validation (held-out split)")):
        if kind in metrics:
            step, values = metrics[kind]
            lines += [f"{title}, step {step}:", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(values.items())]
            lines.append("")
    return lines
