"""Precision and device settings: --mixed_precision (autocast, loss scaling) and --allow_tf32."""
import contextlib

import paddle

from .params import UsageError


def on_gpu():
    return "gpu" in paddle.get_device()


class Precision:
    """--mixed_precision: autocast (O1) in fp16/bf16 with a dynamic loss scaler for fp16; trainable weights
    stay fp32. Paddle's autocast does nothing on CPU, so there the run says so and trains in fp32."""

    def __init__(self, mode, log):
        self.mode, self.enabled = mode, mode != "no" and on_gpu()
        if mode != "no" and not self.enabled:
            log.warn(f"--mixed_precision {mode} needs a GPU (Paddle's autocast is a no-op on "
                     f"{paddle.get_device()}); training in fp32")
        if self.enabled and mode == "bf16" and not paddle.amp.is_bfloat16_supported():
            raise UsageError("--mixed_precision bf16: this GPU does not support bfloat16; use fp16")
        self.dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(mode) if self.enabled else "float32"
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=2.0 ** 15) if self.enabled and mode == "fp16" else None

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, dtype=self.dtype, level="O1")

    def cast_frozen(self, *models):
        """Frozen models run in the low precision to save memory; nothing trains in it, and outputs take the frozen
        components from their source files (output.py), never from these copies."""
        if self.enabled:
            for m in models:
                m.to(dtype=self.dtype)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer):
        """fp16: divide the gradients by the loss scale now, so clipping sees their true norm."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer):
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self):
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state):
        if self.scaler and state:
            self.scaler.load_state_dict(state)




def configure_tf32(allow_tf32, log):
    """As the references' flag (PyTorch's matmul switch): TF32 matmuls (cuBLAS) only with --allow_tf32, where Paddle's
    GPU build allows them by default. cuDNN convolutions keep Paddle's default, TF32 allowed, which is PyTorch's default
    too (the references leave it). Paddle's own switch, set before any GPU kernel runs."""
    if not on_gpu():
        if allow_tf32:
            log.warn("--allow_tf32 only affects NVIDIA GPUs; ignored on " + paddle.get_device())
        return
    paddle.base.core.set_cublas_switch(allow_tf32)
