"""
Layer-wise Clip-PPO (L-PPO, Eq. 10 of the paper): PPO-RLHF in which every rollout, logprob and value is computed with
the image features of one CLIP layer l (ICET-l) instead of the default layer.

The top of this file holds the algorithm's math as pure functions on (B, T) tensors of response tokens; `mask` is 1 on
valid response tokens (a prefix of each row, up to and including the first EOS) and 0 on padding.
"""

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import lora_disabled

# -----------------------------------------------------------------------------
# masked statistics


def masked_mean(x, mask, dim=None):
    """Mean of x over the positions where mask is 1."""
    mask = mask.to(x.dtype)
    # clamp: an all-padding row gives 0 instead of NaN
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask, unbiased=True):
    """Variance of x over the positions where mask is 1 (unbiased by default, like torch.var; TF's is biased)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the valid tokens of the whole batch, across all DDP ranks; padding comes out 0."""
    # sum, sum of squares and count are all that's needed, and unlike a mean they add up across ranks;
    # float64 because the sum-of-squares form of the variance cancels badly in float32
    m = mask.to(torch.float64)
    x64 = x.to(torch.float64)
    stats = torch.stack([(x64 * m).sum(), (x64 * x64 * m).sum(), m.sum()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    total, total_sq, n = stats
    mean = total / n.clamp(min=1)
    var = (total_sq / n.clamp(min=1) - mean ** 2) * n / (n - 1).clamp(min=1)  # unbiased, as masked_var
    whitened = (x64 - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        # reward whitening (OAI 2019) keeps the mean: a constant added to every per-token reward would pay for length
        whitened = whitened + mean
    return (whitened * m).to(x.dtype)

# -----------------------------------------------------------------------------
# rollout bookkeeping


def first_eos_mask(tokens, eos_id):
    """(B, T) mask that is 1 up to and including each row's first EOS, and a (B,) bool: did the row have an EOS."""
    is_eos = (tokens == eos_id).long()
    # number of EOS strictly before t; the response is everything before the first EOS and that EOS itself
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos
    return (eos_before == 0).long(), is_eos.any(dim=1)


def logprobs_from_logits(logits, tokens, temperature=1.0):
    """log π(token_t) under softmax(logits / temperature); temperature 0 (greedy sampling) counts as 1."""
    # old, reference and new logprobs must all see the sampling temperature, or the ratio and KL are off at step 0
    if temperature > 0:
        logits = logits / temperature
    logits = logits.float()
    # gather minus logsumexp skips building a full (B, T, V) log_softmax tensor
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits, temperature=1.0):
    """Entropy of softmax(logits / temperature) per position; temperature 0 counts as 1."""
    if temperature > 0:
        logits = logits / temperature
    logits = logits.float()
    # H = -Σ p·log p, where a token with p = 0 (a -inf logit, e.g. the suppressed image token) adds 0, not NaN
    logp = F.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)

# -----------------------------------------------------------------------------
# KL-shaped reward (Eq. 6) and its coefficient η


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of KL(π_RL || π_SFT) from logprobs of the sampled tokens."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio  # unbiased, but negative on some tokens
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator in ("k3", "low-var"):
        # k3 = (r - 1) - log r with r = π_SFT/π_RL: unbiased, never negative, lower variance than k1
        return torch.expm1(-log_ratio) + log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    raise ValueError(f"kl_penalty: estimator={estimator!r}, expected one of 'k1', 'k2', 'k3', 'low-var', 'abs'")


def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1"):
    """Per-token rewards -η·KL_t with the reward-model score added at each row's last valid token; also the KL."""
    # Eq. 6: R = r(x, y) - η·KL(π_RL || π_SFT), spread over tokens so that GAE can assign credit
    mask = mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    lengths = mask.sum(dim=1).long()
    if (lengths == 0).any():
        raise ValueError(f"compute_rewards: rows {(lengths == 0).nonzero().flatten().tolist()} have no valid token")
    last = (lengths - 1).unsqueeze(1)
    rewards = rewards.scatter_add(1, last, scores.to(rewards.dtype).unsqueeze(1))
    return rewards, kl


class AdaptiveKLController:
    """η that follows a target KL, as in Ziegler et al. 2019."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl, n_steps):
        # proportional controller; the ±0.2 clip keeps one noisy batch from swinging η
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


class FixedKLController:
    """Constant η, with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, current_kl, n_steps):
        pass

