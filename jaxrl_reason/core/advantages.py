"""Advantage estimators.

Convention (everywhere in core/): flat rows `N = B*G`, groups contiguous (rows `g*G .. g*G+G-1` share a
prompt), `group_size = G` a static Python int. Outcome estimators return `adv_N` (broadcast to tokens with
`adv_N[:, None] * mask_NxT`); token estimators return `[N, T]` arrays that are exactly 0 on padding.

Exactness trick: group / batch statistics are computed on values shifted by one member of the group (batch)
so that all-equal rewards give centred values that are exactly 0, hence advantages exactly 0, with no
float32 round-off from the mean.

Estimators register under a name in `ADVANTAGE_ESTIMATORS` (`@register_advantage`) with one signature,
  `(reward_N, mask_NxT, hp, **arrays) -> (adv_NxT, returns_NxT | None, metrics)`,
where `hp` is the frozen advantage hyper-parameters (`group_size`, `eps`, `gamma`, `lam`, ...) and `arrays` the
optional per-row inputs some estimators need (`logp_old_NxT`, `logp_ref_NxT`, `values_NxT`, `greedy_reward_N`).
The training stage calls `ADVANTAGE_ESTIMATORS[name](...)` whatever the estimator.
"""
import numbers
from typing import Callable

import jax
import jax.numpy as jnp

from .aggregate import masked_mean
from .registry import registrar

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}
SINGLETON_MODES = ("verl", "trl")


def _float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _groups(reward_N, group_size: int):
    """Checks the flat layout and returns the rewards as `[B, G]` float."""
    reward_N = _float(reward_N)
    if reward_N.ndim != 1:
        raise ValueError(f"reward_N must be 1-D [N], got shape {reward_N.shape}.")
    if not isinstance(group_size, numbers.Integral) or group_size < 1 or reward_N.shape[0] % group_size:
        raise ValueError(f"group_size must be a positive int dividing N={reward_N.shape[0]}, got {group_size!r}.")
    return reward_N.reshape(-1, group_size)


def _check_mask(mask_NxT, n: int):
    mask = jnp.asarray(mask_NxT, jnp.float32)
    if mask.ndim != 2 or mask.shape[0] != n:
        raise ValueError(f"mask_NxT must be [N={n}, T], got shape {mask.shape}.")
    return mask


def _group_centred(r_BxG):
    """`R_i - mean_g(R)` computed on values shifted by the first group member (exact 0 for ties)."""
    c_BxG = r_BxG - r_BxG[:, :1]
    return c_BxG - jnp.mean(c_BxG, axis=1, keepdims=True)


def grpo_advantages(reward_N, group_size: int, eps: float = 1e-6, norm_by_std: bool = True,
                    singleton: str = "verl", std_ddof: int = 1):
    """GRPO group-normalized outcome advantage `adv_N` (DeepSeekMath; verl `compute_grpo_outcome_advantage`).

    A_i = (R_i - mean_g) / (std_g + eps) with std_g = sqrt(Σ_g (R - mean_g)^2 / (G - std_ddof)): the unbiased
    (Bessel) std for `std_ddof=1` (verl, torch.std), the population std for `std_ddof=0` (TraceRL's reward
    normalisation, numpy's default). `norm_by_std=False` gives Dr.GRPO's A_i = R_i - mean_g. All-equal
    groups give exactly 0.

    Args:
      reward_N: outcome reward per response `[N]`.
      group_size: G (static); N must be a multiple of it.
      eps: added to the std (verl 1e-6, TRL 1e-4).
      norm_by_std: divide by the group std (verl `norm_adv_by_std_in_grpo`).
      singleton: behaviour when G == 1, where Bessel's std is undefined: "verl" = mean 0, std 1 (raw
        reward / (1 + eps) passes through); "trl" = advantage 0. [switch; the two sources differ] With
        `std_ddof=0` the population std of one reward is 0 and the formula itself gives 0, so the switch is unused.
      std_ddof: 1 (Bessel) or 0 (population std).
    """
    if singleton not in SINGLETON_MODES:
        raise ValueError(f"singleton must be one of {SINGLETON_MODES}, got {singleton!r}.")
    if std_ddof not in (0, 1):
        raise ValueError(f"std_ddof must be 0 (population std) or 1 (Bessel), got {std_ddof!r}.")
    r_BxG = _groups(reward_N, group_size)
    if group_size == 1 and (std_ddof == 1 or not norm_by_std):
        if singleton == "trl":
            return jnp.zeros_like(r_BxG[:, 0])
        return r_BxG[:, 0] / (1.0 + eps) if norm_by_std else r_BxG[:, 0]
    a_BxG = _group_centred(r_BxG)
    if norm_by_std:
        std_B = jnp.sqrt(jnp.sum(jnp.square(a_BxG), axis=1, keepdims=True) / (group_size - std_ddof))
        a_BxG = a_BxG / (std_B + eps)
    return a_BxG.reshape(-1)


