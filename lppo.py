"""
Layer-wise Clip-PPO (L-PPO, Eq. 10 of the paper): PPO-RLHF in which every rollout, logprob and value is computed with
the image features of one CLIP layer l (ICET-l) instead of the default layer.

The top of this file holds the algorithm's math as pure functions on (B, T) tensors of response tokens; `mask` is 1 on
valid response tokens (a prefix of each row, up to and including the first EOS) and 0 on padding.
"""

import json
import os
import random
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

from common import (DEVICE, DTYPE, InputError, atomic_torch_save, atomic_write_json, autocast, average_gradients,
                    check_writable_dir, compute_init, generator_for, load_resume_checkpoint, load_trained_state,
                    read_prompt_jsonl, run_stage, seed_for, shard_model, strict_compile, trained_state,
                    whole_trained_weights)
from model import (VLM, add_lora, batch_images, compile_rollouts, encode_batch, extend_per_token, first_eos_mask,
                   generate_responses, load_image, load_tokenizer, lora_disabled, merge_lora, open_images, prompt_room,
                   response_heads, save_lora, save_peft_adapter)

# -----------------------------------------------------------------------------
# masked statistics


def masked_mean(x, mask, dim=None):
    """Mean of x over the positions where mask is 1 (the clamp: an all-padding row gives 0, not NaN)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


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
    var = (total_sq / n.clamp(min=1) - mean ** 2) * n / (n - 1).clamp(min=1)  # unbiased, as torch.var
    whitened = (x64 - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        # reward whitening (OAI 2019) keeps the mean: a constant added to every per-token reward would pay for length
        whitened = whitened + mean
    return (whitened * m).to(x.dtype)

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
    rewards = rewards.scatter_add(1, (lengths - 1).unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    return rewards, kl


class KLController:
    """η: constant, or with a target KL adapted towards it, as in Ziegler et al. 2019."""

    def __init__(self, kl_coef, target=None, horizon=None):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        if self.target is not None:
            # proportional controller; the ±0.2 clip keeps one noisy batch from swinging η
            error = min(max(current_kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon

# -----------------------------------------------------------------------------
# advantages and losses (Eq. 7-9)


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimates A_t and returns R_t = A_t + V_t; zero past each row's end."""
    mask = mask.to(values.dtype)
    # the state after the last valid token is terminal, so its value must be 0, whatever the critic said
    values, rewards = values * mask, rewards * mask
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
# the pieces of one iteration that touch the model. A rollout is one dict of (B, ...) tensors: the prompt batch
# (input_ids, attention_mask and the image inputs: model.batch_images), each row's image layer
# (layers), the response (tokens, mask) and what PPO adds to it (old_logprobs, old_values, advantages, returns).


def response_forward(vlm, ro, temperature, with_values=True):
    """Logprobs, entropies and values (B, n) of the response tokens of rollout ro, at its image layers. It scores
    rollouts, the reference and training steps, so all three see identical numerics, temperature included."""
    # the state before y_t is the hidden state one position earlier: the last prompt position for y_1
    T0 = ro["input_ids"].shape[1]
    ids = torch.cat([ro["input_ids"], ro["tokens"]], 1)
    mask = torch.cat([ro["attention_mask"], ro["mask"]], 1)
    images = extend_per_token(vlm, batch_images(vlm, ro), ro["tokens"].shape[1])  # the response sees the image too
    # with compile=True the model runs this decoder compiled, on lengths padded to buckets (model.compile_scoring)
    hidden = vlm.hidden_states(ids, image_layer=ro["layers"], attention_mask=mask, **images)[:, T0 - 1:-1]
    return response_heads(vlm, hidden, ro["tokens"], temperature, with_values)


