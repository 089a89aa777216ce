"""Safetensors files written and read a tensor at a time: a model's or a training state's tensors never all sit in
host memory twice (safetensors' own writer, save_pretrained and paddle.save first copy every tensor to a host
array; safetensors' reader memory-maps the whole file, whose pages count as resident until it is closed)."""
import json
import struct

import numpy as np
import paddle

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def safetensors_header(path):
    with open(path, "rb") as f:
        return json.loads(f.read(_data_start(f) - 8))


def _data_start(f):
    """Where the tensors of the open safetensors file `f` start (after the length and the JSON header); from its
    beginning."""
    f.seek(0)
    (length,) = struct.unpack("<Q", f.read(8))
    return 8 + length


_SAFETENSORS_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                      "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a safetensors file, one tensor in host memory at a time (safetensors' own writer, and
    save_pretrained, first copy every tensor to a host array: a second copy of the whole model)."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.size * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_NAMES[str(tensor.dtype).replace("paddle.", "")],
                        "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors.values():
            tensor.numpy().tofile(f)  # (a bfloat16 tensor comes out as its raw 16-bit words)


def read_safetensors(path, skip=lambda name: False):
    """{name: tensor} of a safetensors file (but the names `skip` says), read a tensor at a time (on the current
    device)."""
    header = {k: v for k, v in safetensors_header(path).items() if not skip(k)}
    return {name: paddle.to_tensor(array) for name, array in _arrays(path, header)}


def map_safetensors(path):
    """{name: read-only numpy memory map} of a safetensors file: nothing is read until an array is used."""
    with open(path, "rb") as f:
        start = _data_start(f)
    return {name: np.memmap(path, dtype=_SAFETENSORS_DTYPES[info["dtype"]], mode="r", offset=start + info[
        "data_offsets"][0], shape=tuple(info["shape"])) for name, info in safetensors_header(path).items()
        if name != "__metadata__"}


def _arrays(path, header):
    """(name, numpy array) for each tensor of the file, read with plain file reads, one at a time."""
    with open(path, "rb") as f:
        data = _data_start(f)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            f.seek(data + start)
            yield name, np.fromfile(f, dtype=dtype, count=(end - start) // dtype.itemsize).reshape(info["shape"])


def read_safetensors_into(model, path, header=None):
    """Copy the tensors of safetensors file `path` into `model`'s parameters and buffers of the same names, one at a
    time. False, with nothing copied, when the file's names, shapes or dtypes do not fit the model."""
    header = dict(header or safetensors_header(path))
    header.pop("__metadata__", None)
    if any(info["dtype"] not in _SAFETENSORS_DTYPES for info in header.values()):
        return False
    return _fill(model, {k: info["shape"] for k, info in header.items()}, _arrays(path, header))


def fill_from_arrays(model, arrays):
    """The same from a {name: numpy array} dict, which is emptied as it goes (so memory moves, it does not grow)."""
    if not all(isinstance(a, np.ndarray) for a in arrays.values()):
        return False

    def handed_over():
        for name in list(arrays):
            yield name, arrays.pop(name)

    return _fill(model, {k: list(a.shape) for k, a in arrays.items()}, handed_over())


def _fill(model, shapes, named_arrays):
    live = model.state_dict()
    if set(shapes) != set(live) or any(list(live[k].shape) != list(shape) for k, shape in shapes.items()):
        return False
    trainable = {key: tensor.stop_gradient for key, tensor in live.items()}  # copy_ into a lazy parameter freezes it
    with paddle.no_grad():
        for key, array in named_arrays:
            value = paddle.Tensor(array, zero_copy=True)
            target = live[key]
            target.copy_(value if value.dtype == target.dtype else value.cast(target.dtype), False)
            target.stop_gradient = trainable[key]
    return True
