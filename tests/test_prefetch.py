"""Reading ahead (prefetch.py): the next batch is built and encoded in a background thread, and training sees
exactly what the plain loop would: the same batches in the same order, the same errors at the same place, the
same trained weights; the thread's no_grad does not reach the training thread, and it stops with the loop."""
import threading

import numpy as np
import paddle
import pytest

import train_text_to_image_prior
from conftest import model_args, state_dict_of
from kandinsky_finetune import prefetch


def read_ahead_threads():
    return [t for t in threading.enumerate() if t.name == "read-ahead"]


def test_batches_arrive_prepared_and_in_order():
    assert list(prefetch.ahead(iter(range(20)), lambda x: 2 * x)) == [2 * x for x in range(20)]


@pytest.mark.parametrize("where", ["loading", "preparing"])
def test_an_error_is_raised_in_the_training_thread_after_the_batches_before_it(where):
    def batches():
        yield from range(3)
        if where == "loading":
            raise ValueError("row 3 is broken")
        yield 3

    def prepare(x):
        if x == 3:
            raise ValueError("row 3 is broken")
        return x

    seen = []
    with pytest.raises(ValueError, match="row 3 is broken"):
        for x in prefetch.ahead(batches(), prepare):
            seen.append(x)
    assert seen == [0, 1, 2]
    assert not read_ahead_threads()


def test_leaving_the_loop_early_stops_the_thread():
    batches = prefetch.ahead(iter(range(1000)), lambda x: x)
    assert next(batches) == 0
    batches.close()
    assert not read_ahead_threads()


def test_the_threads_no_grad_leaves_the_training_thread_computing_gradients():
    inside, leave = threading.Event(), threading.Event()

    def prepare(x):
        if x == 1:
            with paddle.no_grad():
                inside.set()
                leave.wait(30)
        return x

    batches = prefetch.ahead(iter(range(2)), prepare)
    assert next(batches) == 0  # the thread is now preparing batch 1, inside no_grad
    assert inside.wait(30)
    weight = paddle.create_parameter([3], "float32")
    (weight * 2).sum().backward()
    leave.set()
    assert weight.grad is not None and np.array_equal(weight.grad.numpy(), [2.0, 2.0, 2.0])
    assert list(batches) == [1]


def test_training_with_read_ahead_gives_the_plain_loops_weights(tiny, tmp_path, monkeypatch):
    def train(out):
        # 4 batches an epoch: steps 5 and 6 are read ahead across the epoch's end and past a validation
        train_text_to_image_prior.main(model_args(tiny, out, "--max_train_steps", 6, "--train_batch_size", 2,
                                                  "--lr_warmup_steps", 0, "--learning_rate", 1e-3,
                                                  "--validation_prompts", "a cat", "--validation_epochs", 1,
                                                  "--num_inference_steps", 2))
        return state_dict_of(out / "prior")

    ahead = train(tmp_path / "ahead")
    monkeypatch.setattr(prefetch, "ahead", lambda batches, prepare: (prepare(batch) for batch in batches))
    plain = train(tmp_path / "plain")
    assert ahead.keys() == plain.keys()
    assert all(np.array_equal(ahead[k], plain[k]) for k in ahead)


def test_paused_finishes_the_batch_in_flight_and_prepares_none_meanwhile():
    import time

    events = []

    def prepare(x):
        events.append(("start", x))
        time.sleep(0.05)
        events.append(("end", x))
        return x

    batches = prefetch.ahead(iter(range(10)), prepare)
    assert next(batches) == 0
    with batches.paused():
        events.append(("paused",))
        time.sleep(0.3)
        events.append(("resumed",))
    assert list(batches) == list(range(1, 10))
    inside = events[events.index(("paused",)):events.index(("resumed",)) + 1]
    assert inside == [("paused",), ("resumed",)]  # nothing prepared while paused, nothing left half-prepared
    before = events[:events.index(("paused",))]
    assert [e for e in before if e[0] == "start"] == [("start", x) for _, x in before if _ == "end"]


class Rows(paddle.io.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, key):
        epoch, row = key
        return {"key": np.array([epoch, row])}


def test_the_next_epochs_first_batch_is_prepared_while_this_epochs_last_trains():
    import time

    from kandinsky_finetune.loader import Loader, ShardedBatchSampler

    prepared = []

    def prepare(batch):
        prepared.append(batch["key"].numpy().tolist())
        return batch

    def keys(stream):
        return [b["key"].numpy().tolist() for b in stream]

    sampler = ShardedBatchSampler(6, 2, rank=0, world_size=1, seed=3)
    stream = Loader(Rows(), sampler, 0, prepare, read_ahead=True).epochs(0, 0, 3)
    first_epoch = [next(stream) for _ in range(sampler.batches_per_epoch)]
    deadline = time.time() + 10
    while len(prepared) <= sampler.batches_per_epoch and time.time() < deadline:
        time.sleep(0.01)
    assert {epoch for batch in prepared[sampler.batches_per_epoch:] for epoch, _ in batch} == {1}
    rest = keys(stream)
    plain = keys(Loader(Rows(), ShardedBatchSampler(6, 2, 0, 1, seed=3), 0).epochs(0, 0, 3))
    assert keys(first_epoch) + rest == plain and len(plain) == 9
    # resuming after one batch of epoch 1 continues the same stream
    assert keys(Loader(Rows(), ShardedBatchSampler(6, 2, 0, 1, seed=3), 0, read_ahead=True).epochs(1, 1, 3)) == plain[4:]
    assert not read_ahead_threads()
