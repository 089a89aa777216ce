"""A checkpoint's training state (optimizer, lr schedule, EMA, loss scaler, step, seed, number of processes): its
tensors streamed to `training_state.safetensors`, the rest pickled to `training_state.pdparams`; and read back."""
import os

import paddle

from .sharded_checkpoint import is_tensor

STATE_FILE = "training_state.pdparams"  # step, seed, schedules; written last of all, so it marks a complete checkpoint
STATE_TENSORS = "training_state.safetensors"  # the optimizer's and EMA's tensors, written a tensor at a time
_TENSOR = "__tensor__"  # stands in STATE_FILE for a tensor kept in STATE_TENSORS
def write_state(state, folder):
    """The training state: its tensors (AdamW's moments, EMA weights: 12 bytes per trained parameter) streamed to
    STATE_TENSORS, the rest pickled to STATE_FILE. paddle.save of the whole state would hold a host copy of every
    tensor until the file is complete (its pickler keeps them), twice the optimizer's memory at real size."""
    from .tensor_files import write_safetensors

    tensors = {}
    skeleton = _split(state, "", tensors)
    write_safetensors(tensors, os.path.join(folder, STATE_TENSORS))
    paddle.save(skeleton, os.path.join(folder, STATE_FILE))


def load_state(path, mapped_optimizer=False):
    """The training state written by `write_state` (or, from older checkpoints, pickled whole). With
    `mapped_optimizer`, the optimizer's tensors are read-only memory maps of the file, read only when the optimizer
    takes them: a sharded run's process reads its own part of the moments, not every process all of them (and none
    of them sits on the device before the optimizer does)."""
    state = paddle.load(os.path.join(path, STATE_FILE))
    tensors_file = os.path.join(path, STATE_TENSORS)
    if not os.path.isfile(tensors_file):
        return state
    from .tensor_files import map_safetensors, read_safetensors

    optimizer = "/optimizer/"
    tensors = read_safetensors(tensors_file, skip=lambda name: mapped_optimizer and name.startswith(optimizer))
    if mapped_optimizer:
        tensors.update((k, v) for k, v in map_safetensors(tensors_file).items() if k.startswith(optimizer))
    return _join(state, tensors.__getitem__)


def _split(obj, path, tensors):
    """`obj` with each tensor replaced by {_TENSOR: its path}, the tensors collected in `tensors` by path."""
    if is_tensor(obj):
        tensors[path] = obj
        return {_TENSOR: path}
    if isinstance(obj, dict):
        return {k: _split(v, f"{path}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj))
    return obj


def _join(obj, tensor):
    if isinstance(obj, dict):
        if obj.keys() == {_TENSOR}:
            return tensor(obj[_TENSOR])
        return {k: _join(v, tensor) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join(v, tensor) for v in obj)
    return obj