# -----------------------------------------------------------------------------
# advantages and losses (Eq. 7-9)


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimates A_t and returns R_t = A_t + V_t; zero past each row's end."""
    mask = mask.to(values.dtype)
    # the state after the last valid token is terminal, so its value must be 0, whatever the critic said
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD error δ_t = r_t + γV_{t+1} − V_t
        next_advantage = delta + gamma * lam * next_advantage      # GAE recursion A_t = δ_t + γλA_{t+1}
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    returns = (advantages + values) * mask
    return advantages, returns


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    """The clipped surrogate loss and its diagnostics (clipfrac, approx_kl, mean ratio)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)  # Eq. 5: K = π_φ(y_t|s_t) / π_φold(y_t|s_t)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)  # Eq. 7: E[max(−K·Â, −clip(K, 1−ε, 1+ε)·Â)]
    with torch.no_grad():  # 0-dim tensors, so the caller decides when to sync or all-reduce them
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),  # the estimator TRL logs as policy/approxkl
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(values, old_values, returns, mask, clip_eps_v):
    """Value loss with the new values kept within ±clip_eps_v of the rollout's (PPO2 baselines), and the clipfrac."""
    # the L_value term of Eq. 9, (V(s_t) − R_t)², pessimistic over the clipped and unclipped value
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps_v, clip_eps_v)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), mask)
    return loss, clipfrac

# -----------------------------------------------------------------------------
# the pieces of one iteration that touch the model


def response_forward(vlm, batch, tokens, resp_mask, image_layer, temperature, with_values=True):
    """Logprobs, entropies and values (B, n) of response tokens given prompt + image features of `image_layer`.

    The state before emitting y_t is the hidden state at the position just before it: the last prompt
    position for y_1, and so on. The same function scores rollouts, the reference and training steps,
    so all three see identical numerics, temperature included.
    """
    T0 = batch["input_ids"].shape[1]
    ids = torch.cat([batch["input_ids"], tokens], 1)
    mask = torch.cat([batch["attention_mask"], resp_mask], 1)
    hidden = vlm.hidden_states(ids, batch["pixel_values"], image_layer, mask)[:, T0 - 1:-1]
    logits = vlm.response_logits(hidden)
    logprobs = logprobs_from_logits(logits, tokens, temperature)
    entropy = entropy_from_logits(logits.detach(), temperature)
    values = vlm.values(hidden) if with_values else None
    return logprobs, entropy, values


def select(batch, idx):
    """Rows `idx` of a dict of tensors (None entries stay None)."""
    return {k: (v[idx] if torch.is_tensor(v) else v) for k, v in batch.items()}


def all_reduce_mean(x, world_size):
    """Average a tensor over DDP ranks (a no-op on one process)."""
    if world_size > 1:
        dist.all_reduce(x)
        x = x / world_size
    return x


def check_image_layers(vlm, image_layer):
    """The list of layers to train on; an out-of-range layer is refused before any work is done."""
    layers = list(image_layer) if isinstance(image_layer, (list, tuple)) else [image_layer]
    if not layers:
        raise ValueError("image_layer is an empty list; expected a layer or a list of layers")
    for layer in layers:
        vlm.image_layer_index(layer)
    return layers


