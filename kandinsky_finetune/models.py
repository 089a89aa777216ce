"""Loading Kandinsky 2.2 components from a hub id or a local folder, with one clear line when that fails."""
import functools
import os

import paddle

from .params import UsageError

PRIOR_SUBFOLDERS = ("prior", "image_encoder", "text_encoder", "tokenizer", "scheduler", "image_processor")
DECODER_SUBFOLDERS = ("unet", "movq", "scheduler")


def check_repo(path, subfolders, flag):
    """A local folder must have the repo's subfolders; anything else is treated as a hub id."""
    if os.path.isdir(path):
        missing = [s for s in subfolders if not os.path.isdir(os.path.join(path, s))]
        if missing:
            raise UsageError(f"{flag} {path} is not a Kandinsky 2.2 repo: missing subfolder(s) {', '.join(missing)} "
                             f"(expected {', '.join(subfolders)})")
    elif os.path.exists(path) or path.startswith((".", "/", "~")):
        raise UsageError(f"{flag} {path}: no such folder")


def load(cls, repo, subfolder, flag, cache_dir=None):
    """`cls.from_pretrained(repo, subfolder=...)`: the same call for a hub id and a local folder."""
    try:
        return cls.from_pretrained(repo, subfolder=subfolder, cache_dir=cache_dir)
    except Exception as e:  # hub, file and config errors all end the run the same way
        reason = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(f"cannot load {subfolder} of {flag} {repo}: {type(e).__name__}: {reason}") from None


def movq_downscale_factor(movq):
    return 2 ** (len(movq.config.block_out_channels) - 1)


def movq_downscale_factor_of_repo(repo, flag, cache_dir=None):
    """The factor from the decoder repo's movq/config.json, without loading the weights."""
    from ppdiffusers import VQModel

    try:
        config = VQModel.load_config(repo, subfolder="movq", cache_dir=cache_dir)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(f"cannot load movq of {flag} {repo}: {type(e).__name__}: {reason}") from None
    return 2 ** (len(config["block_out_channels"]) - 1)


def check_resolution(resolution, factor, what):
    if resolution % factor:
        raise UsageError(f"--resolution {resolution} is not a multiple of the MoVQ downscale factor {factor} "
                         f"({what}); try {max(factor, resolution // factor * factor)}")


def enable_prior_gradient_checkpointing(prior):
    """PriorTransformer has no gradient-checkpointing switch: recompute each transformer block in backward.
    Non-reentrant recompute, because the reentrant kind gives no gradient to LoRA layers of a frozen block."""
    for block in prior.transformer_blocks:
        block.forward = functools.partial(_recomputed, block.forward)


def _recomputed(forward, *args, **kwargs):
    if not paddle.is_grad_enabled():
        return forward(*args, **kwargs)
    from paddle.distributed.fleet.utils import recompute

    return recompute(forward, *args, use_reentrant=False, **kwargs)


def skip_fp32_upcasts(precision, *models):
    """Kandinsky's attention layers upcast scores to fp32 for the softmax and cast back. In an fp32 run both casts
    are copies that change nothing (a tenth of a tiny decoder step on CPU): turn them off there. With
    --mixed_precision they stay, since there they matter."""
    from ppdiffusers.models.attention_processor import Attention

    if precision.enabled:
        return
    for model in models:
        for _, layer in model.named_sublayers():
            if isinstance(layer, Attention):
                layer.upcast_softmax = layer.upcast_attention = False
