"""Tests for jaxrl_reason/core/diffusion.py: forward processes, masked-diffusion losses (loop references), the d1
one-step estimator inputs and float32 token log-probs (torch reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrl_reason.core import diffusion as df

M = 7  # mask token id
fwd = jax.jit(df.forward_mask, static_argnames=("mask_token_id", "force_one"))
block_fwd = jax.jit(df.block_forward_mask, static_argnames=("block_size", "mask_token_id", "per_block_t",
                                                             "antithetic", "force_one"))
mdl = jax.jit(df.masked_diffusion_loss, static_argnames=("mode",))
bdl = jax.jit(df.block_diffusion_loss, static_argnames=("mode",))
d1 = jax.jit(df.d1_onestep_inputs, static_argnames=("mask_token_id",))


def test_token_logp_matches_torch_and_is_float32():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 11)).astype(np.float32) * 4
  targets = rng.integers(0, 11, size=(2, 3))
  ref = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1).gather(-1, torch.tensor(targets)[..., None])
  got = jax.jit(df.token_logp)(jnp.asarray(logits, jnp.bfloat16), targets)
  assert got.dtype == jnp.float32
  idx = torch.tensor(targets)[..., None]
  bf16_ref = torch.log_softmax(torch.tensor(logits).bfloat16().double(), -1).gather(-1, idx)
  np.testing.assert_allclose(got, bf16_ref[..., 0].numpy(), atol=1e-5)  # bf16 inputs, float32 math
  np.testing.assert_allclose(jax.jit(df.token_logp)(logits, targets), ref[..., 0].numpy(), atol=1e-5)


def test_token_entropy_matches_torch():
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(2, 3, 11)).astype(np.float32) * 3
  logits[0, 0, :4] = -np.inf  # filtered tokens (top-k / top-p) carry no entropy
  ref = torch.distributions.Categorical(logits=torch.tensor(logits, dtype=torch.float64)).entropy().numpy()
  got = jax.jit(df.token_entropy)(logits)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  assert jax.jit(df.token_entropy)(jnp.asarray(logits, jnp.bfloat16)).dtype == jnp.float32


def test_forward_mask_properties():
  rng = np.random.default_rng(1)
  x0 = rng.integers(0, 5, size=(64, 32))
  maskable = np.ones((64, 32), bool)
  maskable[:, :8] = False  # prompt
  maskable[:, -3:] = False  # padding
  xt, masked, p = fwd(jax.random.key(0), x0, maskable, M, 1e-3, 0.0, 1.0)  # one signature: one compile
  xt, masked, p = map(np.asarray, (xt, masked, p))
  assert not masked[~maskable].any()
  np.testing.assert_array_equal(xt, np.where(masked, M, x0))
  assert (p >= 1e-3).all() and (p <= 1.0).all()
  # per row the masked fraction tracks p (21 maskable tokens / row: loose per-row, tight on average)
  frac = masked.sum(-1) / maskable.sum(-1)
  assert abs(np.mean(frac - p)) < 0.03 and np.corrcoef(frac, p)[0, 1] > 0.9
  # same key -> same draw, other key -> another draw
  np.testing.assert_array_equal(fwd(jax.random.key(0), x0, maskable, M, 1e-3, 0.0, 1.0)[1], masked)
  assert (np.asarray(fwd(jax.random.key(1), x0, maskable, M, 1e-3, 0.0, 1.0)[1]) != masked).any()
  # dLLM-RL ratio U(0.1, 0.9), eps 0
  p2 = np.asarray(fwd(jax.random.key(2), x0, maskable, M, 0.0, 0.1, 0.9)[2])
  assert (p2 >= 0.1).all() and (p2 <= 0.9).all()
  with pytest.raises(ValueError, match="t_min"):
    df.forward_mask(jax.random.key(0), x0, maskable, M, t_min=0.5, t_max=0.2)


def test_force_one_masks_one_token_when_none_masked():
  x0 = np.arange(24).reshape(4, 6)
  maskable = np.ones((4, 6), bool)
  maskable[3] = False  # nothing maskable: stays clean
  _, masked, _ = fwd(jax.random.key(3), x0, maskable, mask_token_id=M, eps=0.0, t_min=0.0, t_max=0.0,
                     force_one=True)
  np.testing.assert_array_equal(np.asarray(masked).sum(-1), [1, 1, 1, 0])


def test_block_forward_mask_rates():
  x0 = np.zeros((8, 16), int)
  maskable = np.ones((8, 16), bool)
  xt, masked, p = map(np.asarray, block_fwd(jax.random.key(5), x0, maskable, block_size=4, mask_token_id=M,
                                             eps=0.0, antithetic=True))
  np.testing.assert_array_equal(xt, np.where(masked, M, x0))
  p = p.reshape(8, 4, 4)
  assert (p == p[..., :1]).all() and not (p[:, :, 0] == p[:, :1, 0]).all()  # BD3: constant per block, varies
  # antithetic: the 32 block times fall one in each interval [i/32, (i+1)/32) (eps 0, t range [0, 1])
  np.testing.assert_array_equal(np.floor(p[:, :, 0].reshape(-1) * 32), np.arange(32))
  _, _, p_s = block_fwd(jax.random.key(4), x0, maskable, block_size=4, mask_token_id=M, per_block_t=False)
  assert (np.asarray(p_s) == np.asarray(p_s)[:, :1]).all()  # SDAR: one rate per sequence
  with pytest.raises(ValueError, match="block_size"):
    df.block_forward_mask(jax.random.key(0), x0, maskable, 5, M)


def loss_ref(logp, masked, p, ans_len, mode):
  n, length = logp.shape
  p = np.broadcast_to(p[:, None] if p.ndim == 1 else p, logp.shape)
  tot, rows = 0.0, []
  for i in range(n):
    row = 0.0
    for j in range(length):
      if masked[i, j]:
        row += -logp[i, j] if mode in ("semi_ar", "masked_mean") else -logp[i, j] / p[i, j]
    tot += row
    if mode == "sft":
      rows.append(row / max(ans_len[i], 1))
    elif mode == "semi_ar":
      rows.append(row / length)
    elif mode == "masked_mean":
      rows.append(row / max(masked[i].sum(), 1))
  if mode == "pretrain":
    return tot / (n * length)
  if mode == "token_mean":
    return tot / max(ans_len.sum(), 1)
  return np.mean(rows)


@pytest.mark.parametrize("mode", df.LOSS_MODES)
def test_masked_diffusion_loss_matches_loop(mode):
  rng = np.random.default_rng(6)
  logp = -rng.random((4, 10)).astype(np.float32) * 3
  maskable = rng.random((4, 10)) < 0.8
  masked = maskable & (rng.random((4, 10)) < 0.5)
  masked[3] = False  # a row with nothing masked
  p = rng.uniform(0.05, 1.0, size=4).astype(np.float32)
  ans = maskable.sum(-1)
  got = mdl(np.where(masked, logp, -np.inf), masked, p, ans, mode=mode)  # -inf where unmasked never leaks
  np.testing.assert_allclose(got, loss_ref(logp, masked, p, ans, mode), rtol=1e-5)
  # global normalisers: two half-batches sum to the full batch
  if mode != "masked_mean":
    halves = [mdl(logp[s], masked[s], p[s], ans[s], mode=mode, num_seqs=4, num_tokens=4 * 10 if mode == "pretrain"
                  else ans.sum()) for s in (slice(0, 2), slice(2, 4))]
    np.testing.assert_allclose(sum(halves), loss_ref(logp, masked, p, ans, mode), rtol=1e-5)
  # block version: per-token rates, answer length from maskable
  p_tok = rng.uniform(0.05, 1.0, size=(4, 10)).astype(np.float32)
  np.testing.assert_allclose(bdl(logp, masked, p_tok, maskable, mode=mode),
                             loss_ref(logp, masked, p_tok, ans, mode), rtol=1e-5)


def test_masked_diffusion_loss_hand_case_and_errors():
  # one masked token, logp = -2, p = 0.5, answer length 4: sft = (2 / 0.5) / 4 / N(=1)
  logp, masked = np.array([[-2.0, -1, -1, -1]]), np.array([[True, False, False, False]])
  np.testing.assert_allclose(mdl(logp, masked, np.array([0.5]), np.array([4]), mode="sft"), 1.0)
  np.testing.assert_allclose(mdl(logp, masked, np.array([0.5]), None, mode="semi_ar"), 0.5)
  with pytest.raises(ValueError, match="answer_len_N"):
    df.masked_diffusion_loss(logp, masked, np.array([0.5]), None, mode="sft")
  with pytest.raises(ValueError, match="mode"):
    df.masked_diffusion_loss(logp, masked, np.array([0.5]), None, mode="elbo")


def test_d1_onestep_inputs():
  rng = np.random.default_rng(7)
  prompt = rng.integers(0, 5, size=(16, 20))
  prompt_valid = np.ones((16, 20), bool)
  prompt_valid[:, :5] = False  # left padding is never masked
  response = rng.integers(0, 5, size=(16, 6))
  key = jax.random.key(8)
  inp, masked = map(np.asarray, d1(key, prompt, prompt_valid, response, mask_token_id=M))
  inp2, masked2 = map(np.asarray, d1(key, prompt, prompt_valid, response, mask_token_id=M))
  np.testing.assert_array_equal(inp, inp2)  # old / ref / new share the mask for one key
  np.testing.assert_array_equal(masked, masked2)
  assert (np.asarray(d1(jax.random.key(9), prompt, prompt_valid, response, mask_token_id=M)[1]) != masked).any()
  assert inp.shape == (16, 26) and (inp[:, 20:] == M).all() and masked[:, 20:].all()
  assert not masked[:, :5].any()
  np.testing.assert_array_equal(inp[:, :20], np.where(masked[:, :20], M, prompt))
  assert 0.08 < masked[:, 5:20].mean() < 0.22  # p_mask_prompt 0.15 over 240 tokens
  none = np.asarray(d1(key, prompt, prompt_valid, response, mask_token_id=M, p_mask_prompt=0.0)[1])
  assert not none[:, :20].any()
