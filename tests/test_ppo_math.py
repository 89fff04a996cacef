import math
from pathlib import Path

import pytest
import torch

from lppo import (KLController, clipped_policy_loss, clipped_value_loss, compute_gae, compute_rewards, kl_penalty,
                  masked_mean, masked_whiten)
from model import entropy_from_logits, first_eos_mask, logprobs_from_logits
from ranks import run_ranks


def masked_var(x, mask):
    """Unbiased variance of x over the positions where mask is 1, computed the plain way."""
    values = x[mask.bool()].double()
    return values.var(unbiased=True)


def ragged_batch(seed, B=6, T=9, dtype=torch.float64):
    """Random rewards and values with a prefix mask per row; lengths include 1 and T, padding holds garbage."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = 1, T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    rewards = torch.randn(B, T, generator=g, dtype=dtype)
    values = torch.randn(B, T, generator=g, dtype=dtype)
    return rewards, values, mask


def reference_gae(rewards, values, mask, gamma, lam):
    """GAE one row and one step at a time in plain Python floats, stopping at each row's end."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        a = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            a = delta + gamma * lam * a
            advantages[b, t] = a
    returns = (advantages + values) * mask
    return advantages, returns

# -----------------------------------------------------------------------------
# GAE


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_gae_matches_reference_loop_on_ragged_masks(seed, dtype, tol):
    rewards, values, mask = ragged_batch(seed, dtype=dtype)
    gamma, lam = [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0), (0.5, 0.7)][seed]
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    ref_advantages, ref_returns = reference_gae(rewards.double(), values.double(), mask, gamma, lam)
    torch.testing.assert_close(advantages.double(), ref_advantages, atol=tol, rtol=tol)
    torch.testing.assert_close(returns.double(), ref_returns, atol=tol, rtol=tol)
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


def test_gae_with_gamma_and_lambda_one_returns_reward_to_go():
    rewards, values, mask = ragged_batch(0)
    _, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked = rewards * mask
    reward_to_go = masked.flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(returns, reward_to_go)


def test_gae_hand_computed_two_tokens():
    # r = [0, 1], V = [0.5, 0.2], γ = 0.9, λ = 0.5, then padding
    # δ_1 = 1 + 0.9·0 − 0.2 = 0.8;  A_1 = 0.8
    # δ_0 = 0 + 0.9·0.2 − 0.5 = −0.32;  A_0 = −0.32 + 0.45·0.8 = 0.04
    rewards = torch.tensor([[0.0, 1.0, 7.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.04, 0.8, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor([[0.54, 1.0, 0.0]], dtype=torch.float64))

# -----------------------------------------------------------------------------
# whitening


def test_whitening_gives_mean_zero_var_one_over_valid_tokens_and_ignores_padding():
    rewards, _, mask = ragged_batch(1, B=8, T=12)
    x = 3.0 * rewards + 5.0
    whitened = masked_whiten(x, mask)
    assert abs(masked_mean(whitened, mask).item()) < 1e-6
    assert abs(masked_var(whitened, mask).item() - 1.0) < 1e-6
    assert (whitened[mask == 0] == 0).all()
    # padding contents must not change the statistics
    torch.testing.assert_close(masked_whiten(x.masked_fill(mask == 0, 1e6), mask), whitened)


def test_whitening_without_mean_shift_keeps_the_mean():
    rewards, _, mask = ragged_batch(2, B=8, T=12)
    x = 3.0 * rewards + 5.0
    whitened = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(masked_mean(whitened, mask), masked_mean(x, mask))
    assert abs(masked_var(whitened, mask).item() - 1.0) < 1e-6


def _whiten_on_rank(rank, world_size, shards, out_dir):
    x, mask = shards[rank]
    torch.save(masked_whiten(x, mask), Path(out_dir) / f"{rank}.pt")


def test_whitening_under_ddp_equals_whitening_of_the_concatenated_batch(tmp_path):
    rewards, _, mask = ragged_batch(3, B=5, T=7)
    x = 2.0 * rewards - 1.0
    shards = [(x[:2], mask[:2]), (x[2:], mask[2:])]  # unequal shards: the all-reduce must weight by token count
    run_ranks(_whiten_on_rank, 2, shards, str(tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat(ranks), masked_whiten(x, mask))
    # and it really differs from whitening each shard on its own
    assert not torch.allclose(ranks[0], masked_whiten(*shards[0]))

# -----------------------------------------------------------------------------
# KL and rewards


def test_kl_estimators_on_hand_computed_values():
    # π_RL = 0.5, π_SFT = 0.25 on the first token; swapped on the second
    logprobs = torch.log(torch.tensor([0.5, 0.25]))
    ref_logprobs = torch.log(torch.tensor([0.25, 0.5]))
    ln2 = math.log(2)
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([ln2, -ln2]))
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k2"), torch.tensor([0.5 * ln2**2, 0.5 * ln2**2]))
    # k3 = (r − 1) − log r with r = π_SFT/π_RL: r = 0.5 → −0.5 + ln 2; r = 2 → 1 − ln 2
    k3 = torch.tensor([ln2 - 0.5, 1 - ln2])
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k3"), k3)
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "low-var"), k3)
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "abs"), torch.tensor([ln2, ln2]))
    with pytest.raises(ValueError, match="estimator='k4'"):
        kl_penalty(logprobs, ref_logprobs, "k4")


