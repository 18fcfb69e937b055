"""The validation loss during training: the eval step's metrics over the whole held-out
split, every train.validation_every steps and at step 0 of a fresh run (the baseline the
loss falls from).

    evaluator = make_validation_evaluator(config, plan, mesh, pack_range)  # None when off
    evaluator.compile(step_fns, state.params, teacher_params)  # beside the train step
    writer.write(step, evaluator(state.params, step))          # {"val/total": ..., ...}

Built from the config and data plan before anything compiles; compiled with the train step,
one program per row bucket the held-out split uses.
"""

from __future__ import annotations

import jax
import numpy as np

from mlembed_jax import sharding
from mlembed_jax.data.pipeline import make_validation_iterator

# Only retrieval samples have an in-batch accuracy: these are weighted by them alone.
_RETRIEVAL_ONLY = ("acc_in_batch", "acc_in_batch_chance")


class ValidationEvaluator:
    """callable(params, step) -> {"val/<metric>": float, "val/loss_by_dataset/<name>": float,
    "val/samples": float}; params as the train state holds them."""

    name = "val"  # the metrics prefix
    at_start = True  # also at step 0 of a fresh run

    def __init__(self, config, plan, mesh, pack_range: tuple[int, int] | None):
        self.every = int(config.train.validation_every)
        self.batches = make_validation_iterator(config, plan.packs, pack_range=pack_range,
                                                plan=plan)
        self.plan, self.mesh, self.rules = plan, mesh, config.mesh.logical_axis_rules
        self._fns, self._teacher, self._base = None, None, ()

    def compile(self, step_fns, params, teacher_params, base_params=None) -> int:
        """Compiles the eval step for each row bucket the split uses; returns how many.
        base_params: with LoRA, the frozen base (`params` are then the adapters)."""
        rows = self.plan.shapes_used()["validation"]
        self._fns = step_fns.compile_eval(params, teacher_params, rows=rows,
                                          base_params=base_params)
        self._teacher = teacher_params
        self._base = () if base_params is None else (base_params,)
        return len(self._fns)

    def __call__(self, params, step: int) -> dict:
        """Means over the held-out split: sample-weighted, except the in-batch accuracy and
        its chance level (weighted by retrieval samples)."""
        del step  # the caller logs under its own step
        sums, weights = {}, {"samples": 0.0, "retrieval": 0.0}
        per_dataset: dict[str, list[float]] = {}
        for batch, stats in self.batches:
            gb = sharding.to_global_batch(batch, self.plan.geometry(stats["rows"]), self.mesh,
                                          self.rules)
            m = jax.device_get(self._fns[stats["rows"]](params, gb, self._teacher, *self._base))
            w = {"samples": float(m["num_samples"]), "retrieval": float(m["num_in_batch"])}
            if w["samples"] == 0:
                continue
            for k, v in m.items():
                if np.ndim(v) == 0 and not k.startswith("num_"):
                    kind = "retrieval" if k in _RETRIEVAL_ONLY else "samples"
                    sums[k] = sums.get(k, 0.0) + float(v) * w[kind]
            per_dataset.setdefault(stats["dataset"], []).append(float(m["total"]))
            for kind in weights:
                weights[kind] += w[kind]
        out = {}
        for k, v in sums.items():
            weight = weights["retrieval" if k in _RETRIEVAL_ONLY else "samples"]
            if weight > 0:
                out[f"val/{k}"] = v / weight
        for name, vals in per_dataset.items():
            out[f"val/loss_by_dataset/{name}"] = sum(vals) / len(vals)
        out["val/samples"] = weights["samples"]
        return out


def make_validation_evaluator(config, plan, mesh,
                              pack_range: tuple[int, int] | None = None
                              ) -> ValidationEvaluator | None:
    """The validation evaluator of a run (data.plan.DataPlan `plan`, this process's
    `pack_range` of each step's packs), or None when train.validation_every <= 0."""
    if int(config.train.validation_every) <= 0:
        return None
    return ValidationEvaluator(config, plan, mesh, pack_range)
