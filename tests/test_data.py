"""The sampler shards and reshuffles per epoch, resumes mid-epoch, and a sample's random draws depend only
on (seed, epoch, row), never on batching."""
import numpy as np
import pytest

from kandinsky_finetune.data import ShardedBatchSampler, pick_caption, sample_rng


def epoch_rows(sampler, epoch, skip=0):
    sampler.set_epoch(epoch, skip)
    return [row for batch in sampler for (_, row) in batch]


def test_ranks_get_disjoint_shards_covering_the_data():
    ranks = [ShardedBatchSampler(10, 2, rank, 2, seed=3) for rank in range(2)]
    rows = [epoch_rows(s, 0) for s in ranks]
    assert len(rows[0]) == len(rows[1]) == 5 and set(rows[0]).isdisjoint(rows[1])
    assert sorted(rows[0] + rows[1]) == list(range(10))


def test_uneven_data_gives_every_rank_the_same_number_of_batches():
    ranks = [ShardedBatchSampler(7, 2, rank, 2, seed=0) for rank in range(2)]
    assert [len(list(s)) for s in ranks] == [2, 2]


def test_each_epoch_is_shuffled_differently_and_resume_skips_done_batches():
    s = ShardedBatchSampler(20, 4, 0, 1, seed=0)
    e0, e1 = epoch_rows(s, 0), epoch_rows(s, 1)
    assert sorted(e0) == sorted(e1) == list(range(20)) and e0 != e1
    assert epoch_rows(s, 1, skip=2) == e1[8:]
    assert len(s) == 3


def test_sample_draws_depend_only_on_seed_epoch_row():
    a, b = sample_rng(0, 1, 5).standard_normal(4), sample_rng(0, 1, 5).standard_normal(4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sample_rng(0, 2, 5).standard_normal(4))


def test_captions_string_or_list_picked_at_random():
    assert pick_caption("a cat", np.random.default_rng(0), 0) == "a cat"
    picks = {pick_caption(["a", "b", "c"], np.random.default_rng(i), 0) for i in range(30)}
    assert picks == {"a", "b", "c"}
    with pytest.raises(ValueError, match="row 7"):
        pick_caption(None, np.random.default_rng(0), 7)
