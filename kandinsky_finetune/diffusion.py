"""The diffusion objective: the prediction target of the scheduler's kind and the MSE loss with Min-SNR weighting."""
import paddle
import paddle.nn.functional as F

from .params import UsageError


def min_snr_weights(alphas_cumprod, timesteps, gamma, prediction_type):
    """Per-sample Min-SNR-gamma weights (Hang et al. 2023) for a loss on the given prediction type."""
    alpha_bar = alphas_cumprod.cast("float32")[timesteps]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = paddle.minimum(snr, paddle.full_like(snr, gamma))
    if prediction_type == "epsilon":
        # min(snr, g) / snr written without dividing when snr < g (snr can be 0 at the last timestep)
        return paddle.where(snr < gamma, paddle.ones_like(snr), gamma / snr)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def diffusion_loss(pred, target, timesteps, noise_scheduler, snr_gamma):
    """MSE per sample, Min-SNR weighted when snr_gamma is set, averaged over the batch."""
    per_sample = F.mse_loss(pred.cast("float32"), target.cast("float32"), reduction="none")
    per_sample = per_sample.reshape([per_sample.shape[0], -1]).mean(axis=1)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(noise_scheduler.alphas_cumprod, timesteps, snr_gamma,
                                                  noise_scheduler.config.prediction_type)
    return per_sample.mean()


def diffusion_target(noise_scheduler, clean, noise, timesteps):
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return clean
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    raise UsageError(f"unsupported scheduler prediction_type {kind!r}")
