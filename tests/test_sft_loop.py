"""sft_loop (train/sft.py): data order against an independent numpy reference, logging, budget, errors."""
import numpy as np
import pytest

from jaxrl_reason.train.sft import PlateauCheck, sft_loop


def _record(state, batch):
    return state + [batch["id_N"].tolist()], {"loss": float(len(state))}


def test_data_order_is_epochwise_permutations_with_the_remainder_skipped():
    n, b, steps, seed = 10, 3, 8, 7
    arrays = {"id_N": np.arange(n), "x_NxD": np.arange(2 * n).reshape(n, 2)}
    state, history = sft_loop(_record, [], arrays, steps=steps, batch_size=b, seed=seed, prepare_batch=lambda x: x,
                              log_every=3, log_fn=lambda s: None)
    rng = np.random.default_rng([seed, 2])
    expected = []
    while len(expected) < steps:   # 3 full batches per epoch of 10 rows, the 10th row of each epoch skipped
        perm = rng.permutation(n)
        expected += [perm[i * b:(i + 1) * b].tolist() for i in range(n // b)]
    assert state == expected[:steps]
    assert [h["step"] for h in history] == [1, 3, 6] and [h["loss"] for h in history] == [0.0, 2.0, 5.0]


def test_prepare_batch_sees_the_sliced_rows():
    arrays = {"id_N": np.arange(4)}
    state, _ = sft_loop(_record, [], arrays, steps=2, batch_size=4, seed=0,
                        prepare_batch=lambda x: {"id_N": x["id_N"] * 10}, log_fn=lambda s: None)
    assert sorted(state[0]) == [0, 10, 20, 30] and sorted(state[1]) == [0, 10, 20, 30]


def test_time_budget_stops_after_the_step_that_exceeds_it():
    logs = []
    state, _ = sft_loop(_record, [], {"id_N": np.arange(4)}, steps=5, batch_size=2, seed=0,
                        prepare_batch=lambda x: x, time_budget_s=1e-12, log_fn=logs.append)
    assert len(state) == 1 and "time budget reached at step 1" in logs[-1]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="first dimension"):
        sft_loop(_record, [], {"a": np.zeros(3), "b": np.zeros(4)}, steps=1, batch_size=1, seed=0,
                 prepare_batch=lambda x: x)
    with pytest.raises(ValueError, match="batch_size"):
        sft_loop(_record, [], {"a": np.zeros(3)}, steps=1, batch_size=4, seed=0, prepare_batch=lambda x: x)


def test_check_fn_stops_the_loop_after_the_step_it_returns_true():
    seen = []

    def check(step, state):
        seen.append((step, len(state)))
        return step == 4

    state, _ = sft_loop(_record, [], {"id_N": np.arange(6)}, steps=10, batch_size=2, seed=0,
                        prepare_batch=lambda x: x, log_fn=lambda s: None, check_every=2, check_fn=check)
    assert seen == [(2, 2), (4, 4)] and len(state) == 4


def test_plateau_check_by_hand():
    class S:
        params = None

    scores = iter([0.50, 0.60, 0.605, 0.612, 0.615, 0.60])
    check = PlateauCheck(lambda p: next(scores), patience=2, min_delta=0.01, log_fn=lambda s: None)
    # 0.50 best; 0.60 new best; 0.605 < 0.61 stale 1 (best stays 0.60); 0.612 >= 0.61 new best (stale 0);
    # 0.615 < 0.622 stale 1; 0.60 stale 2. (Had the sub-delta 0.605 moved the best, 0.612 < 0.615 would stop at 4.)
    stops = [check(step, S()) for step in (1, 2, 3, 4, 5, 6)]
    assert stops == [False, False, False, False, False, True]
    assert check.best == 0.612 and [s for s, _ in check.history] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="patience"):
        PlateauCheck(lambda p: 0.0, patience=0, min_delta=0.0)