def dr_grpo_advantages(reward_N, group_size: int, singleton: str = "verl"):
    """Dr.GRPO advantage `adv_N` = R_i - mean_g(R); `grpo_advantages` without the std."""
    return grpo_advantages(reward_N, group_size, norm_by_std=False, singleton=singleton)


def rloo_advantages(reward_N, group_size: int):
    """RLOO leave-one-out advantage `adv_N` (verl `compute_rloo_outcome_advantage`; Ahmadian et al. 2024).

    A_i = R_i - mean_{j≠i} R_j = G/(G-1) · (R_i - mean_g). A singleton group passes the raw reward (verl).
    """
    r_BxG = _groups(reward_N, group_size)
    if group_size == 1:
        return r_BxG[:, 0]
    return (_group_centred(r_BxG) * (group_size / (group_size - 1))).reshape(-1)


def masked_whiten(x_NxT, mask_NxT, shift_mean: bool = True, eps: float = 1e-8):
    """Batch-wide token whitening (verl `masked_whiten`).

    (x - mean_m(x)) * rsqrt(var_m(x) + eps), mean and unbiased (Bessel) variance over every valid token of the
    batch. `shift_mean=False` adds the mean back. Guard: with fewer than 2 valid tokens the result is
    all zeros (verl raises). Padding positions are 0 in the output.

    Returns:
      `[N, T]` (any shape matching the mask works).
    """
    x = _float(x_NxT)
    mask = jnp.asarray(mask_NxT, jnp.float32)
    if x.shape != mask.shape:
        raise ValueError(f"masked_whiten needs x and mask of the same shape, got {x.shape} and {mask.shape}.")
    valid = mask > 0
    count = jnp.sum(mask)
    ref = x.reshape(-1)[jnp.argmax(valid.reshape(-1))]  # first valid value: exact zeros for constant inputs
    xc = jnp.where(valid, x - ref, 0.0)
    mean = jnp.sum(xc * mask) / jnp.maximum(count, 1.0)
    var = jnp.sum(jnp.square(xc - mean) * mask) / jnp.maximum(count - 1.0, 1.0)
    white = (xc - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean + ref
    return jnp.where(valid & (count >= 2), white, 0.0)


def outcome_to_token_rewards(reward_N, mask_NxT):
    """Places each outcome reward at the response's last valid token, zeros elsewhere.

    `reward_{i,t} = R_i` at `t = last index with m=1`; an all-masked row gets no reward.
    Returns `[N, T]`.
    """
    reward_N = _float(reward_N)
    mask = _check_mask(mask_NxT, reward_N.shape[0])
    T = mask.shape[1]
    last_N = T - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)
    onehot_NxT = jax.nn.one_hot(last_N, T, dtype=reward_N.dtype) * jnp.any(mask > 0, axis=1, keepdims=True)
    return onehot_NxT * reward_N[:, None]


def reinforce_pp_advantages(token_reward_NxT, mask_NxT, gamma: float = 1.0):
    """REINFORCE++ advantage `[N, T]` (verl `reinforce_plus_plus`).

    Discounted return-to-go G_t = r_t + γ G_{t+1}, where the running return is reset after every masked position
    (so rewards never flow back across padding), then `masked_whiten` over all valid tokens of the batch.
    """
    r = _float(token_reward_NxT)
    mask = _check_mask(mask_NxT, r.shape[0])

    def step(running_N, xs):
        r_N, m_N = xs
        running_N = r_N + gamma * running_N
        return running_N * m_N, running_N

    _, ret_TxN = jax.lax.scan(step, jnp.zeros(r.shape[0], r.dtype), (r.T, mask.T), reverse=True)
    return masked_whiten(ret_TxN.T, mask)


def reinforce_pp_baseline_advantages(reward_N, mask_NxT, group_size: int):
    """REINFORCE++-baseline = DLER batch-normalized advantage `[N, T]` (DLER Eq. 3).

    a_i = R_i - mean_g(R) (baseline 0 for a singleton group), broadcast over the response tokens, then whitened
    over all valid tokens of the batch (token-weighted mean/std). An all-equal group has a_i = 0 exactly but gets
    -mean/std after whitening; an all-zero batch gives 0.
    """
    r_BxG = _groups(reward_N, group_size)
    mask = _check_mask(mask_NxT, r_BxG.size)
    a_N = r_BxG[:, 0] if group_size == 1 else _group_centred(r_BxG).reshape(-1)
    return masked_whiten(a_N[:, None] * mask, mask)