@torch.no_grad()
def score_rollout(vlm, batch, tokens, resp_mask, layers, temperature, micro_batch_size, ctx):
    """Old logprobs and values (policy) and reference logprobs (adapters off), micro-batched, float32."""
    old_logprobs, old_values, ref_logprobs = [], [], []
    for i in range(0, tokens.shape[0], micro_batch_size):
        mb = slice(i, i + micro_batch_size)
        args = (vlm, select(batch, mb), tokens[mb], resp_mask[mb], layers[mb], temperature)
        with ctx:
            lp, _, v = response_forward(*args)
            with lora_disabled(vlm):  # the reference policy: the same weights, adapters switched off
                ref, _, _ = response_forward(*args, with_values=False)
        old_logprobs.append(lp.float()), old_values.append(v.float()), ref_logprobs.append(ref.float())
    return torch.cat(old_logprobs), torch.cat(old_values), torch.cat(ref_logprobs)


def ppo_update(vlm, params, optimizer, batch, tokens, resp_mask, layers, old_logprobs, old_values, advantages,
               returns, *, ppo_epochs, minibatch_size, micro_batch_size, clip_eps, clip_eps_v, vf_coef, grad_clip,
               temperature, seed, world_size=1, ctx=None):
    """K epochs of clipped PPO over shuffled minibatches (Eq. 7-9); gradients averaged over DDP ranks.

    Returns the list of per-micro-batch statistics. Raises FloatingPointError on every rank when a loss is NaN/inf
    on any rank, before an optimizer step is taken with it.
    """
    stats = []
    n = tokens.shape[0]
    bad = ""  # why this rank's minibatch must not be stepped on, if it must not
    for epoch in range(ppo_epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, n, minibatch_size):
            for m0 in range(start, start + minibatch_size, micro_batch_size):
                mb = perm[m0:m0 + micro_batch_size]
                with ctx or nullcontext():
                    lp, ent, v = response_forward(vlm, select(batch, mb.to(tokens.device)), tokens[mb], resp_mask[mb],
                                                  layers[mb], temperature)
                m = resp_mask[mb]
                pg_loss, pg_stats = clipped_policy_loss(lp, old_logprobs[mb], advantages[mb], m, clip_eps)
                vf_loss, vf_clipfrac = clipped_value_loss(v, old_values[mb], returns[mb], m, clip_eps_v)
                loss = (pg_loss + vf_coef * vf_loss) * len(mb) / minibatch_size  # Eq. 9, averaged over the minibatch
                if not torch.isfinite(loss):
                    bad = bad or f"loss is {loss.item()} (policy {pg_loss.item()}, value {vf_loss.item()})"
                    continue  # not backpropagated; the step below is refused on every rank
                loss.backward()
                stats.append({"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(), "vf_clipfrac": vf_clipfrac,
                              "entropy": masked_mean(ent, m), **pg_stats})
            n_bad = float(bool(bad))
            if world_size > 1:
                # one flat all-reduce for all LoRA and value-head gradients, and the count of ranks with a non-finite
                # loss, so that a NaN on one rank stops them all instead of leaving the others waiting here
                flat = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                                  for p in params] + [torch.tensor([n_bad], device=params[0].device)])
                dist.all_reduce(flat)
                n_bad = flat[-1].item()
                flat /= world_size
                offset = 0
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                    offset += p.numel()
            if n_bad:
                raise FloatingPointError(bad or f"a non-finite loss on {int(n_bad)} other rank(s)")
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return stats


