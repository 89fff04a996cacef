"""
Layer-wise Clip-PPO (L-PPO, Eq. 10 of the paper): PPO-RLHF in which every rollout, logprob and value is computed with
the image features of one CLIP layer l (ICET-l) instead of the default layer.

The top of this file holds the algorithm's math as pure functions on (B, T) tensors of response tokens; `mask` is 1 on
valid response tokens (a prefix of each row, up to and including the first EOS) and 0 on padding.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
    # H = logsumexp(z) - Σ softmax(z)·z
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)

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