@torch.no_grad()
def score_rollout(vlm, ro, temperature, micro_batch_size, ctx=None):
    """Old logprobs and values (the policy) and reference logprobs (adapters off), micro-batched, float32."""
    old_logprobs, old_values, ref_logprobs = [], [], []
    for i in range(0, ro["tokens"].shape[0], micro_batch_size):
        mb = {k: v[i:i + micro_batch_size] for k, v in ro.items()}
        with ctx or nullcontext():
            lp, _, v = response_forward(vlm, mb, temperature)
            with lora_disabled(vlm):  # the reference policy π_SFT: the same weights, adapters switched off
                ref, _, _ = response_forward(vlm, mb, temperature, with_values=False)
        old_logprobs.append(lp.float()), old_values.append(v.float()), ref_logprobs.append(ref.float())
    return torch.cat(old_logprobs), torch.cat(old_values), torch.cat(ref_logprobs)


def ppo_update(vlm, optimizer, ro, *, ppo_epochs, minibatch_size, micro_batch_size, clip_eps, clip_eps_v, vf_coef,
               grad_clip, temperature, generator, ctx=None):
    """K epochs of clipped PPO over shuffled minibatches of rollout ro (Eq. 7-9); gradients averaged over the ranks.

    Returns {statistic: [one 0-dim tensor per micro-batch]}. A NaN/inf loss on any rank raises FloatingPointError on
    every rank, before an optimizer step is taken with it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    n = ro["tokens"].shape[0]
    stats, bad = {}, ""
    for epoch in range(ppo_epochs):
        perm = torch.randperm(n, generator=generator).to(ro["tokens"].device)
        for start in range(0, n, minibatch_size):
            for m0 in range(start, start + minibatch_size, micro_batch_size):
                mb = {k: v[perm[m0:m0 + micro_batch_size]] for k, v in ro.items()}
                with ctx or nullcontext():
                    logprobs, entropy, values = response_forward(vlm, mb, temperature)
                pg_loss, pg_stats = clipped_policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                                        clip_eps)
                vf_loss, vf_clipfrac = clipped_value_loss(values, mb["old_values"], mb["returns"], mb["mask"],
                                                          clip_eps_v)
                # Eq. 9: L = L_policy + c1 L_value, averaged over the minibatch
                loss = (pg_loss + vf_coef * vf_loss) * len(mb["tokens"]) / minibatch_size
                if not torch.isfinite(loss):  # the step below is refused on every rank
                    bad = bad or f"loss is {loss.item()} (policy {pg_loss.item()}, value {vf_loss.item()})"
                loss.backward()  # a non-finite loss too: under FSDP2 every rank joins every backward's collectives
                for k, v in {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(), "vf_clipfrac": vf_clipfrac,
                             "entropy": masked_mean(entropy, mb["mask"]), **pg_stats}.items():
                    stats.setdefault(k, []).append(v)
            n_bad = torch.tensor(float(bool(bad)), device=params[0].device)
            if world_size > 1:  # ranks with a non-finite loss: a NaN on one rank stops them all, none waits for it
                dist.all_reduce(n_bad)
            if n_bad.item():
                raise FloatingPointError(bad or f"a non-finite loss on {int(n_bad.item())} other rank(s)")
            average_gradients(params)  # the mean gradient: every rank takes the same step
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return stats


# -----------------------------------------------------------------------------
# default config: L-PPO on the smol world (a real SmolLM2-135M-Instruct made into a LLaVA, see data/smol/)
# I/O
init_from = "data/smol/smol-llava"          # llava checkpoint folder or hub id: the SFT policy and the reference
reward_model = "out/smol-rm"                # reward.py checkpoint folder (GPT-2 or Llama backbone)
# training prompts: JSONL files of {"image", "prompt"}, image paths relative to image_root ("" = each file's folder);
# rows are drawn uniformly from all files together, so a file listed twice is drawn twice as often
prompt_files = ["data/smol/harmful_train.jsonl"] * 7 + ["data/smol/benign_train.jsonl"] * 4  # 58.5% harmful
image_root = ""
eval_harmful = "data/smol/harmful_val.jsonl"    # validation: never trained on (the test sets: evaluate.py)
eval_benign = "data/smol/benign_val.jsonl"
eval_vqa = "data/smol/vqa/vqa_val.jsonl"    # validation VQA set (rows with "answers"): utility at each evaluation
out_dir = "out/lppo-smol"
resume = False
save_merged = False                         # also write a merged llava-hf checkpoint at the end
# L-PPO: the image-encoder layer whose features the policy sees (an int, or a list: one drawn per rollout)
image_layer = 1                             # the smol world's most vulnerable layer (its ICET sweep)
# rollout
batch_size = 16                             # rollouts per rank per iteration
max_new_tokens = 32
temperature = 0.7                           # rollouts are sampled, and scored, at this temperature
top_p = 1.0                                 # must be 1: PPO scores rollouts under the untruncated distribution
missing_eos_penalty = 1.0                   # subtracted from the score of a response that never ends
score_norm = True                           # train on (r - mean) / std of the starting policy's first rollouts
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
kl_target = 0.0                             # > 0: η adapts towards this KL per response (Ziegler et al. 2019)
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
eval_interval = 24                          # evaluate at the start, every this many iterations and at the end
eval_max_new_tokens = 32
eval_size = 0                               # prompts per eval set; 0 = all
checkpoint_interval = 4
# system
device = DEVICE                             # "cuda" when there is a GPU
dtype = DTYPE                               # "bfloat16" where supported, else "float32"
compile = False                             # compiled decode step and training forward (see model.py: torch.compile)
fsdp = False                                # shard the policy over the ranks with FSDP2 (docs/fsdp.md); else DDP
seed = 1337
config_keys = [k for k, v in globals().items() if not k.startswith("_") and not k.isupper()
               and isinstance(v, (int, float, bool, str, list, type(None)))]
# what the configurator checks before any work is done
CONFIG_TYPES = {"image_layer": (int, list)}
POSITIVE = ("batch_size", "minibatch_size", "micro_batch_size", "max_new_tokens", "temperature", "ppo_epochs",
            "learning_rate", "lora_r", "lora_alpha", "max_iters", "eval_interval", "eval_max_new_tokens",
            "checkpoint_interval", "clip_eps", "clip_eps_v", "kl_horizon")
CHOICES = {"top_p": (1.0,), "dtype": ("float32", "bfloat16"), "kl_estimator": ("k1", "k2", "k3", "low-var", "abs")}
# what --resume may change; any other setting changed would not continue the same run
RESUME_MAY_CHANGE = ("eval_harmful", "eval_benign", "eval_vqa", "out_dir", "resume", "save_merged", "max_kl",
                     "max_iters", "eval_interval", "eval_max_new_tokens", "eval_size", "checkpoint_interval", "device",
                     "compile")
# -----------------------------------------------------------------------------


def main():
    from evaluate import refuses, vqa_accuracy
    from reward import RewardModel
    ddp, rank, local_rank, world_size, dev = compute_init(device)
    config = {**{k: globals()[k] for k in config_keys}, "world_size": world_size}
    master = rank == 0
    print0 = print if master else lambda *args: None
    ctx = autocast(dev, dtype)  # weights stay in dtype; LoRA and the value head keep float32 masters
    torch.manual_seed(seed_for("init", seed))  # the same LoRA initialisation on every rank
    barrier = dist.barrier if ddp else (lambda: None)

    # -------------------------------------------------------------------------
    # the policy (also the reference, with its adapters off), the reward model and the prompts
    if master:  # a bad out_dir fails now; the smol world is built, once, when it is asked for
        check_writable_dir(out_dir)
        if "data/smol/smol-llava" in (init_from, reward_model) or reward_model == "out/smol-rm":
            from data.smol.world import build
            build()
    barrier()
    vlm = VLM.from_pretrained(init_from, device=dev, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    tok = load_tokenizer(vlm.source_path)
    rm = RewardModel.from_pretrained(reward_model, device=dev)
    image_layers = image_layer if isinstance(image_layer, list) else [image_layer]
    if not image_layers:
        raise InputError("image_layer=[]; expected a layer or a list of layers")
    for layer in image_layers:
        vlm.image_layer_index(layer)  # an out-of-range layer fails now
    default_layer = vlm.config.vision_feature_layer
    files = {path: read_prompt_jsonl(path, image_root) for path in dict.fromkeys(prompt_files)}  # each read once
    train_rows = [row for path in prompt_files for row in files[path]]  # a file listed twice, drawn twice as often
    if batch_size % minibatch_size or minibatch_size % micro_batch_size:
        raise InputError(f"batch_size={batch_size} must be a multiple of minibatch_size={minibatch_size}, itself a "
                         f"multiple of micro_batch_size={micro_batch_size}")
    eval_sets = {name: read_prompt_jsonl(path, image_root)[:eval_size or None]
                 for name, path in (("harmful", eval_harmful), ("benign", eval_benign), ("vqa", eval_vqa)) if path}
    for name, rows in eval_sets.items():
        if not rows:
            raise InputError(f"{globals()['eval_' + name]}: no prompts; expected at least one held-out prompt (or "
                             f"eval_{name}='')")
    all_rows = [r for rows in [*files.values(), *eval_sets.values()] for r in rows]  # checked and measured once
    no_image = [r["id"] for r in all_rows if r["image"] is None]
    if no_image:
        raise InputError(f"{no_image[0]}: no image; L-PPO needs an image for every prompt")
    open_images(all_rows)
    if len(train_rows) < batch_size * world_size:
        raise InputError(f"{', '.join(files)}: {len(train_rows)} prompts, expected at least "
                         f"batch_size x ranks = {batch_size * world_size}")
    max_prompt_len = prompt_room(tok, vlm.config, [r["prompt"] for r in all_rows],
                                 max(max_new_tokens, eval_max_new_tokens))
    vlm.add_value_head()
    add_lora(vlm, targets=lora_targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
    shard_model(vlm, fsdp, world_size, dev, compile=compile, save_merged=save_merged)
    vlm.eval()  # no dropout anywhere: rollout, reference and update must score tokens identically
    params = [p for p in vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, eps=1e-5,
                                  fused=dev.startswith("cuda"))
    kl_ctl = KLController(kl_coef, kl_target or None, kl_horizon)
    if compile:  # the decode step over a static KV cache, and the decoder of response_forward on bucketed lengths
        strict_compile()
        compile_rollouts(vlm, batch_size, max_prompt_len + max(max_new_tokens, eval_max_new_tokens))
    print0(f"policy: {init_from} | trainable {sum(p.numel() for p in params) / 1e6:.2f}M (LoRA r={lora_r} on "
           f"{lora_targets} + value head) | image layers {image_layers} | {world_size} rank(s) on {dev}, {dtype}")

    # -------------------------------------------------------------------------
    # checkpoints: adapters, value head, optimizer and KL coefficient, written atomically. Every random draw is named
    # by (seed, iteration, ...), so a resumed run draws what the uninterrupted one would have drawn.
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    iter_num, history, score_stats = 0, [], []
    if resume:
        ckpt = load_resume_checkpoint(ckpt_path, config, [k for k in config if k not in RESUME_MAY_CHANGE], dev)
        load_trained_state(vlm, optimizer, ckpt["trainable"], ckpt["optimizer"])
        kl_ctl.value, iter_num, history = ckpt["kl_coef"], ckpt["iter_num"], ckpt["history"]
        score_stats = ckpt["score_stats"]
        print0(f"resumed from {ckpt_path} at iteration {iter_num}")

    def evaluate_now():
        """Greedy, on the validation sets: refusal (evaluate.refuses) of the harmful prompts and VQA accuracy at the
        trained and the default layer (-2 and 11 are one), over-refusal of the benign prompts at the default layer."""
        result, by_index = {}, {vlm.image_layer_index(l): l for l in [*image_layers, default_layer]}
        for name, rows in eval_sets.items():
            for layer in [by_index[i] for i in sorted(by_index)] if name != "benign" else [default_layer]:
                answers = generate_responses(vlm, tok, rows, layer, eval_max_new_tokens, batch_size=batch_size,
                                             max_len=max_prompt_len, ctx=ctx)
                score = [vqa_accuracy(a, r["answers"]) if name == "vqa" else refuses(a) for a, r in
                         zip(answers, rows)]
                key = {"harmful": f"refusal@{layer}", "benign": "over_refusal", "vqa": f"vqa@{layer}"}[name]
                result[key] = sum(score) / len(rows)
        return result

    # -------------------------------------------------------------------------
    # the L-PPO loop
    eos_id, pad_id = tok.eos_token_id, vlm.config.pad_token_id
    bar = tqdm(total=max_iters, initial=iter_num, disable=not master, desc="L-PPO", dynamic_ncols=True)
    if iter_num == 0 and (master or fsdp):  # under FSDP2 every rank takes part in generation
        history.append({"iter": 0, **evaluate_now()})
        bar.write(json.dumps(history[-1]))
    while iter_num < max_iters:
        t0 = time.time()
        # 1. prompts, and the image layer l of each rollout (Eq. 10: the policy sees P(e_l) instead of P(e_L));
        #    one draw for all ranks, each rank taking its slice
        draw = random.Random(seed_for("prompts", seed, iter_num))
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        rows = [train_rows[i] for i in draw.sample(range(len(train_rows)), batch_size * world_size)][mine]
        layers = [vlm.image_layer_index(draw.choice(image_layers)) for _ in range(batch_size * world_size)][mine]
        ro = encode_batch(tok, vlm.config, [r["prompt"] for r in rows], [load_image(r["image"]) for r in rows],
                          device=dev, max_len=max_prompt_len)
        ro["layers"] = torch.tensor(layers, device=dev)
        # 2. rollout: the policy (adapters on) samples a response, seeing layer-l image features
        with torch.no_grad(), ctx:
            tokens, _ = vlm.generate(ro["input_ids"], ro["attention_mask"], image_layer=ro["layers"],
                                     max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos_id,
                                     generator=generator_for("rollout", seed, rank, iter_num, device=dev),
                                     **batch_images(vlm, ro))
        ro["mask"], has_eos = first_eos_mask(tokens, eos_id)
        ro["tokens"] = tokens.masked_fill(ro["mask"] == 0, pad_id)
        t1 = time.time()
        # 3. the reward model scores the (prompt, response) text, r(x, y); a response that never ends is penalised
        texts = tok.batch_decode(ro["tokens"], skip_special_tokens=True)
        scores = rm.score([r["prompt"] for r in rows], texts).to(dev) - missing_eos_penalty * (~has_eos).float()
        if score_norm and not score_stats:  # the first rollouts are the starting policy's: fix its mean and std
            first = torch.stack([scores.mean(), scores.pow(2).mean()]) / world_size
            if ddp:
                dist.all_reduce(first)
            score_stats = [first[0].item(), (first[1] - first[0] ** 2).clamp(min=1e-8).sqrt().item()]
        # the value head starts at 0: scores in units of the starting policy's spread, mean 0 (Ziegler et al. 2019)
        shaped = (scores - score_stats[0]) / score_stats[1] if score_norm else scores
        t2 = time.time()
        # 4. old logprobs and values (π_old, Eq. 5), reference logprobs (π_SFT: the adapters off), all at layer l
        ro["old_logprobs"], ro["old_values"], ref_logprobs = score_rollout(vlm, ro, temperature, micro_batch_size, ctx)
        # 5. per-token reward -η·KL_t, with r(x, y) added at the last response token (Eq. 6)
        rewards, kl = compute_rewards(shaped, ro["old_logprobs"], ref_logprobs, ro["mask"], kl_ctl.value, kl_estimator)
        if whiten_rewards:
            rewards = masked_whiten(rewards, ro["mask"], shift_mean=False)
        # 6. GAE advantages and returns; advantages whitened over the response tokens of all ranks
        advantages, ro["returns"] = compute_gae(rewards, ro["old_values"], ro["mask"], gamma, lam)
        ro["advantages"] = masked_whiten(advantages, ro["mask"])
        # 7. K epochs of clipped PPO over shuffled minibatches (Eq. 7-9), gradients averaged over ranks
        try:
            stats = ppo_update(vlm, optimizer, ro, ppo_epochs=ppo_epochs, minibatch_size=minibatch_size,
                               micro_batch_size=micro_batch_size, clip_eps=clip_eps, clip_eps_v=clip_eps_v,
                               vf_coef=vf_coef, grad_clip=grad_clip, temperature=temperature,
                               generator=generator_for("minibatches", seed, iter_num), ctx=ctx)
        except FloatingPointError as e:
            bar.close()
            raise InputError(f"iteration {iter_num + 1}: {e}; stopped, {ckpt_path} holds the last good state") from None
        t3 = time.time()
        # 8. statistics averaged over ranks in one all-reduce, the KL valve, the KL controller (which sees the mean
        #    summed KL per response), evaluation and checkpoint
        numbers = {"score": scores, "kl": kl.sum(1), "rlhf_reward": scores - kl_ctl.value * kl.sum(1),
                   "resp_len": ro["mask"].sum(1), "eos_frac": has_eos, **stats}
        values = torch.stack([torch.stack(v).mean() if isinstance(v, list) else v.float().mean()
                              for v in numbers.values()]) / world_size
        if ddp:
            dist.all_reduce(values)
        log = dict(zip(numbers, values.tolist()), kl_coef=kl_ctl.value, t_rollout=t1 - t0, t_score=t2 - t1,
                   t_update=t3 - t2, tok_per_s=int(ro["mask"].sum()) * world_size / (t1 - t0))
        if not log["kl"] <= max_kl:  # NaN fails this too
            bar.close()
            raise InputError(f"iteration {iter_num + 1}: KL {log['kl']:.2f} is beyond max_kl={max_kl}; stopped, "
                             f"{ckpt_path} holds the last good state (lower learning_rate or raise kl_coef)")
        kl_ctl.update(log["kl"], batch_size * world_size)
        iter_num += 1
        bar.update(1)
        bar.set_postfix(score=f"{log['score']:.3f}", kl=f"{log['kl']:.3f}", clip=f"{log['clipfrac']:.2f}")
        if (master or fsdp) and (iter_num % eval_interval == 0 or iter_num == max_iters):
            log.update(evaluate_now())
        history.append({"iter": iter_num, **{k: round(v, 5) for k, v in log.items()}})
        if master:
            bar.write(json.dumps(history[-1]))
        if iter_num % checkpoint_interval == 0 or iter_num == max_iters:
            trainable, optimizer_state = trained_state(vlm, optimizer)  # every rank: FSDP2 gathers to rank 0
            if master:
                atomic_torch_save({"trainable": trainable, "optimizer": optimizer_state, "kl_coef": kl_ctl.value,
                                   "iter_num": iter_num, "history": history, "config": config,
                                   "score_stats": score_stats}, ckpt_path)
        barrier()  # no rank runs ahead of the checkpoint
    bar.close()

    # -------------------------------------------------------------------------
    # the final policy: our adapter file, a PEFT adapter folder, optionally a merged llava-hf checkpoint
    trainable, _ = trained_state(vlm, optimizer)  # every rank: FSDP2 gathers them to rank 0
    if master:
        with whole_trained_weights(vlm, trainable):  # under FSDP2, the adapters whole instead of rank 0's shards
            save_lora(vlm, os.path.join(out_dir, "adapter.safetensors"))
            save_peft_adapter(vlm, os.path.join(out_dir, "peft"), base_model=init_from)
        atomic_write_json({"config": config, "history": history}, os.path.join(out_dir, "history.json"))
        if save_merged:
            merge_lora(vlm)
            vlm.value_head = None
            vlm.save_pretrained(os.path.join(out_dir, "merged"))
            tok.save_pretrained(os.path.join(out_dir, "merged"))
        print(f"saved {out_dir}/adapter.safetensors, {out_dir}/peft/" + (", merged/" if save_merged else ""))

if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    run_stage(main)