def gae_advantages(token_reward_NxT, values_NxT, mask_NxT, gamma: float = 1.0, lam: float = 1.0,
                   whiten: bool = True):
    """GAE with masked skipping (verl `compute_gae_advantage_return`).

    Backward over t (lax.scan, reverse):
      delta = r_t + γ·next_v − V_t;  cand = delta + γλ·last
      next_v = V_t·m_t + (1−m_t)·next_v;  last = cand·m_t + (1−m_t)·last;  adv_t = last
    Padding positions are skipped (values and advantages carried through them).
    returns = adv + V (before whitening); adv is then `masked_whiten`-ed over the batch (`whiten=True`, verl).

    Returns:
      (adv_NxT, returns_NxT), both 0 on padding.
    """
    r = _float(token_reward_NxT)
    v = _float(values_NxT)
    mask = _check_mask(mask_NxT, r.shape[0])
    if v.shape != r.shape:
        raise ValueError(f"values_NxT must match token_reward_NxT's shape {r.shape}, got {v.shape}.")

    def step(carry, xs):
        next_v, last = carry
        r_N, v_N, m_N = xs
        delta = r_N + gamma * next_v - v_N
        cand = delta + gamma * lam * last
        next_v = v_N * m_N + (1.0 - m_N) * next_v
        last = cand * m_N + (1.0 - m_N) * last
        return (next_v, last), last

    zeros = jnp.zeros(r.shape[0], r.dtype)
    _, adv_TxN = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, mask.T), reverse=True)
    adv = adv_TxN.T
    valid = mask > 0
    returns = jnp.where(valid, adv + v, 0.0)
    adv = masked_whiten(adv, mask) if whiten else jnp.where(valid, adv, 0.0)
    return adv, returns


def grpo_passk_advantages(reward_N, group_size: int, eps: float = 1e-6, norm_by_std: bool = True):
    """GRPO pass@k outcome advantage `adv_N` (arXiv 2503.19595; verl `compute_grpo_passk_outcome_advantage`).

    Only the best response of each group is credited: A = (r_max − r_second_max) / (std_g + eps) at the first
    argmax, 0 elsewhere (Bessel std; `norm_by_std=False` drops the division). Ties at the top give 0, so which
    tied response is "first" never matters. Needs G ≥ 2.
    """
    if group_size < 2:
        raise ValueError(f"GRPO pass@k needs at least 2 responses per group, got group_size={group_size}.")
    r_BxG = _groups(reward_N, group_size)
    best_B = jnp.argmax(r_BxG, axis=1)
    is_best_BxG = jnp.arange(group_size)[None, :] == best_B[:, None]
    r_max_B = jnp.max(r_BxG, axis=1)
    r_second_B = jnp.max(jnp.where(is_best_BxG, -jnp.inf, r_BxG), axis=1)
    a_B = r_max_B - r_second_B
    if norm_by_std:
        c_BxG = _group_centred(r_BxG)
        a_B = a_B / (jnp.sqrt(jnp.sum(jnp.square(c_BxG), axis=1) / (group_size - 1)) + eps)
    return jnp.where(is_best_BxG, a_B[:, None], 0.0).reshape(-1)


def gpg_advantages(reward_N, group_size: int, f_norm: float = 1.0):
    """GPG corrected group advantage `adv_N` (arXiv 2504.02546; verl `compute_gpg_outcome_advantage`).

    A_i = α·(R_i − mean_g R) / f_norm with α = N / max(#{i: R_i ≠ 0}, 1) over the whole batch (it rescales the
    gradient when few responses earn a reward). A singleton group uses mean 0 (verl).
    """
    r_BxG = _groups(reward_N, group_size)
    alpha = r_BxG.size / jnp.maximum(jnp.sum(r_BxG != 0), 1)
    centred_BxG = r_BxG if group_size == 1 else _group_centred(r_BxG)
    return (alpha * centred_BxG / f_norm).reshape(-1)


def opo_advantages(reward_N, mask_NxT, group_size: int):
    """OPO optimal-baseline outcome advantage `adv_N` (arXiv 2505.23585; verl `compute_opo_outcome_advantage`).

    b_g = Σ_i |o_i|·R_i / Σ_i |o_i| (the length-weighted group mean, the variance-optimal baseline for
    sequence-level rewards); A_i = R_i − b_g. A singleton group has b = 0 (verl); a group without any valid token
    has b = 0 instead of verl's 0/0.
    """
    r_BxG = _groups(reward_N, group_size)
    mask = _check_mask(mask_NxT, r_BxG.size)
    if group_size == 1:
        return r_BxG[:, 0]
    len_BxG = jnp.sum(mask, axis=1).reshape(r_BxG.shape)
    c_BxG = r_BxG - r_BxG[:, :1]
    b_B1 = jnp.sum(len_BxG * c_BxG, axis=1, keepdims=True) / jnp.maximum(jnp.sum(len_BxG, axis=1, keepdims=True), 1.0)
    return (c_BxG - b_B1).reshape(-1)


