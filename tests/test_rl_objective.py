"""The real RL objective under the generic step: micro-batching equivalence and each term of the loss on its own.

Plain SGD without clipping keeps a constant gradient factor visible (AdamW and clipping hide one), so a step that
divides accumulated gradients by the number of micro-batches, or a loss that normalizes each micro-batch by its
own token count, fails here.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rl_testing import loss_hp

from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.models.value import ValueModel
from jaxrl_reason.train import step as step_lib
from jaxrl_reason.train.contracts import UpdateBatch
from jaxrl_reason.train.objectives import ar_logps, ar_values, rl_loss
from jaxrl_reason.train.state import init_train_state
from jaxrl_reason.train.step import SUMMED

N, P, R, V = 8, 3, 6, 11
LENGTHS_N = np.array([6, 1, 4, 0, 2, 6, 3, 5])  # uneven, one empty response


def _models():
    cfg = TransformerConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                            num_kv_heads=2)
    policy = Transformer(cfg, rngs=nnx.Rngs(0))
    value = ValueModel.from_policy(policy, rngs=nnx.Rngs(1))
    value.head[...] = 0.3 * jax.random.normal(jax.random.PRNGKey(7), value.head[...].shape)  # non-zero critic grads
    pg, pp = nnx.split(policy, nnx.Param)
    vg, vp = nnx.split(value, nnx.Param)
    return pg, vg, {"policy": pp, "value": vp}


def _batch():
    rng = np.random.default_rng(0)
    mask = (np.arange(R)[None] < LENGTHS_N[:, None]).astype(np.float32)
    prompt_valid = np.ones((N, P), bool)
    prompt_valid[::3, 0] = False  # some left padding
    f = lambda scale=1.0: (scale * rng.normal(size=(N, R))).astype(np.float32)
    batch = {
        "tokens_NxL": rng.integers(0, V, size=(N, P + R)).astype(np.int32),
        "valid_NxL": np.concatenate([prompt_valid, mask > 0], 1),
        "response_mask_NxR": mask,
        "logp_old_NxR": (np.log(1.0 / V) + f(0.3)).astype(np.float32),
        "logp_ref_NxR": (np.log(1.0 / V) + f(0.3)).astype(np.float32),
        "adv_NxR": f() * mask,
        "values_old_NxR": f(0.5),
        "returns_NxR": f(),
        "num_tokens_N": np.full((N,), mask.sum(), np.float32),
        "num_seqs_N": np.full((N,), (mask.sum(-1) > 0).sum(), np.float32),
    }
    return UpdateBatch(**{k: jnp.asarray(v) for k, v in batch.items()})


def _cfg(agg, mode="ppo", value_coef=0.5):
    return loss_hp(mode=mode, eps_low=0.1, eps_high=0.15, dual_clip_c=3.0, agg=agg, agg_const=4.0, kl_coef=0.3,
                   kl_kind="k3", entropy_coef=0.05, value_coef=value_coef, value_clip=0.2)


AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# every aggregation of the clipped PPO loss, and GSPO; distinct weights so that no error cancels another; the
# critic term (one more forward) in the first
OBJECTIVES = tuple((_cfg(agg, value_coef=v), w) for agg, w, v in zip(AGGS, (1.0, 0.7, 1.3, 0.9), (0.5, 0, 0, 0))) \
    + ((_cfg(AGGS[1], "gspo", value_coef=0.0), 1.1),)
TERMS = ("pg_loss", "kl_loss", "entropy", "vf_loss")


def _numpy_value_loss(vg, value_params, batch):
    """0.5 token-mean of max((v - R)^2, (clip(v, v_old -+ 0.2) - R)^2) over the response tokens."""
    mask = np.asarray(batch.response_mask_NxR)
    v = np.asarray(ar_values(vg, value_params, batch))
    v_old, ret = np.asarray(batch.values_old_NxR), np.asarray(batch.returns_NxR)
    per_tok = np.maximum((v - ret) ** 2, (np.clip(v, v_old - 0.2, v_old + 0.2) - ret) ** 2)
    return 0.5 * np.sum(per_tok * mask) / mask.sum()


def _all_objectives(params, mb, rng, *, pg, vg):
    """One loss over all objectives, sharing the policy forward, so each micro-batch count compiles once."""
    logp, entropy = ar_logps(pg, params["policy"], mb)
    shared = lambda graphdef, p, b: (logp, entropy)  # noqa: E731
    total, metrics = 0.0, {}
    for i, (cfg, weight) in enumerate(OBJECTIVES):
        loss, m = rl_loss(params, mb, rng, hp=cfg, policy_graphdef=pg, value_graphdef=vg, logps_fn=shared)
        total, metrics[f"{SUMMED}loss_{i}"] = total + weight * loss, loss
        metrics.update({f"{k}_{i}": v for k, v in m.items() if k.removeprefix(SUMMED) in TERMS})
    return total, metrics


def test_micro_batched_rl_loss_equals_one_batch():
    """M = 1 and 4 micro-batches: same loss, logged loss terms, grad_norm and SGD-updated params, for every
    aggregation of the PPO loss and for GSPO, with KL, entropy and critic terms on and uneven response lengths.

    Each objective's total is the sum of its logged terms with their coefficients (entropy with a minus sign), and
    the critic's term is a numpy clipped value loss of the critic's own values."""
    pg, vg, params = _models()
    loss_fn = functools.partial(_all_objectives, pg=pg, vg=vg)
    tx = optax.sgd(0.5)
    batch = _batch()
    out = {}
    for m in (1, 4):  # M = 4 also cuts the batch where M = 2 would
        state = init_train_state(jax.tree.map(jnp.copy, params), tx, seed=0)
        new_state, metrics = step_lib.make_train_step(loss_fn, tx, num_micro_batches=m, donate=False)(state, batch)
        out[m] = (jax.device_get(metrics), jax.device_get(new_state.params))
    ref_metrics, ref_params = out[1]
    assert ref_metrics["grad_norm"] > 1e-3 and float(ref_metrics["skipped"]) == 0.0
    for i, (cfg, _) in enumerate(OBJECTIVES):
        t = {k: float(ref_metrics.get(f"{k}_{i}", 0.0)) for k in TERMS}
        parts = t["pg_loss"] + cfg.kl_coef * t["kl_loss"] - cfg.entropy_coef * t["entropy"] + \
            cfg.value_coef * t["vf_loss"]
        np.testing.assert_allclose(ref_metrics[f"loss_{i}"], parts, rtol=1e-6, atol=1e-7, err_msg=f"{cfg}")
        assert t["kl_loss"] > 0 and t["entropy"] > 0
    np.testing.assert_allclose(ref_metrics["vf_loss_0"], _numpy_value_loss(vg, params["value"], batch), rtol=1e-5)
    for m in (4,):
        metrics, new_params = out[m]
        for key in ref_metrics:
            if key == "loss" or key == "grad_norm" or key.startswith(("loss_",) + TERMS):
                np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=f"{key}, M={m}")
        for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(new_params)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=f"params, M={m}")


def test_micro_batches_draw_distinct_keys():
    """Each micro-batch's loss sees its own key: w[m] collects uniform(key_m) of micro-batch m only."""
    m = 4

    def loss_fn(params, mb, rng):
        return jnp.sum(params["w"] * mb["id_NxM"][0]) * jax.random.uniform(rng), {}

    batch = {"id_NxM": jnp.tile(jnp.eye(m), (2, 1))}  # rows m, m + M, ... (micro-batch m) carry one-hot m
    tx = optax.sgd(1.0)
    state = init_train_state({"w": jnp.zeros((m,))}, tx, seed=0)
    new_state, _ = step_lib.make_train_step(loss_fn, tx, num_micro_batches=m, donate=False)(state, batch)
    draws = -np.asarray(new_state.params["w"])  # the SGD step is minus the gradient, here the uniform draw
    assert np.all((draws > 0) & (draws < 1)), draws
    assert len(np.unique(draws)) == m, f"micro-batches shared a key: {draws}"


