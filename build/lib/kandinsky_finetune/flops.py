"""A model's forward FLOPs (2 per multiply-add), counted by running it once: linear and convolution layers, plus
`paddle.matmul` calls (the attention products). Norms, activations and softmax are left out, as is usual for
model FLOP utilisation. benchmarks/run.py uses it for the encoder/model FLOP split and, on GPU, the MFU."""
import math

import paddle

# Training a model costs its forward plus a backward of about twice that; LoRA on a frozen base skips the
# base weights' gradients, about one forward fewer.
TRAIN_FACTOR = {"full": 3, "lora": 2}


def forward_flops(model, *args, call=None, **kwargs):
    """FLOPs of `call(*args, **kwargs)` (default: the model itself) in `model`'s layers and in paddle.matmul."""
    count = [0]

    def linear(layer, inputs, output):
        count[0] += 2 * output.size * layer.weight.shape[0]  # paddle keeps Linear weights as [in, out]

    def conv(layer, inputs, output):
        count[0] += 2 * output.size * math.prod(layer.weight.shape[1:])  # [out, in/groups, kh, kw]

    hooks = []
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, paddle.nn.Linear):
            hooks.append(layer.register_forward_post_hook(linear))
        elif isinstance(layer, paddle.nn.Conv2D):
            hooks.append(layer.register_forward_post_hook(conv))
    matmul = paddle.matmul

    def counted_matmul(x, y, transpose_x=False, transpose_y=False, name=None):
        out = matmul(x, y, transpose_x, transpose_y, name)
        count[0] += 2 * out.size * (x.shape[-2] if transpose_x else x.shape[-1])
        return out

    paddle.matmul = counted_matmul
    try:
        with paddle.no_grad():
            (call or model)(*args, **kwargs)
    finally:
        paddle.matmul = matmul
        for hook in hooks:
            hook.remove()
    return count[0]