def remax_advantages(reward_N, greedy_reward_N, mask_NxT):
    """ReMax advantage `[N, T]` (arXiv 2310.10505; verl `compute_remax_outcome_advantage`).

    A_{i,t} = (R_i − R̂_i)·m_{i,t}, R̂_i the reward of the greedy response to the same prompt (the baseline);
    equal to verl's reverse-cumsum return minus the baseline for right-padded masks.
    """
    reward_N, greedy_N = _float(reward_N), _float(greedy_reward_N)
    mask = _check_mask(mask_NxT, reward_N.shape[0])
    if greedy_N.shape != reward_N.shape:
        raise ValueError(f"greedy_reward_N must match reward_N's shape {reward_N.shape}, got {greedy_N.shape}.")
    return (reward_N - greedy_N)[:, None] * mask


# ---------------------------------------------------------------- the registry: hp -> arguments, [N, T] out

# @register_advantage(name) on `(reward_N, mask_NxT, hp, **arrays) -> (adv_NxT, returns, metrics)`: its key is a
# valid `advantage.estimator`
register_advantage = registrar(ADVANTAGE_ESTIMATORS)


def _per_token(adv_N, mask_NxT):
    return adv_N[:, None] * mask_NxT, None, {}


@register_advantage("grpo")
def _grpo(reward_N, mask_NxT, hp, **arrays):
    # hyper-parameter sets without a `std_ddof` field get Bessel's std, the GRPO papers' choice
    adv_N = grpo_advantages(reward_N, hp.group_size, eps=hp.eps, std_ddof=getattr(hp, "std_ddof", 1))
    return _per_token(adv_N, mask_NxT)


@register_advantage("dr_grpo")
def _dr_grpo(reward_N, mask_NxT, hp, **arrays):
    return _per_token(dr_grpo_advantages(reward_N, hp.group_size), mask_NxT)


@register_advantage("rloo")
def _rloo(reward_N, mask_NxT, hp, **arrays):
    return _per_token(rloo_advantages(reward_N, hp.group_size), mask_NxT)


@register_advantage("reinforce_pp_baseline")
def _reinforce_pp_baseline(reward_N, mask_NxT, hp, **arrays):
    return reinforce_pp_baseline_advantages(reward_N, mask_NxT, hp.group_size), None, {}


def _token_rewards(reward_N, mask_NxT, hp, arrays):
    """Outcome reward at the last token, minus k1 KL to the reference when `hp.kl_in_reward_coef` > 0."""
    token_reward = outcome_to_token_rewards(reward_N, mask_NxT)
    if hp.kl_in_reward_coef > 0:  # against the behaviour policy
        k1_NxT = arrays["logp_old_NxT"] - arrays["logp_ref_NxT"]
        token_reward = token_reward - hp.kl_in_reward_coef * k1_NxT * mask_NxT
    return token_reward


@register_advantage("reinforce_pp")
def _reinforce_pp(reward_N, mask_NxT, hp, **arrays):
    return reinforce_pp_advantages(_token_rewards(reward_N, mask_NxT, hp, arrays), mask_NxT, hp.gamma), None, {}


@register_advantage("gae")
def _gae(reward_N, mask_NxT, hp, **arrays):
    token_reward = _token_rewards(reward_N, mask_NxT, hp, arrays)
    adv, returns = gae_advantages(token_reward, arrays["values_NxT"], mask_NxT, hp.gamma, hp.lam)
    return adv, returns, {}


@register_advantage("grpo_passk")
def _grpo_passk(reward_N, mask_NxT, hp, **arrays):
    return _per_token(grpo_passk_advantages(reward_N, hp.group_size, hp.eps), mask_NxT)


@register_advantage("gpg")
def _gpg(reward_N, mask_NxT, hp, **arrays):
    return _per_token(gpg_advantages(reward_N, hp.group_size), mask_NxT)


@register_advantage("opo")
def _opo(reward_N, mask_NxT, hp, **arrays):
    return _per_token(opo_advantages(reward_N, mask_NxT, hp.group_size), mask_NxT)


@register_advantage("remax")
def _remax(reward_N, mask_NxT, hp, **arrays):
    if arrays.get("greedy_reward_N") is None:
        raise ValueError("ReMax needs greedy_reward_N, the reward of a greedy response to each row's prompt.")
    return remax_advantages(reward_N, arrays["greedy_reward_N"], mask_NxT), None, {}
