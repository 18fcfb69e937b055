"""Checkpoints of a training run, split along the read/write seam.

- `reader`: reading saved checkpoints on the host, no devices: resolving a path to a step,
  the finished and intact steps, the saved config, each param restored and verified
  (`TrainedParams`, `ToolParams`, `load_trained`, `load_params`), the model-shape check and
  `init_params_from`. The tools import this module only.
- `manager`: the training run's side: `Checkpointer` (async save, verified restore, setting
  damaged or never-confirmed checkpoints aside, the sound-checkpoint tracking and the Orbax
  preservation policy), `DataStateBox`, `CheckpointSaveError`.
- `resume`: `restore_or_init` (newest intact checkpoint, else train.init_from, else random)
  and which config changes a resume accepts.
- `verify`: the per-tensor fingerprints a save records and a restore checks;
  `CheckpointError`, `CheckpointDamaged`.
- `lora_base`: a LoRA checkpoint's base: its fingerprint, the same-base check, merging the
  adapters into it on the host.
- `orbax_logs`: keeps Orbax's and TensorStore's failure noise off the console (log filters,
  Orbax's log file off the checkpoint disk, the closed-event-loop unraisable hook).

This package imports none of them, so importing the reader installs no logging filter.

Modules:
  reader      reading saved checkpoints on the host (what the tools import)
  manager     the training run's Checkpointer: async save, verified restore, set-asides
  resume      restore_or_init and the resume-change policy
  verify      per-tensor fingerprints and their check
  lora_base   a LoRA base's fingerprint and check; host-side merge of the adapters
  orbax_logs  Orbax's and TensorStore's failure noise kept off the console
"""
