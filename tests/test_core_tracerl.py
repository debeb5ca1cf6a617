"""Tests for jaxrl_reason/core/tracerl.py against hand-computed cases and literal numpy re-implementations of
dLLM-RL's `collapse_k_unique`, `one_round_vectorized` (rl_trado.py), the full-attention rows (rl_llada.py), the
policy / value losses and `compute_returns_and_advantages_from_fragments` (train_trado_value.py)."""
import jax
import numpy as np
import pytest

from jaxrl_reason.core import tracerl as tr

M = 99  # mask token id
# everything runs under jit (also ~3x cheaper to compile than op-by-op eager dispatch)
groups = jax.jit(tr.trace_groups, static_argnums=2)  # shrink traced: one compile per block size
shrink = jax.jit(tr.shrink_step_map, static_argnums=2)
rows = jax.jit(tr.trace_rows, static_argnums=(3, 4))
policy = jax.jit(tr.tracerl_policy_loss, static_argnames=("norm",))
gae = jax.jit(tr.step_level_gae, static_argnames=("max_steps",))
value_loss = jax.jit(tr.tracerl_value_loss, static_argnames=("norm", "clip"))
policy_grad = jax.jit(jax.grad(lambda new, old, tgt, adv, beta, norm: tr.tracerl_policy_loss(
    new, old, tgt, adv, beta=beta, norm=norm)[0]), static_argnames="norm")


# ----------------------------------------------------------------------------- numpy references (literal)
def collapse_k_unique(lst, k):
  uniq = sorted(set(lst))
  mapping = {}
  n = len(uniq)
  for idx, val in enumerate(uniq):
    group = idx // k
    end_idx = min((group + 1) * k - 1, n - 1)
    mapping[val] = uniq[end_idx]
  return [mapping[x] for x in lst]


