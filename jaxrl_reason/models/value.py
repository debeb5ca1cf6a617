"""Value model: the policy's backbone with a zero-initialised scalar head.

A full copy of the base LM whose LM head is replaced by `Linear(hidden, 1, bias=False)` initialised to zero,
applied to the final-normed hidden state at every position. Used as the PPO critic (AR) and as the TraceRL
diffusion value model (same rows and masks as the policy).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_reason.models.transformer import Transformer, TransformerConfig


class ValueModel(nnx.Module):
    """backbone (Transformer without LM head) + zero-init head. __call__ -> values f32[B, T]."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.backbone = Transformer(cfg, rngs=rngs, lm_head=False)
        self.head = nnx.Param(jnp.zeros((cfg.hidden_size, 1), cfg.dtype), logical_axes=("embed", None))

    def __call__(self, tokens_BxT, positions_BxT, mask_BxTxS):
        """tokens int[B, T], positions int[B, T], mask bool[B, T, T] -> values float32[B, T]."""
        h_BxTxD, _ = self.backbone.hidden(tokens_BxT, positions_BxT, mask_BxTxS)
        return jnp.einsum("btd,do->bto", h_BxTxD, self.head[...], preferred_element_type=jnp.float32)[..., 0]

    @classmethod
    def from_policy(cls, policy: Transformer, *, rngs: nnx.Rngs) -> "ValueModel":
        """Value model whose backbone is a copy (new buffers) of the policy's weights; head = 0.

        The policy's untied LM head is dropped; tied embeddings are kept (they are the input embedding).
        Built abstractly first, so no random init is computed; `rngs` only seeds that abstract build.
        """
        key = rngs.params()
        graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(policy.cfg, rngs=nnx.Rngs(key))))
        backbone = nnx.to_pure_dict(nnx.state(policy, nnx.Param))
        backbone.pop("lm_head", None)
        head = jnp.zeros((policy.cfg.hidden_size, 1), policy.cfg.dtype)
        nnx.replace_by_pure_dict(state, {"backbone": jax.tree.map(jnp.copy, backbone), "head": head})
        return nnx.merge(graphdef, state)
