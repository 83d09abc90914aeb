"""Batched sampling: every row's token equals what transformers' own processors and a per-request generator give
for that row alone, whatever else is in the batch."""

import pytest
import torch

from idefics_cog.serving.jobs import Job, Sampling
from idefics_cog.serving.sampler import BatchSampler
from idefics_cog.serving.jobs import Row
from tests.support.sampling import BANNED, ENGINE, SETTINGS, batched_against_alone, reference_pick


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("vocab", [451, 32002])
def test_batched_picks_equal_each_row_alone(vocab, device):
    assert batched_against_alone(device, vocab) == []


def test_greedy_rows_never_pick_a_banned_id():
    """A greedy batch bans the ids only when an argmax lands on one: then the rows take the reference's next best
    (also when the banned id's score is the largest, tied, or nan, and under a repetition penalty)."""
    vocab = 451
    torch.manual_seed(2)
    rows = [Row(Job(None, s), [1, 2, 3], 99, ENGINE, slot) for slot, s in enumerate(SETTINGS[:2] * 2)]
    sampler = BatchSampler(len(rows), BANNED, torch.device("cpu"))
    for step in range(16):
        logits = torch.randn(len(rows), vocab)
        row = step % len(rows)  # each row meets each kind of leading banned score
        logits[row, BANNED[step % 2]] = [50.0, logits[row].max(), float("nan"), 50.0][step // len(rows)]
        expected = [reference_pick(row.sampling, row.ids, logits[i:i + 1], None) for i, row in enumerate(rows)]
        tokens, errors = sampler.pick(rows, logits.clone())
        assert errors == {} and tokens == expected and not set(tokens) & set(BANNED), f"step {step}"
        for row, token in zip(rows, tokens):
            row.ids.append(token)


def test_a_rows_samples_do_not_depend_on_its_batch():
    """The same sampled request, alone and beside others in other slots: the same tokens."""
    vocab, steps = 451, 30
    torch.manual_seed(1)
    logits = torch.randn(steps, len(SETTINGS), vocab) * 3

    def run(slots: list[int]) -> list[int]:
        rows = [Row(Job(None, SETTINGS[i]), [1, 2, 3], 99, ENGINE, slot) for slot, i in enumerate(slots)]
        sampler, out = BatchSampler(len(SETTINGS), BANNED, torch.device("cpu")), []
        for step in range(steps):
            tokens, _ = sampler.pick(rows, logits[step, slots].clone())
            out.append(tokens[slots.index(5)])
            for row, token in zip(rows, tokens):
                row.ids.append(token)
        return out

    alone = run([5])
    assert run([2, 5, 0, 7]) == alone == run([5, 3, 4, 6, 1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_failing_draw_fails_that_row_alone(bad):
    """A sampled row whose probabilities are nan (its scores hold a nan or +inf, or are all -inf) fails alone;
    a row that draws id 0 from valid probabilities does not."""
    rows = [Row(Job(None, s), [1, 2], 9, ENGINE, slot) for slot, s in enumerate(SETTINGS[:5])]
    logits = torch.randn(5, 50)
    logits[3, :] = bad if bad < 0 else logits[3]
    logits[3, 7] = bad
    logits[4, 0] = 60.0  # a sampled row whose likeliest id is 0
    tokens, errors = BatchSampler(5, BANNED, torch.device("cpu")).pick(rows, logits)
    assert list(errors) == [3] and tokens[3] is None and None not in tokens[:3] and tokens[4] == 0
    assert "nan" in str(errors[3])


def test_a_row_moved_into_a_freed_slot_keeps_its_repetition_penalty_history():
    """The scheduler moves a row into a freed slot (BatchSampler.move, the row's new slot): its next picks read and
    mark its own history there, also when it was picked alone just before (a batch of the same rows)."""
    vocab = 451
    torch.manual_seed(3)
    penalized = Sampling(repetition_penalty=1.5)
    sampler = BatchSampler(3, BANNED, torch.device("cpu"))
    moved = Row(Job(None, penalized), [1, 2, 3], 99, ENGINE, 1)
    expected_ids = list(moved.ids)

    def step(rows):
        logits = torch.randn(len(rows), vocab) * 2
        logits[:, expected_ids] += 3  # its own tokens lead, so the penalty decides the pick
        expected = reference_pick(penalized, expected_ids, logits[rows.index(moved):rows.index(moved) + 1], None)
        tokens, _ = sampler.pick(rows, logits)
        for row, token in zip(rows, tokens):
            row.ids.append(token)
        expected_ids.append(expected)
        assert moved.ids == expected_ids

    for _ in range(3):
        step([moved])  # alone, in slot 1
    sampler.move(1, 0)  # the row in slot 0 ended: this one moves there
    moved.slot = 0
    for _ in range(3):
        step([moved])
    newcomer = Row(Job(None, penalized), [7, 8], 99, ENGINE, 1)  # a new request takes slot 1
    for _ in range(6):
        step([moved, newcomer])


def test_a_temperature_too_small_to_sample_samples_at_the_smallest_that_does():
    """Logits divided by 1e-40 overflow to inf and the draw becomes NaN: such temperatures sample at 0.01."""
    from idefics_cog.serving.jobs import MIN_TEMPERATURE, Sampling

    assert Sampling(temperature=1e-40).temperature == MIN_TEMPERATURE == 0.01
    assert Sampling(temperature=0).temperature == 0.0 and Sampling(temperature=0.5).temperature == 0.5
