"""Masked-diffusion LM losses and the d1 one-step log-prob inputs.

Pure functions on arrays: the forward process (which tokens are masked), the masked cross-entropy losses
given per-token log-probs of the clean tokens, and the masked input of the d1 one-step estimator. The model
forward (and the two-stream attention of block models) lives in `models/`.

Loss modes (`masked_diffusion_loss`, `w_i = -logp_i / p_i` on masked tokens, 0 elsewhere):
  sft         mean_n Σ_i w_i / max(ans_len_n, 1)               LLaDA SFT
  pretrain    Σ_{n,i} w_i / (N L)                              LLaDA pretraining
  token_mean  Σ_{n,i} w_i / max(Σ_n ans_len_n, 1)              SDAR / BD3-LM (batch token mean)
  semi_ar     mean_n Σ_i -logp_i m_i / L        (no 1/t)       dLLM-RL `sft_trado.py` semi-ar
  masked_mean mean_n Σ_i -logp_i m_i / max(Σ_i m_i, 1) (no 1/t) dLLM-RL `random_masking` SFT
`semi_ar` divides by the padded length L of the arrays, so pass response-region arrays `[N, R]` for it.
"""
import jax
import jax.numpy as jnp

LOSS_MODES = ("sft", "pretrain", "token_mean", "semi_ar", "masked_mean")


def token_logp(logits_NxLxV, targets_NxL):
    """`log softmax(logits)[target]` in float32 whatever the logits dtype. Returns `[N, L]` float32."""
    logits = jnp.asarray(logits_NxLxV).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.asarray(targets_NxL, jnp.int32)[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_entropy(logits_NxLxV):
    """Entropy (nats) of `softmax(logits)` over the last axis in float32; -inf logits contribute 0. `[N, L]`."""
    logits = jnp.asarray(logits_NxLxV).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.where(logits > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)


def _force_one(masked, maskable, u):
    """SDAR: a row with maskable tokens but none masked gets its maskable token with the smallest draw masked."""
    need = maskable.any(-1) & ~masked.any(-1)
    pick = jnp.argmin(jnp.where(maskable, u, jnp.inf), axis=-1)
    one_hot = jnp.arange(masked.shape[-1])[None, :] == pick[:, None]
    return masked | (need[:, None] & one_hot)


def _mask_with_rate(key, x0_NxL, maskable_NxL, p_NxL, mask_token_id, force_one):
    x0 = jnp.asarray(x0_NxL)
    maskable = jnp.asarray(maskable_NxL, bool)
    u = jax.random.uniform(key, x0.shape)
    masked = (u < p_NxL) & maskable
    if force_one:
        masked = _force_one(masked, maskable, u)
    return jnp.where(masked, jnp.asarray(mask_token_id, x0.dtype), x0), masked


def _check_t_range(eps, t_min, t_max):
    """Validates python-number arguments (traced values pass unchecked)."""
    if not all(isinstance(v, (int, float)) for v in (eps, t_min, t_max)):
        return
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}.")
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}.")


def forward_mask(key, x0_NxL, maskable_NxL, mask_token_id: int, eps: float = 1e-3, t_min: float = 0.0,
                 t_max: float = 1.0, force_one: bool = False):
    """Forward (masking) process of a full-attention MDM.

    Per sequence `t ~ U(t_min, t_max)`, `p = (1 - eps) t + eps`; every maskable token (e.g. valid & not prompt)
    is masked independently with probability `p`. Defaults = LLaDA; the dLLM-RL semi-ar / random-masking SFT ratio
    is `eps=0, t_min=0.1, t_max=0.9`; `force_one` = SDAR's "at least one token masked" (a row with
    maskable tokens but no mask gets one uniformly random maskable token masked).

    Returns:
      (xt_NxL, masked_NxL bool, p_N float32).
    """
    _check_t_range(eps, t_min, t_max)
    kt, km = jax.random.split(key)
    n = jnp.shape(x0_NxL)[0]
    t = jax.random.uniform(kt, (n,), minval=t_min, maxval=t_max)
    p_N = (1.0 - eps) * t + eps
    xt, masked = _mask_with_rate(km, x0_NxL, maskable_NxL, p_N[:, None], mask_token_id, force_one)
    return xt, masked, p_N


