"""A LoRA checkpoint's adapters as a `peft` adapter directory, beside the base's export.

    DIR/base/     the base model at the chosen (R, K, M) size: an ordinary export
    DIR/adapter/  adapter_config.json + adapter_model.safetensors (peft's names), plus the
                  tokenizer and sentence-transformers files, so that
                  SentenceTransformer("DIR/adapter") loads base + adapter, and
                  PeftModel.from_pretrained(AutoModel.from_pretrained("DIR/base"), "DIR/adapter")
                  does in transformers.

Our A [L, *in, r] and B [L, r, *out] become, per layer i < K, lora_A.weight [r, in] and
lora_B.weight [out, r] (torch's Linear layout, heads flattened as the HF weights are);
peft scales B by lora_alpha / r itself, so B is written unscaled.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mlembed_jax import storage
from mlembed_jax.model.lora import TARGETS
from mlembed_jax.model.safetensors_io import write_safetensors

ADAPTER_DIR, BASE_DIR = "adapter", "base"
# Files of the base's export the adapter directory does not take: weights and model card.
_BASE_ONLY = ("config.json", "README.md", "model.safetensors.index.json",
              "mel_factors.safetensors")


def adapter_tensors(adapters: dict, targets, layers: int, dtype) -> dict[str, np.ndarray]:
    """{peft key: array} for layers 0..layers-1 of `adapters` ({"layers": {module: {target:
    {"A": [L, *in, r], "B": [L, r, *out]}}}}), as a peft model over Qwen3Model saves them."""
    out = {}
    for i in range(layers):
        for target in targets:
            module = TARGETS[target][0]
            ad = adapters["layers"][module][target]
            r = ad["A"].shape[-1]
            key = f"base_model.model.layers.{i}.{module}.{target}"
            out[f"{key}.lora_A.weight"] = np.ascontiguousarray(
                np.asarray(ad["A"][i]).reshape(-1, r).T, dtype)
            out[f"{key}.lora_B.weight"] = np.ascontiguousarray(
                np.asarray(ad["B"][i]).reshape(r, -1).T, dtype)
    return out


def adapter_config(rank: int, alpha: float, targets, base_dir: str) -> dict:
    """adapter_config.json: peft's LoraConfig with our settings (dropout 0, no bias).
    base_dir is absolute: peft, transformers and sentence-transformers pass it to
    from_pretrained unchanged, which reads a relative path against the working directory
    (or as a Hub repo id), not against the adapter directory."""
    return {"peft_type": "LORA", "task_type": None, "r": int(rank), "lora_alpha": float(alpha),
            "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "layers_to_transform": None, "base_model_name_or_path": base_dir}


def _copy_tree(src: str, dst: str, skip=()) -> None:
    storage.makedirs(dst)
    for name in storage.listdir(src):
        if name in skip or name.startswith("model") and name.endswith(".safetensors"):
            continue
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if storage.isdir(s):
            _copy_tree(s, d)
        else:
            with storage.open(s, "rb") as f:
                storage.write_bytes_atomic(f.read(), d)


def write_adapter_dir(out_dir: str, reader, layers: int, dtype, base_dir: str) -> list[str]:
    """Writes DIR/adapter from a LoRA checkpoint's `reader` (checkpoint.reader.TrainedParams)
    beside the finished base export in DIR/base (`base_dir`: the path adapter_config.json
    names, where DIR/base will be once the export is complete). Returns the files written."""
    rank, alpha, targets = reader.lora
    src, dst = os.path.join(out_dir, BASE_DIR), os.path.join(out_dir, ADAPTER_DIR)
    _copy_tree(src, dst, skip=_BASE_ONLY)  # tokenizer and sentence-transformers files
    tensors = adapter_tensors(reader.read_adapters(), targets, layers, dtype)
    write_safetensors(os.path.join(dst, "adapter_model.safetensors"), tensors, {"format": "pt"})
    storage.write_text_atomic(json.dumps(adapter_config(rank, alpha, targets, base_dir),
                                         indent=2), os.path.join(dst, "adapter_config.json"))
    final = os.path.join(os.path.dirname(base_dir), ADAPTER_DIR)
    storage.write_text_atomic(
        f"# LoRA adapter (rank {rank}, alpha {alpha:g}) for ../{BASE_DIR}\n\n"
        "```python\nfrom sentence_transformers import SentenceTransformer\n"
        f"model = SentenceTransformer(\"{final}\")  # loads {base_dir} + this adapter\n```\n\n"
        "or with transformers: `PeftModel.from_pretrained(AutoModel.from_pretrained("
        f"\"{base_dir}\"), \"{final}\")`.\n", os.path.join(dst, "README.md"))
    return [f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/adapter_model.safetensors"]
