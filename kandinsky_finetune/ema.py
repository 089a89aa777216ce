"""--use_ema: the exponential moving average of the trained weights, and putting it into the model for a while."""
import contextlib


def build_ema(parameters, use_ema):
    if not use_ema:
        return None
    from ppdiffusers.training_utils import EMAModel

    return EMAModel(parameters)


@contextlib.contextmanager
def ema_weights(ema, parameters):
    """Put the EMA weights into the live model for a while (validation, the checkpoint's EMA copy)."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)
