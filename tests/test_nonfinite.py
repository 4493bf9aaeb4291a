"""NonFiniteSteps: the device counters of skipped steps, their reads at log time and the steps they distrust."""
import random

import torch

from dsm_fast.nonfinite import NonFiniteSteps


def replay(steps: NonFiniteSteps, flags: list[bool]) -> None:
    for ok in flags:
        steps.update(torch.tensor(ok))


def test_counters_follow_a_random_sequence_of_skipped_steps(seed):
    """in_row, total and the longest run since the last read equal a plain Python count of the same flags."""
    rng = random.Random(seed)
    steps, in_row, total, longest = NonFiniteSteps("cpu", max_in_row=1000), 0, 0, 0
    for step in range(1, 200):
        ok = rng.random() < 0.6
        steps.update(torch.tensor(ok))
        in_row, total = (0 if ok else in_row + 1), total + (not ok)
        longest = max(longest, in_row)
        assert (steps.in_row, steps.total, int(steps.counts[2])) == (in_row, total, longest), f"seed {seed}"
        if step % 7 == 0:
            assert steps.read(step) is None
            longest = in_row  # a read restarts the longest run at the current one
            assert steps.trusted_until == step - in_row, f"seed {seed}"


def test_a_run_that_ended_before_the_read_still_stops_and_dates_the_divergence():
    """Bad steps 3, 4, 5 then good ones, read at step 8: the run stops, and the first distrusted step is 2 (state 2
    came from the last finite update), bounded by the previous read at step 2 (trusted_until)."""
    steps = NonFiniteSteps("cpu", max_in_row=3)
    replay(steps, [True, True])
    assert steps.read(2) is None and steps.trusted_until == 2
    replay(steps, [False, False, False, True, True, True])
    assert steps.read(8) == "3 non-finite losses in a row at step 8"
    assert steps.in_row == 0 and steps.first_distrusted(8) == 2
    assert steps.trusted_until == 2  # a stopping read trusts nothing new


def test_a_run_shorter_than_the_limit_moves_the_trust_forward():
    steps = NonFiniteSteps("cpu", max_in_row=3)
    replay(steps, [True, False, False, True])
    assert steps.read(4) is None and steps.trusted_until == 4
    replay(steps, [False, False])  # an ongoing run that began at step 5: states from 4 on are suspect
    assert steps.read(6) is None and steps.trusted_until == 4 and steps.first_distrusted(6) == 4
    assert steps.trusted_before(6) == 4
    replay(steps, [True])
    assert steps.trusted_before(7) == 8  # no ongoing run: every checkpoint up to now may be trusted


def test_state_round_trips_through_a_checkpoint():
    steps = NonFiniteSteps("cpu", max_in_row=10)
    replay(steps, [False, True, False, False])
    state = {**steps.state_dict(), "step": 4}
    assert state == {"bad_total": 3, "bad_in_row": 2, "step": 4}
    restored = NonFiniteSteps("cpu", max_in_row=10)
    restored.load_state_dict(state)
    assert torch.equal(restored.counts, torch.tensor([2, 3, 2])) and restored.trusted_until == 2
    restored.load_state_dict({"bad_total": 5, "step": 9})  # a checkpoint written before bad_in_row was saved
    assert (restored.in_row, restored.total, restored.trusted_until) == (0, 5, 9)