def _hand_batch():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
    return UpdateBatch(  # no tokens: the losses here take stand-in log-probs
        tokens_NxL=None, valid_NxL=None,
        response_mask_NxR=jnp.asarray(mask),
        logp_old_NxR=jnp.full((2, 4), -1.0),
        logp_ref_NxR=jnp.asarray([[-1.5, -1.0, -0.5, 0.0], [-2.0, 0.0, 0.0, 0.0]]),
        adv_NxR=jnp.asarray([[1.0, 1.0, 1.0, 0.0], [-2.0, 0.0, 0.0, 0.0]]),
        num_tokens_N=jnp.full((2,), 4.0),
        num_seqs_N=jnp.full((2,), 2.0),
    )


def _fake_logps(graphdef, params, batch):
    del graphdef, batch
    return params["logp"], params["ent"]


def test_each_term_of_the_loss_by_hand():
    """logp = logp_old (ratio 1, no clipping), token-mean over 4 tokens:
    pg = -mean(adv) = -(1 + 1 + 1 - 2) / 4 = -0.25
    k3 = exp(d) - d - 1 at d = ref - logp = -0.5, 0, 0.5, -1 -> mean = (e^-.5 - .5 + e^.5 - 1.5 + e^-1) / 4
    entropy term = -coef * mean(H) with H = 1, 2, 3, 2 -> -0.1 * 2 = -0.2
    """
    batch = _hand_batch()
    params = {"policy": {"logp": jnp.full((2, 4), -1.0),
                         "ent": jnp.asarray([[1.0, 2.0, 3.0, 9.0], [2.0, 9.0, 9.0, 9.0]])}}
    d = np.array([-0.5, 0.0, 0.5, -1.0])
    kl = float(np.mean(np.exp(d) - d - 1.0))
    cfg = loss_hp(agg="token-mean", kl_coef=0.4, kl_kind="k3", entropy_coef=0.1)
    loss, metrics = rl_loss(params, batch, None, hp=cfg, policy_graphdef=None, logps_fn=_fake_logps)
    metrics = step_lib._reduce_metrics(metrics)  # as the step logs them
    np.testing.assert_allclose(metrics["pg_loss"], -0.25, rtol=1e-6)
    np.testing.assert_allclose(metrics["kl_loss"], kl, rtol=1e-6)
    np.testing.assert_allclose(metrics["entropy"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(loss, -0.25 + 0.4 * kl - 0.1 * 2.0, rtol=1e-6)
    # each coefficient switches its own term only
    for field, drop in (("kl_coef", 0.4 * kl), ("entropy_coef", -0.1 * 2.0)):
        alone, _ = rl_loss(params, batch, None, hp=loss_hp(**{**cfg.to_dict(), field: 0.0}),
                           policy_graphdef=None, logps_fn=_fake_logps)
        np.testing.assert_allclose(alone, -0.25 + 0.4 * kl - 0.1 * 2.0 - drop, rtol=1e-6, err_msg=field)
    # signs: a higher entropy lowers the loss by coef / num_tokens per response token; padding has no effect
    grads = jax.grad(lambda p: rl_loss(p, batch, None, hp=cfg, policy_graphdef=None,
                                       logps_fn=_fake_logps)[0])(params)["policy"]
    np.testing.assert_allclose(grads["ent"], -0.1 / 4 * np.asarray(batch.response_mask_NxR), atol=1e-7)
    # d/dlogp = -adv/4 (pg) + 0.4 * (1 - exp(ref - logp)) / 4 (k3), zero on padding
    mask = np.asarray(batch.response_mask_NxR)
    ref_minus_logp = np.asarray(batch.logp_ref_NxR) + 1.0
    want = (-np.asarray(batch.adv_NxR) + 0.4 * (1.0 - np.exp(ref_minus_logp))) / 4 * mask
    np.testing.assert_allclose(grads["logp"], want, atol=1e-6)
