"""Supervised warm start: the loss, response-length bucketing, and bit-for-bit reproducibility."""
import jax
import numpy as np
from flax import nnx

from jaxrl_reason.data.tokenizer import build_char_tokenizer
from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.train import sft

P, R = 12, 128


def _setup(tmp_path, seed=0):
    tok = build_char_tokenizer(str(tmp_path / "tok"))
    cfg = TransformerConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=2)
    prompts, traces = sft.arithmetic_sft_set(seed, 16, (0, 1), recheck_prob=0.5, error_prob=0.0, heldout_seed=99,
                                             num_heldout=4)
    return tok, cfg, sft.sft_arrays(tok, prompts, traces, P, R)


def test_sft_loss_is_token_mean_nll_of_responses(tmp_path):
    tok, cfg, arrays = _setup(tmp_path)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = sft.with_counts({k: v[:4] for k, v in arrays.items()})
    loss, _ = sft.ar_sft_loss(params, batch, None, graphdef=graphdef)
    # direct: full forward, float64 log-softmax, NLL of every response token (and EOS) predicted from its left
    from jaxrl_reason.models.attention import causal_mask, positions_from_mask

    valid = batch["valid_NxL"]
    logits, _ = model(batch["tokens_NxL"], positions_from_mask(valid), causal_mask(valid))
    logits = np.asarray(logits, np.float64)
    nll, count = 0.0, 0
    for i in range(4):
        for t in range(R):
            if batch["response_mask_NxR"][i, t]:
                row = logits[i, P + t - 1]
                logz = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                nll -= row[batch["tokens_NxL"][i, P + t]] - logz
                count += 1
    np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)


def test_bucketing_trims_only_padding(tmp_path):
    tok, cfg, arrays = _setup(tmp_path)
    batch = {k: v[:4] for k, v in arrays.items()}
    trimmed = sft.bucket_batch(batch, P, bucket=32)
    r = trimmed["response_mask_NxR"].shape[1]
    assert r % 32 == 0 and r <= R
    assert batch["response_mask_NxR"][:, r:].sum() == 0
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    full, _ = sft.ar_sft_loss(params, sft.with_counts(batch), None, graphdef=graphdef)
    short, _ = sft.ar_sft_loss(params, sft.with_counts(trimmed), None, graphdef=graphdef)
    np.testing.assert_allclose(float(full), float(short), rtol=1e-6)


def test_sft_is_bit_for_bit_reproducible_and_learns(tmp_path):
    tok, cfg, arrays = _setup(tmp_path)
    results = []
    for _ in range(2):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        model, history = sft.train_sft(model, tok, arrays, steps=6, batch_size=8, lr=3e-3, warmup_steps=0, seed=0,
                                       log_every=5, log_fn=lambda _: None, prompt_len=P)
        results.append(([np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))], history))
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_array_equal(a, b)
    losses = [h["loss"] for h in results[0][1]]
    assert losses[-1] < losses[0]