def official_rows(response, step_map, valid, block_size, shrink):
  """dLLM-RL row construction for ONE response: pads get step id max+1 (valid in the official code), shrink per
  block, repeated rounds of one_round_vectorized, then post_num=0 removes pads from targets and empty rows are
  dropped. Returns a list of (target [R] bool, noisy [R]) in round order."""
  r = len(response)
  bs = r if block_size is None else block_size
  sm = [int(s) if v else None for s, v in zip(step_map, valid)]
  pad_id = max([s for s in sm if s is not None], default=0) + 1
  sm = [pad_id if s is None else s for s in sm]
  for j in range((r - 1) // bs + 1):
    sm[j * bs:(j + 1) * bs] = collapse_k_unique(sm[j * bs:(j + 1) * bs], shrink)
  cur = np.array(sm)
  rows = []
  while True:
    nb = -(-r // bs)
    blk = np.full(nb * bs, -1)
    blk[:r] = cur
    blk = blk.reshape(nb, bs)
    ok = blk >= 0
    mins = np.where(ok, blk, np.iinfo(np.int64).max).min(axis=1, keepdims=True)
    pmask = ((blk == mins) & ok).reshape(-1)[:r]
    if not pmask.any():
      break
    ge = ((blk >= mins) & ok).reshape(-1)[:r]
    noisy = np.array(response).copy()
    noisy[ge] = M
    target = pmask & np.asarray(valid)  # post_num = 0: pads are never targets
    if target.any():
      rows.append((target, noisy))
    cur = cur.copy()
    cur[pmask] = -1
  return rows


def random_trace(rng, n, r, max_step=12):
  step_map = rng.integers(0, max_step, size=(n, r))
  lens = rng.integers(1, r + 1, size=n)
  valid = np.arange(r)[None, :] < lens[:, None]
  response = rng.integers(0, 50, size=(n, r))
  return response, step_map, valid


# ----------------------------------------------------------------------------- grouping and rows
def test_trace_groups_and_shrink_hand_case():
  sm = np.array([[3, 1, 1, 2, 7, 5, 9, 9]])
  valid = np.ones_like(sm, bool)
  np.testing.assert_array_equal(groups(sm, valid, 4, 1), [[2, 0, 0, 1, 1, 0, 2, 2]])
  np.testing.assert_array_equal(groups(sm, valid, 4, 2), [[1, 0, 0, 0, 0, 0, 1, 1]])
  np.testing.assert_array_equal(shrink(sm, valid, 4, 2), [[3, 2, 2, 2, 7, 7, 9, 9]])
  np.testing.assert_array_equal(groups(sm, valid, None, 1), [[2, 0, 0, 1, 4, 3, 5, 5]])
  np.testing.assert_array_equal(groups(sm, valid, None, 2), [[1, 0, 0, 0, 2, 1, 2, 2]])
  valid[0, 6:] = False
  np.testing.assert_array_equal(groups(sm, valid, 4, 1), [[2, 0, 0, 1, 1, 0, tr.BIG, tr.BIG]])
  noisy, target, row_valid = rows(np.arange(8)[None], groups(sm, valid, 4, 1), valid, M, 3)
  np.testing.assert_array_equal(target[0, 0], [0, 1, 1, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(noisy[0, 0], [M, M, M, M, M, M, M, M])
  np.testing.assert_array_equal(noisy[0, 1], [M, 1, 2, M, M, 5, M, M])
  np.testing.assert_array_equal(target[0, 2], [1, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(row_valid, [[True, True, True]])


@pytest.mark.parametrize("block_size", [1, 2, 4, None])
def test_shrink_step_map_matches_collapse_k_unique(block_size):
  rng = np.random.default_rng(0)
  _, sm, valid = random_trace(rng, 6, 12)
  valid[:] = True  # collapse_k_unique sees every token
  for s in (1, 2, 3):
    got = np.asarray(shrink(sm, valid, block_size, s))
    bs = 12 if block_size is None else block_size
    for n in range(6):
      ref = sum((collapse_k_unique(list(sm[n, j:j + bs]), s) for j in range(0, 12, bs)), [])
      np.testing.assert_array_equal(got[n], ref)


@pytest.mark.parametrize("block_size", [1, 2, 4, None])
def test_trace_rows_match_official_rounds(block_size):
  rng = np.random.default_rng(1)
  n, r = 6, 12
  response, sm, valid = random_trace(rng, n, r)
  for s in (1, 2, 3):
    k = tr.num_rows_bound(block_size, s, max_steps=r)
    group = groups(sm, valid, block_size, s)
    noisy, target, row_valid = jax.device_get(rows(response, group, valid, M, r))  # r rows: one compile
    assert not row_valid[:, k:].any()  # the static bound K holds
    bs = r if block_size is None else block_size
    for i in range(n):
      ref = official_rows(response[i], sm[i], valid[i], block_size, s)
      assert row_valid[i].sum() == len(ref) and row_valid[i, :len(ref)].all()
      for kk, (t_ref, noisy_ref) in enumerate(ref):
        np.testing.assert_array_equal(target[i, kk], t_ref)
        # a noisy block matters only when it holds targets (it sees itself and clean earlier blocks only)
        active = np.repeat(t_ref.reshape(-1, bs).any(-1), bs)
        np.testing.assert_array_equal(noisy[i, kk][active], noisy_ref[active])
      assert (noisy[i][target[i]] == M).all()


def test_num_rows_bound_and_errors():
  assert tr.num_rows_bound(4, 1) == 4 and tr.num_rows_bound(4, 3) == 2 and tr.num_rows_bound(4, 1, 2) == 2
  assert tr.num_rows_bound(None, 8, 512) == 64
  with pytest.raises(ValueError, match="max_steps"):
    tr.num_rows_bound(None, 2)
  with pytest.raises(ValueError, match="shrink"):
    tr.trace_groups(np.zeros((1, 4), int), np.ones((1, 4), bool), 2, 0)
  with pytest.raises(ValueError, match="block_size"):
    tr.trace_groups(np.zeros((1, 4), int), np.ones((1, 4), bool), 0, 1)


def test_trace_rows_partial_last_block():
  rng = np.random.default_rng(2)
  response, sm, valid = random_trace(rng, 3, 10)  # 10 = 2 full blocks of 4 + a partial one
  _, target, row_valid = jax.device_get(rows(response, groups(sm, valid, 4, 1), valid, M, 4))
  for i in range(3):
    ref = official_rows(response[i], sm[i], valid[i], 4, 1)
    assert row_valid[i].sum() == len(ref)
    for kk, (t_ref, _) in enumerate(ref):
      np.testing.assert_array_equal(target[i, kk], t_ref)


def test_pack_rows():
  rng = np.random.default_rng(3)
  response, sm, valid = random_trace(rng, 4, 8)
  noisy, target, row_valid = jax.device_get(rows(response, groups(sm, valid, 4, 1), valid, M, 4))
  packed = tr.pack_rows(noisy, target, row_valid, micro_batch_size=3)
  n_rows = int(row_valid.sum())
  m = -(-n_rows // 3)
  assert packed["noisy"].shape == (m, 3, 8) and packed["row_valid"].sum() == n_rows
  flat = {k: v.reshape((m * 3,) + v.shape[2:]) for k, v in packed.items()}
  order = [(i, k) for i in range(4) for k in range(4) if row_valid[i, k]]
  for j, (i, k) in enumerate(order):
    assert (flat["seq_index"][j], flat["row_index"][j]) == (i, k)
    np.testing.assert_array_equal(flat["noisy"][j], noisy[i, k])
    np.testing.assert_array_equal(flat["target"][j], target[i, k])
  assert not flat["target"][n_rows:].any() and not flat["row_valid"][n_rows:].any()
  assert tr.pack_rows(noisy, target, row_valid, 3, num_micro_batches=m + 2)["noisy"].shape == (m + 2, 3, 8)
  with pytest.raises(ValueError, match="do not fit"):
    tr.pack_rows(noisy, target, row_valid, 1, num_micro_batches=1)


# ----------------------------------------------------------------------------- policy loss
def policy_loss_ref(new, old, target, adv, eps_low, eps_high, beta, norm):
  rows = []
  for i in range(new.shape[0]):
    tgt = np.nonzero(target[i])[0]
    if len(tgt) == 0:
      continue
    surr = kl = 0.0
    for j in tgt:
      d = float(np.clip(new[i, j] - old[i, j], -10, 10))
      a = adv[i] if adv.ndim == 1 else adv[i, j]
      r = np.exp(d)
      surr += min(r * a, np.clip(r, 1 - eps_low, 1 + eps_high) * a)
      kl += np.exp(-d) - 1 + d
    if norm == "response_len":
      rows.append(-surr / new.shape[1] + beta * kl / new.shape[1])
    else:
      rows.append(-surr / len(tgt) + beta * kl)
  return np.mean(rows)


def _policy_inputs(seed=4, rows=5, t=6):
  rng = np.random.default_rng(seed)
  old = rng.normal(-2.0, 0.5, size=(rows, t)).astype(np.float32)
  new = (old + rng.normal(0, 0.3, size=(rows, t))).astype(np.float32)
  new[0, 0] = old[0, 0] + 12.0  # exercises the ±10 clamp
  target = rng.random((rows, t)) < 0.6
  target[0, 0], target[-1] = True, False  # the last row has no target: it carries no weight
  return new, old, target, rng


@pytest.mark.parametrize("norm", ["response_len", "targets"])
@pytest.mark.parametrize("per_token", [False, True])
def test_policy_loss_matches_loop_reference(norm, per_token):
  new, old, target, rng = _policy_inputs()
  adv = rng.normal(size=new.shape if per_token else new.shape[:1]).astype(np.float32)
  loss, metrics = policy(new, old, target, adv, norm=norm)
  np.testing.assert_allclose(loss, policy_loss_ref(new, old, target, adv, 0.2, 0.2, 0.01, norm), rtol=1e-5)
  asym = policy(new, old, target, adv, eps_low=0.1, eps_high=0.28, norm=norm)[0]  # clip-higher bounds
  np.testing.assert_allclose(asym, policy_loss_ref(new, old, target, adv, 0.1, 0.28, 0.01, norm), rtol=1e-5)
  assert abs(float(asym) - float(loss)) > 1e-4  # the bounds are active in these inputs
  assert int(metrics["num_rows"]) == 4
  # -inf at non-targets (the official logp_old init) changes nothing and gives finite, zero gradients there
  old_inf = np.where(target, old, -np.inf).astype(np.float32)
  np.testing.assert_allclose(policy(new, old_inf, target, adv, norm=norm)[0], loss, rtol=1e-6)
  if per_token:
    g = policy_grad(new, old_inf, target, adv, 0.01, norm=norm)
    assert np.isfinite(g).all() and (np.asarray(g)[~target] == 0).all()


def test_policy_loss_hand_case_and_global_rows():
  # one target, ratio e^{0.5} > 1.2, A = 1 -> clipped: surr = 1.2; kl = e^{-0.5} - 1 + 0.5; T = 6
  new, old = np.zeros((5, 6), np.float32), np.zeros((5, 6), np.float32)
  new[0, 0] = 0.5
  target = np.zeros((5, 6), bool)
  target[0, 0] = True
  adv = np.ones(5, np.float32)
  loss, m = policy(new, old, target, adv, eps_low=0.2, eps_high=0.2, beta=0.1)
  np.testing.assert_allclose(loss, -1.2 / 6 + 0.1 * (np.exp(-0.5) - 0.5) / 6, rtol=1e-6)
  assert float(m["clip_frac"]) == 1.0 and int(m["num_rows"]) == 1
  loss_t = policy(new, old, target, adv, eps_low=0.2, eps_high=0.2, beta=0.1, norm="targets")[0]
  np.testing.assert_allclose(loss_t, -1.2 + 0.1 * (np.exp(-0.5) - 0.5), rtol=1e-6)
  # global row count: loss over a micro-batch = Σ rows / num_rows
  np.testing.assert_allclose(policy(new, old, target, adv, num_rows=4)[0], policy(new, old, target, adv)[0] / 4,
                             rtol=1e-6)
  # ratio = 1 (first inner iteration): loss = -mean_rows(Σ_T A / T), KL = 0
  l0, m0 = policy(old, old, target, 2 * adv)
  np.testing.assert_allclose(l0, -2.0 / 6, rtol=1e-6)
  assert float(m0["kl"]) == 0.0 and float(m0["ratio_mean"]) == 1.0
  with pytest.raises(ValueError, match="norm"):
    tr.tracerl_policy_loss(new, old, target, adv, norm="tokens")


@pytest.mark.parametrize("norm", ["response_len", "targets"])
def test_policy_loss_grad_matches_finite_differences(norm):
  rng = np.random.default_rng(5)
  old = rng.normal(-2, 0.5, size=(5, 6)).astype(np.float32)
  # log-ratios inside the clip range for some tokens, clearly outside for others (no kink within ±h)
  d = rng.choice([0.05, -0.1, 0.5, 0.0, -0.6, 0.1, 0.02, -0.4, 0.12, 0.3], size=(5, 6))
  new = (old + d).astype(np.float32)
  target = rng.random((5, 6)) < 0.7
  adv = rng.normal(size=(5, 6)).astype(np.float32)
  g = np.asarray(policy_grad(new, old, target, adv, 0.05, norm=norm))
  f = lambda x: float(policy(x.astype(np.float32), old, target, adv, beta=0.05, norm=norm)[0])  # noqa: E731
  h = 1e-3
  for i, j in zip(*np.nonzero(target)):
    e = np.zeros(new.shape)
    e[i, j] = h
    fd = (f(new + e) - f(new - e)) / (2 * h)
    np.testing.assert_allclose(g[i, j], fd, rtol=2e-2, atol=3e-4)
  assert (g[~target] == 0).all()


# ----------------------------------------------------------------------------- value model
def gae_ref(r, v, step, valid, gamma, lam):
  """Literal port of train_trado_value.py::compute_returns_and_advantages_from_fragments for one sequence."""
  uniq = sorted({int(s) for s, ok in zip(step, valid) if ok})
  rank = {sid: i for i, sid in enumerate(uniq)}
  n_s = len(uniq)
  r_star, v_star = np.zeros(n_s), np.zeros(n_s)
  for sid in uniq:
    m = (step == sid) & valid
    r_star[rank[sid]], v_star[rank[sid]] = r[m].mean(), v[m].mean()
  ret_star, adv_star = np.zeros(n_s), np.zeros(n_s)
  for i in range(n_s - 1, -1, -1):
    ret_star[i] = r_star[i] + (gamma * ret_star[i + 1] if i + 1 < n_s else 0.0)
    delta = r_star[i] - v_star[i] + gamma * (v_star[i + 1] if i + 1 < n_s else 0.0)
    adv_star[i] = delta + (gamma * lam * adv_star[i + 1] if i + 1 < n_s else 0.0)
  ret_tok, adv_tok = np.zeros(len(r)), np.zeros(len(r))
  for pos in np.nonzero(valid)[0]:
    i = rank[int(step[pos])]
    nxt = lambda a: a[i + 1] if i + 1 < n_s else 0.0  # noqa: E731
    ret_tok[pos] = r[pos] + gamma * nxt(ret_star)
    adv_tok[pos] = (r[pos] - v[pos]) + gamma * nxt(v_star) + gamma * lam * nxt(adv_star)
  return adv_tok, ret_tok


def _value_inputs(seed=6, n=6, r=12):
  rng = np.random.default_rng(seed)
  _, sm, valid = random_trace(rng, n, r, max_step=6)
  shrunk = shrink(sm, valid, 4, 2)
  rank = groups(shrunk, valid, None, 1)  # global dense rank of the shrunk ids
  values = rng.normal(size=(n, r)).astype(np.float32)
  reward = rng.normal(size=n).astype(np.float32)
  return np.asarray(shrunk), np.asarray(rank), valid, values, reward, rng


def test_step_gae_identities():
  shrunk, rank, valid, values, reward, _ = _value_inputs()
  tok_r = np.asarray(jax.jit(tr.outcome_reward_on_last_step)(reward, rank, valid))
  adv, ret = gae(tok_r, values, rank, valid, 1.0, 1.0, max_steps=12)
  np.testing.assert_allclose(ret, np.where(valid, reward[:, None], 0), atol=1e-5)      # R_j = reward
  np.testing.assert_allclose(adv, np.where(valid, reward[:, None] - values, 0), atol=1e-5)  # A_j = reward - V_j
  adv0 = np.asarray(gae(tok_r, values, rank, valid, gamma=1.0, lam=0.0)[0])
  for n in range(len(reward)):  # gamma=1, lambda=0: A_j = r_j - V_j + V*_{t+1}
    for j in np.nonzero(valid[n])[0]:
      nxt = (rank[n] == rank[n, j] + 1) & valid[n]
      v_next = values[n][nxt].mean() if nxt.any() else 0.0
      np.testing.assert_allclose(adv0[n, j], tok_r[n, j] - values[n, j] + v_next, atol=1e-5)


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 0.5), (0.7, 1.0)])
def test_step_gae_matches_official_loop(gamma, lam):
  shrunk, rank, valid, values, _, rng = _value_inputs(seed=7)
  tok_r = np.where(valid, rng.normal(size=valid.shape), 0).astype(np.float32)  # process-reward mode
  adv, ret = jax.device_get(gae(tok_r, values, rank, valid, gamma, lam, max_steps=12))
  for n in range(valid.shape[0]):
    a_ref, r_ref = gae_ref(tok_r[n], values[n], shrunk[n], valid[n], gamma, lam)  # ranks the raw shrunk ids
    np.testing.assert_allclose(adv[n], a_ref, atol=1e-5)
    np.testing.assert_allclose(ret[n], r_ref, atol=1e-5)


def test_outcome_reward_and_merge_row_values():
  rank = np.array([[0, 2, 1, 2, 5], [1, 0, 0, 0, 0]])
  valid = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
  np.testing.assert_array_equal(tr.outcome_reward_on_last_step(np.array([3.0, -1.0]), rank, valid),
                                [[0, 3, 0, 3, 0], [-1, 0, 0, 0, 0]])
  group = np.asarray(groups(rank, valid, None, 1))
  _, target, _ = rows(np.zeros((2, 5), int), group, valid, M, 3)
  per_row = np.arange(30, dtype=np.float32).reshape(2, 3, 5)
  merged = np.asarray(jax.jit(tr.merge_row_values)(per_row, target))
  ref = np.zeros((2, 5))
  for n in range(2):
    for j in range(5):
      if valid[n, j]:
        ref[n, j] = per_row[n, int(group[n, j]), j]
  np.testing.assert_array_equal(merged, ref)


@pytest.mark.parametrize("norm", ["response_len", "targets"])
@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_matches_loop(norm, clip):
  rng = np.random.default_rng(8)
  v, v_old, ret = (rng.normal(size=(4, 6)).astype(np.float32) for _ in range(3))
  target = rng.random((4, 6)) < 0.5
  target[2] = False
  loss, m = value_loss(v, v_old, ret, target, clip=clip, norm=norm)
  rows = []
  for i in range(4):
    if not target[i].any():
      continue
    tot = 0.0
    for j in np.nonzero(target[i])[0]:
      if clip is None:  # no clipped term: the plain squared error
        tot += 0.5 * (v[i, j] - ret[i, j]) ** 2
        continue
      vc = v_old[i, j] + np.clip(v[i, j] - v_old[i, j], -clip, clip)
      tot += 0.5 * max((v[i, j] - ret[i, j]) ** 2, (vc - ret[i, j]) ** 2)
    rows.append(tot / (6 if norm == "response_len" else target[i].sum()))
  np.testing.assert_allclose(loss, np.mean(rows), rtol=1e-5)
  assert 0.0 <= float(m["vf_clip_frac"]) <= 1.0
  assert (float(m["vf_clip_frac"]) > 0) == (clip is not None)
