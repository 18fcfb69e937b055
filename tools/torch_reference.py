"""The reference recipe in PyTorch + transformers, written here for the benchmark only.

As the released recipe does it: HF Qwen3Model with SDPA attention, every text of the batch in
one tensor padded to its longest member, gradient checkpointing, MEL materialised as
U[:, :r] @ V[:r] every step, MLL exits from output_hidden_states (final norm on intermediate
exits), MRL-weighted hard-negative + in-batch losses, torch AdamW. It consumes the very
samples our packed batches hold, so both sides do the same useful work.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from mlembed_jax.recipe import mel_rank_set, model_exits, mrl_weights


def unpack_samples(batch: dict) -> list[list[np.ndarray]]:
    """Host packed batch -> per valid sample [query, positive, negative...] token arrays."""
    P, T = batch["pool_index"].shape
    flat_tokens = batch["tokens"].reshape(P, -1)
    flat_pos = batch["positions"].reshape(P, -1)

    def text(p, t):
        end = int(batch["pool_index"][p, t])
        n = int(flat_pos[p, end]) + 1
        return flat_tokens[p, end - n + 1: end + 1]

    samples = []
    for p in range(P):
        for b in range(batch["query_text"].shape[1]):
            if not batch["sample_valid"][p, b]:
                continue
            negs = [text(p, int(t)) for t, ok in zip(batch["negative_text"][p, b],
                                                     batch["negative_valid"][p, b]) if ok]
            samples.append([text(p, int(batch["query_text"][p, b])),
                            text(p, int(batch["positive_text"][p, b]))] + negs)
    return samples


class ReferenceRecipe(torch.nn.Module):
    def __init__(self, model_cfg, device, dtype):
        super().__init__()
        m = model_cfg
        hf = transformers.Qwen3Config(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
            head_dim=m.head_dim, rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps,
            max_position_embeddings=4096, tie_word_embeddings=m.tie_word_embeddings)
        hf._attn_implementation = "sdpa"
        self.model = transformers.Qwen3Model(hf).to(device=device, dtype=dtype)
        self.model.gradient_checkpointing_enable()
        self.model.config.use_cache = False
        self.mel = bool(m.mel)
        if self.mel:
            w = self.model.embed_tokens.weight.detach().float()
            self.model.embed_tokens.weight.requires_grad_(False)
            u, s, vh = torch.linalg.svd(w.cpu(), full_matrices=False)
            r = m.mel_r_max
            self.U = torch.nn.Parameter((u[:, :r] * s[:r]).to(device, dtype))
            self.V = torch.nn.Parameter(vh[:r].to(device, dtype))
            self.ranks = mel_rank_set(m.mel_r_min, m.mel_r_max)
        self.exits = model_exits(m.exits, m.num_layers)
        self.num_layers = m.num_layers

    def forward(self, ids, mask, rank):
        lengths = mask.sum(1)
        if self.mel:  # the reference builds the whole [vocab, d] table every step
            table = self.U[:, :rank] @ self.V[:rank]
            embeds = F.embedding(ids, table)
        else:
            embeds = self.model.embed_tokens(ids)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        rows = torch.arange(ids.shape[0], device=ids.device)
        pooled = []
        for e in self.exits:
            h = out.hidden_states[e][rows, lengths - 1]
            pooled.append(h if e == self.num_layers else self.model.norm(h))
        return torch.stack(pooled)  # [exits, texts, d]


def reference_loss(pooled, n_samples, n_negs, d, temperature, mrl_min_dim):
    """The recipe's loss on [exits, texts, d] laid out as queries, positives, negatives."""
    q_all = pooled[:, :n_samples].float()
    p_all = pooled[:, n_samples:2 * n_samples].float()
    n_all = pooled[:, 2 * n_samples:].float().reshape(pooled.shape[0], n_samples, n_negs, -1)
    total = 0.0
    target = torch.zeros(n_samples, dtype=torch.long, device=pooled.device)
    for e in range(pooled.shape[0]):
        for m, w in mrl_weights(d, mrl_min_dim):
            q = F.normalize(q_all[e, :, :m], dim=-1)
            p = F.normalize(p_all[e, :, :m], dim=-1)
            n = F.normalize(n_all[e, :, :, :m], dim=-1)
            hard = torch.cat([(q * p).sum(-1, keepdim=True), torch.einsum("sd,snd->sn", q, n)],
                             dim=1) / temperature
            in_batch = q @ p.T / temperature
            total = total + w * (F.cross_entropy(hard, target)
                                 + F.cross_entropy(in_batch, torch.arange(n_samples,
                                                                          device=q.device)))
    return total / pooled.shape[0]


def free_device_memory() -> None:
    """Returns torch's cached GPU memory, so a JAX run in the same process can use it."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_reference(config, host_batches, warmup: int, device: str | None = None):
    """Times the reference on the samples of `host_batches`. Returns a dict of figures."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = ReferenceRecipe(config.model, device, dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.optim.lr, betas=(config.optim.b1, config.optim.b2),
                            weight_decay=config.optim.weight_decay)
    rng = np.random.default_rng(0)
    ranks = np.asarray(getattr(model, "ranks", (0,)))
    probs = ranks / ranks.sum() if model.mel else None
    times, useful, padded = [], [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i, (batch, _) in enumerate(host_batches):
        samples = unpack_samples(batch)
        n_negs = min(len(s) - 2 for s in samples)
        texts = ([s[0] for s in samples] + [s[1] for s in samples]
                 + [t for s in samples for t in s[2:2 + n_negs]])
        longest = max(len(t) for t in texts)
        ids = torch.zeros(len(texts), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, t in enumerate(texts):
            ids[j, :len(t)] = torch.from_numpy(t.astype(np.int64))
            mask[j, :len(t)] = 1
        ids, mask = ids.to(device), mask.to(device)
        rank = int(rng.choice(ranks, p=probs)) if model.mel else 0
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pooled = model(ids, mask, rank)
        loss = reference_loss(pooled, len(samples), n_negs, config.model.hidden_size,
                              config.loss.temperature, config.loss.mrl_min_dim)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if not math.isfinite(float(loss)):
            raise RuntimeError("reference step produced a non-finite loss")
        if i >= warmup:
            times.append(dt)
            useful.append(int(mask.sum()))
            padded.append(mask.numel())
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"step_times": times, "median_step": statistics.median(times),
            "tokens_per_s": sum(useful) / sum(times), "padding": 1 - sum(useful) / sum(padded),
            "peak_memory": peak, "device": torch.cuda.get_device_name() if device == "cuda"
            else "cpu", "torch": torch.__version__, "transformers": transformers.__version__}
