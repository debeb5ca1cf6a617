"""The policy weights the rollout sampler decodes with, in the layout `rollout.layout` names.

"train": the trainer's arrays cast to `model.compute_dtype`, sharded as in training (with FSDP every decode step
gathers the weights). "decode": the sampler's own mesh over the same devices, (devices / rollout.decode_tensor)
x rollout.decode_tensor, weights split over the tensor axis by heads, MLP columns and vocabulary and whole over
the data axis, filled from the trainer's arrays device to device in the compute dtype before each rollout
(`sampling/weights.py`). The sampler takes its mesh and shardings from the weights it is given.
"""
from __future__ import annotations

from jaxrl_reason.sampling import weights as weights_lib
from jaxrl_reason.train.logprobs import COMPUTE_DTYPES, cast_floating

LAYOUTS = ("train", "decode")


def validate(rollout, attention: str, num_devices: int) -> None:
    """ValueError with one sentence for a sampler layout that cannot run (before anything compiles)."""
    if rollout.layout not in LAYOUTS:
        raise ValueError(f"rollout.layout must be one of {LAYOUTS}, got {rollout.layout!r}.")
    t = rollout.decode_tensor
    if not isinstance(t, int) or t < 1 or num_devices % t:
        raise ValueError(f"rollout.decode_tensor ({t!r}) must be a positive int dividing the {num_devices} devices.")
    if rollout.layout == "decode" and attention != "causal":
        raise ValueError("rollout.layout 'decode' is for autoregressive (causal) policies; diffusion samplers "
                         "decode in the training layout.")


def compute_copy(config, params):
    """The params in `model.compute_dtype`, sharded as they are (the same arrays when it is the storage dtype)."""
    return cast_floating(params, COMPUTE_DTYPES[config.model.compute_dtype])


def sampler_copy(config, params):
    """The policy params (nnx.State) for the rollout sampler: cast to the compute dtype, in the sampler layout.

    The trainer's arrays are never donated or changed; in the "train" layout with the compute dtype equal to the
    storage dtype they are returned as they are.
    """
    if config.rollout.layout == "train":
        return compute_copy(config, params)
    mesh = weights_lib.decode_mesh(config.rollout.decode_tensor)
    return weights_lib.sampler_params(params, weights_lib.sampler_shardings(params, mesh),
                                      COMPUTE_DTYPES[config.model.compute_dtype])