if __name__ == "__main__":
    import json
    import os
    import random
    import subprocess
    import sys
    import time

    import numpy as np
    from tqdm import tqdm

    from model import (InputError, VLM, add_lora, atomic_torch_save, atomic_write_json, check_writable_dir,
                       encode_batch, fit_prompt, load_image, load_tokenizer, merge_lora, save_lora, save_peft_adapter)

    # -----------------------------------------------------------------------------
    # default config: L-PPO on the smol world (a real SmolLM2-135M-Instruct made into a LLaVA, see data/smol/)
    # I/O
    init_from = "data/smol/smol-llava"          # llava checkpoint folder or hub id: the SFT policy and the reference
    reward_model = "out/smol-rm"                # reward.py checkpoint folder (GPT-2 or Llama backbone)
    # training prompts: JSONL files of {"image", "prompt"}, image paths relative to image_root ("" = each file's folder);
    # rows are drawn uniformly from all files together, so a file listed twice is drawn twice as often
    prompt_files = ["data/smol/harmful_train.jsonl", "data/smol/harmful_train.jsonl", "data/smol/benign_train.jsonl"]
    image_root = ""
    eval_harmful = "data/smol/harmful_test.jsonl"   # held out: never trained on
    eval_benign = "data/smol/benign_test.jsonl"
    out_dir = "out/lppo-smol"
    resume = False
    save_merged = False                         # also write a merged llava-hf checkpoint at the end
    # L-PPO: the image-encoder layer whose features the policy sees (an int, or a list: one drawn per rollout)
    image_layer = 2
    # rollout
    batch_size = 16                             # rollouts per rank per iteration
    max_new_tokens = 32
    temperature = 0.7
    top_p = 1.0                                 # must be 1: see below
    missing_eos_penalty = 1.0                   # subtracted from the score of a response that never ends
    # PPO
    ppo_epochs = 2
    minibatch_size = 8                          # rollouts per optimizer step
    micro_batch_size = 8                        # rollouts per forward/backward
    learning_rate = 5e-4
    weight_decay = 0.0
    grad_clip = 1.0
    gamma = 1.0
    lam = 0.95
    clip_eps = 0.2
    clip_eps_v = 0.2
    vf_coef = 0.1
    kl_coef = 0.1
    kl_estimator = "k1"
    adaptive_kl = False
    kl_target = 6.0
    kl_horizon = 10000
    whiten_rewards = False
    max_kl = 50.0                               # mean summed KL per response above which the run stops
    # LoRA on the language model
    lora_r = 8
    lora_alpha = 16
    lora_dropout = 0.0                          # dropout would make old and new logprobs disagree
    lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # schedule
    max_iters = 24
    eval_interval = 8
    eval_max_new_tokens = 32
    eval_size = 0                               # prompts per eval set; 0 = all
    checkpoint_interval = 4
    # system
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    compile = False
    seed = 1337
    # -----------------------------------------------------------------------------
    config_keys = [k for k, v in globals().items()
                   if not k.startswith("_") and not k.isupper() and isinstance(v, (int, float, bool, str, list))]
    # what the configurator checks before any work is done
    CONFIG_TYPES = {"image_layer": (int, list)}
    POSITIVE = ("batch_size", "minibatch_size", "micro_batch_size", "max_new_tokens", "ppo_epochs", "learning_rate",
                "lora_r", "lora_alpha", "max_iters", "eval_interval", "eval_max_new_tokens", "checkpoint_interval",
                "clip_eps", "clip_eps_v", "kl_target", "kl_horizon")
    CHOICES = {"dtype": ("float32", "bfloat16"), "kl_estimator": ("k1", "k2", "k3", "low-var", "abs")}
    # resuming with any of these changed would not continue the same run
    RESUME_MUST_MATCH = ("init_from", "reward_model", "prompt_files", "image_root", "image_layer", "batch_size",
                         "max_new_tokens", "temperature", "top_p", "missing_eos_penalty", "ppo_epochs",
                         "minibatch_size", "micro_batch_size", "learning_rate", "weight_decay", "grad_clip", "gamma",
                         "lam", "clip_eps", "clip_eps_v", "vf_coef", "kl_coef", "kl_estimator", "adaptive_kl",
                         "kl_target", "kl_horizon", "whiten_rewards", "lora_r", "lora_alpha", "lora_dropout",
                         "lora_targets", "dtype", "seed")
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    config = {k: globals()[k] for k in config_keys}
    # old, reference and new logprobs are all computed from the full softmax(logits / temperature)
    if temperature <= 0:
        sys.exit(f"error: temperature={temperature}; expected > 0: PPO scores each rollout at the temperature it "
                 "was sampled with, and greedy rollouts have no such distribution")
    if top_p != 1.0:
        sys.exit(f"error: top_p={top_p}; expected 1.0: PPO scores rollouts under the untruncated distribution, so "
                 "nucleus-sampled tokens would get the wrong old logprobs")

    # DDP: the same script runs under python and torchrun; each rank makes its own rollouts
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
    else:
        rank, world_size = 0, 1
    master = rank == 0
    print0 = print if master else (lambda *a, **k: None)

    def fail(msg):
        """Stop with one line; whatever checkpoint is on disk is the last good one."""
        if globals().get("bar") is not None:
            bar.close()  # else tqdm redraws the bar at exit, after our message
        print(f"error: {msg}", file=sys.stderr)
        if ddp:
            dist.destroy_process_group()
        sys.exit(1)

    # the same seed on every rank: the LoRA initialisation must be identical everywhere
    torch.manual_seed(seed)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # weights stay in their dtype; autocast runs matmuls in bf16 on CUDA, LoRA and value head keep float32 masters
    ctx = nullcontext() if device_type == "cpu" else torch.amp.autocast(device_type=device_type, dtype=ptdtype)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # -----------------------------------------------------------------------------
    # model, reward model, data
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        if init_from == "data/smol/smol-llava" and not os.path.isfile(os.path.join(init_from, "config.json")):
            if master:  # the smol world's safety stage (sft.py), run once: a few minutes on a CPU
                print("data/smol/smol-llava/ is missing: building it with python sft.py config/smol_sft.py")
                subprocess.run([sys.executable, "sft.py", "config/smol_sft.py"], cwd=here, check=True)
            if ddp:
                dist.barrier()
        from evaluate import is_refusal
        from model import read_prompt_jsonl
        from reward import RewardModel, ensure_smol_reward_model

        vlm = VLM.from_pretrained(init_from, device=device, dtype=ptdtype if device_type == "cuda" else torch.float32)
        tok = load_tokenizer(vlm.source_path)
        layers = check_image_layers(vlm, image_layer)
        default_layer = vlm.config.vision_feature_layer
        if reward_model == "out/smol-rm":
            if master:
                ensure_smol_reward_model(reward_model)
            if ddp:
                dist.barrier()
        rm = RewardModel.from_pretrained(reward_model, device=device)
        if isinstance(prompt_files, str):
            prompt_files = [prompt_files]
        train_rows = [row for path in prompt_files for row in read_prompt_jsonl(path, image_root)]
        eval_sets = {}
        for name, path in (("harmful", eval_harmful), ("benign", eval_benign)):
            if path:
                rows = read_prompt_jsonl(path, image_root)
                if not rows:
                    raise InputError(f"{path}: no prompts; expected at least one held-out prompt (or eval_{name}='')")
                eval_sets[name] = rows[:eval_size] if eval_size else rows
        # every image is opened now, not found broken an hour into the run
        all_rows = [r for rows in [train_rows, *eval_sets.values()] for r in rows]
        for r in all_rows:
            if r["image"] is None:
                raise InputError(f"{r['id']}: no image; L-PPO needs an image for every prompt")
        first_use = {}
        for r in all_rows:
            first_use.setdefault(r["image"], r["id"])
        for path, row_id in first_use.items():
            try:
                load_image(path)
            except InputError as e:
                raise InputError(f"prompt {row_id}: {e}") from None
        # a prompt that leaves no room for the response loses the start of its text, as in sft.py
        max_prompt_len = vlm.config.text.max_position_embeddings - max(max_new_tokens, eval_max_new_tokens)
        n_cut = sum(fit_prompt(tok, vlm.config, p, max_prompt_len)[1] > 0 for p in sorted({r["prompt"] for r in all_rows}))
        if n_cut:
            print0(f"note: {n_cut} prompts are longer than the {max_prompt_len} tokens the context leaves beside the "
                   "response; their text is cut from the left (image tokens are kept whole)")
        if master:
            check_writable_dir(out_dir)
    except (InputError, ValueError, FileNotFoundError) as e:
        fail(e)
    if len(train_rows) < batch_size:
        fail(f"{', '.join(prompt_files)}: {len(train_rows)} prompts, expected at least batch_size={batch_size}")
    if batch_size % minibatch_size or minibatch_size % micro_batch_size:
        fail(f"batch_size={batch_size} must be a multiple of minibatch_size={minibatch_size}, "
             f"itself a multiple of micro_batch_size={micro_batch_size}")
    eos_id = tok.eos_token_id
    pad_id = vlm.config.pad_token_id

    vlm.add_value_head()
    add_lora(vlm, targets=lora_targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
    vlm.eval()  # no dropout anywhere: rollout, reference and update must score tokens identically
    params = [p for p in vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, eps=1e-5,
                                  fused=device_type == "cuda")
    kl_ctl = (AdaptiveKLController(kl_coef, kl_target, kl_horizon) if adaptive_kl else FixedKLController(kl_coef))
    if compile:
        vlm.language_model.compile(dynamic=True)
    n_params = sum(p.numel() for p in params)
    print0(f"policy: {init_from} | trainable {n_params / 1e6:.2f}M (LoRA r={lora_r} on {lora_targets} + value head) "
           f"| image layers {layers} (default {default_layer}) | {world_size} rank(s) on {device}, {dtype}")

    # -----------------------------------------------------------------------------
    # checkpoints: adapter + value head + optimizer + controller + RNG states, written atomically
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    sample_gen = torch.Generator(device=device)
    sample_gen.manual_seed(seed + 100003 * rank)  # each rank samples its own responses
    iter_num = 0
    history = []
    if resume:
        if not os.path.isfile(ckpt_path):
            fail(f"{ckpt_path}: nothing to resume from")
        try:  # weights_only: a checkpoint is data, and unpickling arbitrary objects would run code from the file
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        except Exception as e:
            fail(f"{ckpt_path}: not a checkpoint written by lppo.py ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        for k in RESUME_MUST_MATCH:
            if ckpt["config"].get(k) != config[k]:
                fail(f"{ckpt_path}: {k} was {ckpt['config'].get(k)!r}, now {config[k]!r}; --resume needs the same "
                     "value (or a new out_dir)")
        if len(ckpt["rng"]) != world_size:
            fail(f"{ckpt_path}: written by {len(ckpt['rng'])} rank(s), now {world_size}; --resume needs the same "
                 "number of ranks")
        own = vlm.state_dict()
        with torch.no_grad():
            for k, v in ckpt["trainable"].items():
                own[k].copy_(v)
        optimizer.load_state_dict(ckpt["optimizer"])
        kl_ctl.value = ckpt["kl_coef"]
        iter_num, history = ckpt["iter_num"], ckpt["history"]
        sample_gen.set_state(ckpt["rng"][rank])
        print0(f"resumed from {ckpt_path} at iteration {iter_num}")

    def save_checkpoint():
        states = [sample_gen.get_state().cpu()]
        if ddp:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, states[0])
            states = gathered
        if not master:
            return
        trainable = {k: v.detach().cpu() for k, v in vlm.state_dict().items() if ".lora_" in k or k.startswith("value_head.")}
        try:
            atomic_torch_save({"trainable": trainable, "optimizer": optimizer.state_dict(), "kl_coef": kl_ctl.value,
                               "iter_num": iter_num, "history": history, "rng": states, "config": config}, ckpt_path)
        except InputError as e:  # disk full, folder gone read-only: the previous checkpoint is still there
            fail(e)

    # -----------------------------------------------------------------------------
    # evaluation: refusal rate at the trained layer(s) and the default layer, over-refusal on benign prompts

    @torch.no_grad()
    def respond(rows, layer, max_tokens, sample=False):
        out = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            batch = encode_batch(tok, vlm.config, [r["prompt"] for r in chunk], [load_image(r["image"]) for r in chunk],
                                 device=device, max_len=max_prompt_len)
            with ctx:
                toks, _ = vlm.generate(**batch, image_layer=layer, max_new_tokens=max_tokens,
                                       temperature=temperature if sample else 0.0, top_p=top_p, eos_token_id=eos_id,
                                       generator=sample_gen if sample else None)
            out += tok.batch_decode(toks, skip_special_tokens=True)
        return out

    def evaluate_now():
        result = {}
        by_index = {vlm.image_layer_index(l): l for l in [*layers, default_layer]}  # -2 and 11 are one layer
        for layer in (by_index[i] for i in sorted(by_index)):
            if "harmful" in eval_sets:
                resp = respond(eval_sets["harmful"], layer, eval_max_new_tokens)
                result[f"refusal@{layer}"] = float(np.mean([is_refusal(r) for r in resp]))
        if "benign" in eval_sets:
            resp = respond(eval_sets["benign"], default_layer, eval_max_new_tokens)
            result["over_refusal"] = float(np.mean([is_refusal(r) for r in resp]))
        return result

    # -----------------------------------------------------------------------------
    # the L-PPO loop
    rng = random.Random(seed)
    bar = tqdm(total=max_iters, initial=iter_num, disable=not master, desc="L-PPO", dynamic_ncols=True)
    if iter_num == 0 and master:
        history.append({"iter": 0, **evaluate_now()})
        bar.write(json.dumps(history[-1]))
    while iter_num < max_iters:
        t0 = time.time()
        # 1. prompts: one shared shuffle per pass over the data, each rank takes its own slice
        it_rng = random.Random(seed * 1_000_003 + iter_num)
        picks = it_rng.sample(range(len(train_rows)), batch_size * world_size)[rank * batch_size:(rank + 1) * batch_size]
        rows = [train_rows[i] for i in picks]
        # 2. the layer of each rollout (Eq. 10: the policy sees P(e_l) instead of P(e_L))
        roll_layers = [it_rng.choice(layers) if len(layers) > 1 else layers[0] for _ in range(world_size * batch_size)]
        roll_layers = torch.tensor([vlm.image_layer_index(l) for l in roll_layers[rank * batch_size:(rank + 1) * batch_size]])
        batch = encode_batch(tok, vlm.config, [r["prompt"] for r in rows], [load_image(r["image"]) for r in rows],
                             device=device, max_len=max_prompt_len)
        # 3. rollout with the policy (adapters on)
        with torch.no_grad(), ctx:
            tokens, _ = vlm.generate(**batch, image_layer=roll_layers, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, eos_token_id=eos_id, generator=sample_gen)
        resp_mask, has_eos = first_eos_mask(tokens, eos_id)
        tokens = tokens.masked_fill(resp_mask == 0, pad_id)
        t1 = time.time()
        # 4. score (prompt, response) text with the reward model; a response that never ends is penalised
        texts = tok.batch_decode(tokens, skip_special_tokens=True)
        scores = rm.score([r["prompt"] for r in rows], texts).to(device).float()
        scores = scores - missing_eos_penalty * (~has_eos).float()
        t2 = time.time()
        # 5. old logprobs and values (policy), reference logprobs (adapters off), same forward as training
        old_logprobs, old_values, ref_logprobs = score_rollout(vlm, batch, tokens, resp_mask, roll_layers, temperature,
                                                               micro_batch_size, ctx)
        # 6. per-token KL penalty, score at the last token (Eq. 6), then GAE and whitened advantages
        rewards, kl = compute_rewards(scores, old_logprobs, ref_logprobs, resp_mask, kl_ctl.value, kl_estimator)
        if whiten_rewards:
            rewards = masked_whiten(rewards, resp_mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, old_values, resp_mask, gamma, lam)
        advantages = masked_whiten(advantages, resp_mask)
        # 7. K epochs of clipped PPO over shuffled minibatches (Eq. 7-9), gradients averaged over ranks
        try:
            steps = ppo_update(vlm, params, optimizer, batch, tokens, resp_mask, roll_layers, old_logprobs, old_values,
                               advantages, returns, ppo_epochs=ppo_epochs, minibatch_size=minibatch_size,
                               micro_batch_size=micro_batch_size, clip_eps=clip_eps, clip_eps_v=clip_eps_v,
                               vf_coef=vf_coef, grad_clip=grad_clip, temperature=temperature,
                               seed=seed + 97 * iter_num, world_size=world_size, ctx=ctx)
        except FloatingPointError as e:
            fail(f"iteration {iter_num + 1}: {e}; stopped, {ckpt_path} holds the last good state")
        stats = {k: [s[k] for s in steps] for k in steps[0]}
        t3 = time.time()
        # 8. statistics, reduced over ranks; the KL controller sees the mean summed KL per response
        mean_kl = all_reduce_mean(kl.sum(1).mean(), world_size)
        log = {k: all_reduce_mean(torch.stack(v).mean(), world_size).item() for k, v in stats.items()}
        log.update(score=all_reduce_mean(scores.mean(), world_size).item(), kl=mean_kl.item(),
                   rlhf_reward=all_reduce_mean((scores - kl_ctl.value * kl.sum(1)).mean(), world_size).item(),
                   kl_coef=kl_ctl.value, resp_len=all_reduce_mean(resp_mask.sum(1).float().mean(), world_size).item(),
                   eos_frac=all_reduce_mean(has_eos.float().mean(), world_size).item())
        n_tokens = int(resp_mask.sum()) * world_size
        log.update(tok_per_s=n_tokens / (t1 - t0), t_rollout=t1 - t0, t_score=t2 - t1, t_update=t3 - t2)
        if not np.isfinite(log["kl"]) or log["kl"] > max_kl:
            fail(f"iteration {iter_num + 1}: KL {log['kl']:.2f} is beyond max_kl={max_kl}; stopped, {ckpt_path} holds "
                 "the last good state (lower learning_rate or raise kl_coef)")
        kl_ctl.update(log["kl"], batch_size * world_size)
        iter_num += 1
        bar.update(1)
        bar.set_postfix(score=f"{log['score']:.3f}", kl=f"{log['kl']:.3f}", clip=f"{log['clipfrac']:.2f}")
        if iter_num % eval_interval == 0 or iter_num == max_iters:
            log.update(evaluate_now() if master else {})
        history.append({"iter": iter_num, **{k: round(v, 5) for k, v in log.items()}})
        if master:
            bar.write(json.dumps(history[-1]))
            if iter_num == 1:
                bar.write(f"sample (layer {roll_layers[0].item()}): {rows[0]['prompt']!r} -> {texts[0]!r}")
        if iter_num % checkpoint_interval == 0 or iter_num == max_iters:
            save_checkpoint()
    bar.close()

    # -----------------------------------------------------------------------------
    # the final policy: our adapter file, a PEFT adapter folder, optionally a merged llava-hf checkpoint
    if master:
        try:
            save_lora(vlm, os.path.join(out_dir, "adapter.safetensors"))
            save_peft_adapter(vlm, os.path.join(out_dir, "peft"), base_model=init_from)
            atomic_write_json({"config": config, "history": history}, os.path.join(out_dir, "history.json"))
            if save_merged:
                merge_lora(vlm)
                vlm.value_head = None
                vlm.save_pretrained(os.path.join(out_dir, "merged"))
                tok.save_pretrained(os.path.join(out_dir, "merged"))
        except InputError as e:
            fail(e)
        print0(f"saved {out_dir}/adapter.safetensors, {out_dir}/peft/" + (", merged/" if save_merged else ""))
    if ddp:
        dist.destroy_process_group()