def test_rewards_are_minus_beta_kl_plus_score_at_last_token_and_zero_after_eos():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-2.0, -9.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1, estimator="k1")
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-1.1, 0.0, 0.0, 0.0]]))


def test_rewards_refuse_a_row_without_valid_tokens():
    zeros = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        compute_rewards(torch.zeros(2), zeros, zeros, torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)


def test_adaptive_kl_controller_on_hand_computed_values():
    kl_ctl = KLController(0.2, target=6.0, horizon=10000)
    kl_ctl.update(current_kl=9.0, n_steps=256)   # error 0.5 clipped to 0.2: 0.2·(1 + 0.2·256/1e4) = 0.201024
    assert kl_ctl.value == pytest.approx(0.201024)
    kl_ctl.update(current_kl=5.4, n_steps=1000)  # error −0.1: 0.201024·(1 − 0.1·0.1) = 0.19901376
    assert kl_ctl.value == pytest.approx(0.19901376)
    kl_ctl.update(current_kl=0.0, n_steps=5000)  # error −1 clipped to −0.2: ×0.9
    assert kl_ctl.value == pytest.approx(0.19901376 * 0.9)
    fixed = KLController(0.05)  # no target: a constant η
    fixed.update(current_kl=100.0, n_steps=10000)
    assert fixed.value == 0.05

# -----------------------------------------------------------------------------
# losses


def test_clipped_policy_loss_and_gradient_on_hand_computed_cases():
    # ratios and advantages per token, ε = 0.2; the last token is padding
    #   ρ=1.5 A=+1: max(−1.5, −1.2) = −1.2  clipped, no gradient
    #   ρ=0.5 A=+2: max(−1.0, −1.6) = −1.0  unclipped, ∂/∂logp = −A·ρ = −1.0
    #   ρ=0.5 A=−1: max( 0.5,  0.8) =  0.8  clipped, no gradient
    #   ρ=1.5 A=−1: max( 1.5,  1.2) =  1.5  unclipped, ∂/∂logp = −A·ρ = 1.5
    # loss = (−1.2 − 1.0 + 0.8 + 1.5) / 4 = 0.025
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 3.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 2.0, -1.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    old_logprobs = torch.full_like(ratios, -2.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.025)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.25, 0.0, 0.375, 0.0]], dtype=torch.float64))
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio"].item() == pytest.approx(1.0)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * 2 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 4)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    advantages = torch.tensor([[1.0, -3.0, 0.5, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    loss, stats = clipped_policy_loss(logprobs, logprobs, advantages, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5)
    assert stats["clipfrac"].item() == 0 and stats["approx_kl"].item() == 0 and stats["ratio"].item() == 1


def test_clipped_value_loss_and_gradient_on_hand_computed_cases():
    # ε_v = 0.2; the last token is padding
    #   V_old=1 V=1.5 R=2: V_clip=1.2, max(0.25, 0.64) = 0.64  clipped, no gradient
    #   V_old=1 V=1.5 R=1: V_clip=1.2, max(0.25, 0.04) = 0.25  unclipped, ∂/∂V = 2(V−R) = 1.0
    #   V_old=0 V=0.1 R=1: inside the clip range, 0.81 either way, ∂/∂V = 2(V−R) = −1.8
    # loss = ½·(0.64 + 0.25 + 0.81)/3 = 0.28333…; gradient ½·(0, 1.0, −1.8)/3
    old_values = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[1.5, 1.5, 0.1, 4.0]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[2.0, 1.0, 1.0, -4.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = clipped_value_loss(values, old_values, returns, mask, clip_eps_v=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * 1.70 / 3)
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 1 / 6, -0.3, 0.0]], dtype=torch.float64))
    assert clipfrac.item() == pytest.approx(1 / 3)

# -----------------------------------------------------------------------------
# rollout bookkeeping


def test_first_eos_mask_keeps_the_first_eos_and_flags_rows_without_one():
    eos, pad = 2, 0
    tokens = torch.tensor([
        [5, eos, pad, pad],
        [5, 6, 7, 8],
        [eos, eos, 3, pad],
        [5, 6, 7, eos],
    ])
    mask, has_eos = first_eos_mask(tokens, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, False, True, True]


def test_logprobs_divide_logits_by_the_sampling_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    for temperature in (0.7, 1.0, 1.3):
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
        torch.testing.assert_close(logprobs_from_logits(logits, tokens, temperature), expected)


def test_entropy_matches_torch_categorical():
    logits = torch.randn(3, 4, 13, generator=torch.Generator().manual_seed(0))
    for temperature in (0.7, 1.0):
        expected = torch.distributions.Categorical(logits=logits / temperature).entropy()
        torch.testing.assert_close(entropy_from_logits(logits, temperature), expected)