def block_forward_mask(key, x0_NxL, maskable_NxL, block_size: int, mask_token_id: int, eps: float = 1e-3,
                       per_block_t: bool = True, antithetic: bool = False, t_min: float = 0.0,
                       t_max: float = 1.0, force_one: bool = False):
    """Forward process of block diffusion on blocks `[iB, (i+1)B)` of the L axis.

    per_block_t=True: BD3-LM, an independent `t` per (sequence, block); False: SDAR, one `t` per sequence.
    antithetic: BD3-LM's antithetic sampling, the `N * nb` (or `N`) uniforms are stratified,
    `u_i = (v_i / n + i / n) mod 1`. Then `t = t_min + (t_max - t_min) u` (BD3's clipped range; [design] we use
    the LLaDA/SDAR rate `p = (1 - eps) t + eps` for every variant, BD3's log-linear schedule has `p = (1-eps) t`
    with the same `1/t` weight). `force_one` as in `forward_mask` (SDAR).

    Returns:
      (xt_NxL, masked_NxL bool, p_NxL float32: the masking rate of each token's block).
    """
    _check_t_range(eps, t_min, t_max)
    n, length = jnp.shape(x0_NxL)
    if not isinstance(block_size, int) or block_size < 1 or length % block_size:
        raise ValueError(f"block_size must be a positive int dividing the length {length}, got {block_size!r}.")
    nb = length // block_size if per_block_t else 1
    kt, km = jax.random.split(key)
    u = jax.random.uniform(kt, (n, nb))
    if antithetic:
        offset = jnp.arange(n * nb, dtype=jnp.float32).reshape(n, nb) / (n * nb)
        u = jnp.mod(u / (n * nb) + offset, 1.0)
    t = t_min + (t_max - t_min) * u
    p_Nxnb = (1.0 - eps) * t + eps
    p_NxL = jnp.repeat(p_Nxnb, length // nb, axis=1)
    xt, masked = _mask_with_rate(km, x0_NxL, maskable_NxL, p_NxL, mask_token_id, force_one)
    return xt, masked, p_NxL


def masked_diffusion_loss(logp_NxL, masked_NxL, p, answer_len_N=None, mode: str = "sft", num_seqs=None,
                          num_tokens=None):
    """Masked-diffusion cross-entropy (the LLaDA ELBO and its SFT variants); modes in the module docstring.

    Args:
      logp_NxL: log p_theta(x0_i | xt) of the clean tokens (`token_logp`), any value where not masked.
      masked_NxL: bool, the tokens masked by the forward process (the only ones that carry loss).
      p: masking rate, `[N]` (per sequence) or `[N, L]` (per token, block diffusion).
      answer_len_N: maskable-token count per sequence (LLaDA: answer incl. trailing EOS padding); needed by
        `sft` and `token_mean`.
      num_seqs / num_tokens: global denominators for micro-batch accumulation (replace the batch's own
        `N` / token count; then micro-batch losses sum to the full-batch loss).
    Returns:
      scalar float32 loss.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"Unknown masked-diffusion loss mode {mode!r}; expected one of {LOSS_MODES}.")
    if mode in ("sft", "token_mean") and answer_len_N is None:
        raise ValueError(f"masked_diffusion_loss mode {mode!r} needs answer_len_N.")
    masked = jnp.asarray(masked_NxL, bool)
    nll = -jnp.asarray(logp_NxL, jnp.float32)
    n, length = masked.shape
    p = jnp.asarray(p, jnp.float32)
    p_NxL = p[:, None] if p.ndim == 1 else p
    n_seqs = jnp.asarray(n if num_seqs is None else num_seqs, jnp.float32)
    if mode in ("semi_ar", "masked_mean"):
        row = jnp.sum(jnp.where(masked, nll, 0.0), axis=-1)
        denom = length if mode == "semi_ar" else jnp.maximum(jnp.sum(masked, -1).astype(jnp.float32), 1.0)
        return jnp.sum(row / denom) / jnp.maximum(n_seqs, 1.0)
    w = jnp.where(masked, nll / p_NxL, 0.0)
    if mode == "pretrain":
        denom = n * length if num_tokens is None else num_tokens
        return jnp.sum(w) / jnp.maximum(jnp.asarray(denom, jnp.float32), 1.0)
    ans = jnp.asarray(answer_len_N, jnp.float32)
    if mode == "sft":
        return jnp.sum(jnp.sum(w, -1) / jnp.maximum(ans, 1.0)) / jnp.maximum(n_seqs, 1.0)
    denom = jnp.sum(ans) if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
    return jnp.sum(w) / jnp.maximum(denom, 1.0)


def block_diffusion_loss(logp_NxL, masked_NxL, p_NxL, maskable_NxL, mode: str = "token_mean", num_seqs=None,
                         num_tokens=None):
    """Block-diffusion loss on the noisy-stream log-probs of the two-stream forward.

    `1/p`-weighted masked CE with per-token (per-block) rates from `block_forward_mask`, normalised by the number
    of maskable (answer) tokens: `token_mean` over the batch (SDAR; BD3-LM with every token maskable) or `sft`
    per sequence; `semi_ar` / `masked_mean` give the dLLM-RL no-`1/t` variants. Returns scalar float32.
    """
    answer_len_N = jnp.sum(jnp.asarray(maskable_NxL, bool), axis=-1)
    return masked_diffusion_loss(logp_NxL, masked_NxL, p_NxL, answer_len_N, mode, num_seqs, num_tokens)


def d1_onestep_inputs(key, prompt_NxP, prompt_valid_NxP, response_NxR, mask_token_id: int,
                      p_mask_prompt: float = 0.15):
    """Masked input of the d1 / diffu-GRPO one-step log-prob estimator.

    The whole response is masked; each valid prompt token is masked independently with `p_mask_prompt`
    (d1 train.yaml 0.15, dataclass default 0.3). Deterministic in `key`: pass the same key for the old, reference
    and current log-probs of one inner iteration (d1 `mask_seeds`) so that the ratio compares like with like.
    Then `logp = token_logp(model(inputs)[:, P:], response)`.

    Returns:
      (inputs_Nx(P+R), masked_Nx(P+R) bool).
    """
    if isinstance(p_mask_prompt, (int, float)) and not 0.0 <= p_mask_prompt <= 1.0:
        raise ValueError(f"p_mask_prompt must be in [0, 1], got {p_mask_prompt}.")
    prompt, response = jnp.asarray(prompt_NxP), jnp.asarray(response_NxR)
    mask_id = jnp.asarray(mask_token_id, prompt.dtype)
    u = jax.random.uniform(key, prompt.shape)
    prompt_masked = jnp.asarray(prompt_valid_NxP, bool) & (u < p_mask_prompt)
    inputs = jnp.concatenate([jnp.where(prompt_masked, mask_id, prompt), jnp.full(response.shape, mask_id)], 1)
    masked = jnp.concatenate([prompt_masked, jnp.ones(response.shape, bool)], axis=1)
    return inputs, masked
