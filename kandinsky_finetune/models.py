"""Loading Kandinsky 2.2 components from a hub id or a local folder, with one clear line when that fails, and
without a second copy of a model's weights in memory."""
import contextlib
import functools
import glob
import os

import paddle

from . import tensor_files
from .params import UsageError

PRIOR_SUBFOLDERS = ("prior", "image_encoder", "text_encoder", "tokenizer", "scheduler", "image_processor")
DECODER_SUBFOLDERS = ("unet", "movq", "scheduler")
PRIOR_FLAG, DECODER_FLAG = "--pretrained_prior_model_name_or_path", "--pretrained_decoder_model_name_or_path"


def check_repo(path, subfolders, flag, needed=None):
    """A local folder must have the repo's subfolders (of them, `needed` at least: the memory plan's models);
    anything else is treated as a hub id."""
    if os.path.isdir(path):
        missing = [s for s in subfolders if not os.path.isdir(os.path.join(path, s))]
        if missing and set(missing) & set(needed or subfolders):
            raise UsageError(f"{flag} {path} is not a Kandinsky 2.2 repo: missing subfolder(s) {', '.join(missing)} "
                             f"(expected {', '.join(subfolders)})")
    elif os.path.exists(path) or path.startswith((".", "/", "~")):
        raise UsageError(f"{flag} {path}: no such folder")


def load(cls, repo, subfolder, flag, cache_dir=None):
    """`cls.from_pretrained(repo, subfolder=...)`: the same call for a hub id and a local folder. A model is built
    without initialising its weights and then filled, so loading holds its weights once (see `_load_model`)."""
    try:
        if isinstance(cls, type) and issubclass(cls, paddle.nn.Layer):
            return _load_model(cls, repo, subfolder, cache_dir)
        return cls.from_pretrained(repo, subfolder=subfolder, cache_dir=cache_dir)
    except Exception as e:  # hub, file and config errors all end the run the same way
        raise cannot_load(e, subfolder, flag, repo) from None


def cannot_load(error, subfolder, flag, repo):
    """The one-line error of a component that cannot be loaded."""
    reason = (str(error).strip().splitlines() or [""])[0]
    return UsageError(f"cannot load {subfolder} of {flag} {repo}: {type(error).__name__}: {reason}")


def _load_model(cls, repo, subfolder, cache_dir):
    """A model from one Paddle-layout weights file in a local folder is built lazily (no random initialisation) and
    filled one tensor at a time: from safetensors with plain file reads, its peak is its weights plus one tensor;
    from a .pdparams pickle, read once and handed over tensor by tensor, about the same. By default from_pretrained
    initialises the model at random and reads the whole file beside it (2x the weights, and at real size half a
    minute per encoder); its low_cpu_mem_usage path memory-maps a whole safetensors file (whose pages count as
    resident until it is closed) and reads a pickle twice. Anything else (a hub id, shards, PyTorch layout,
    renamed keys) goes through from_pretrained's low_cpu_mem_usage path."""
    folder = os.path.join(repo, subfolder)
    files = glob.glob(os.path.join(folder, "*.safetensors")) if os.path.isdir(folder) else []
    pickles = glob.glob(os.path.join(folder, "*.pdparams")) if os.path.isdir(folder) else []
    if len(files) + len(pickles) == 1 and not glob.glob(os.path.join(folder, "*.index.json")):
        model = lazy_model(cls, folder)
        if files:
            header = tensor_files.safetensors_header(files[0])
            filled = (header.pop("__metadata__", {}) or {}).get("format", "pt") in ("pd", "np") and \
                tensor_files.read_safetensors_into(model, files[0], header)
        else:  # a pickle is read whole, once, and handed over a tensor at a time
            filled = tensor_files.fill_from_arrays(model, paddle.load(pickles[0], return_numpy=True))
        if filled:
            model.eval()
            return model
    model = cls.from_pretrained(repo, subfolder=subfolder, cache_dir=cache_dir, low_cpu_mem_usage=True)
    # That path leaves every parameter frozen; these models have none frozen by construction (the scripts freeze)
    for p in model.parameters():
        p.stop_gradient = False
    return model


def lazy_model(cls, repo, subfolder=None, cache_dir=None, flag=None):
    """`cls` built from its config in `repo`/`subfolder`, without memory or initial values (see `lazy_init`). With
    `flag`, a config that cannot be read is the error loading the model would give."""
    where = {"subfolder": subfolder, "cache_dir": cache_dir} if subfolder else {"cache_dir": cache_dir}
    try:
        config = (cls.load_config(repo, **where) if hasattr(cls, "load_config")  # ppdiffusers models
                  else cls.config_class.from_pretrained(repo, **where))  # paddlenlp-style models (CLIP)
    except Exception as e:
        if flag is None:
            raise
        raise cannot_load(e, subfolder, flag, repo) from None
    # Its own name generator: parameter names come from a process-wide counter, and the optimizer state in a
    # checkpoint is keyed by them; a plan that counted other models (validation's) would rename the trained model's
    # parameters, and a run resumed with other flags would not find its optimizer state.
    with lazy_init(), paddle.utils.unique_name.guard():
        return cls.from_config(config) if hasattr(cls, "load_config") else cls(config)


def lazy_init():
    """Models built inside have their parameters' shapes but neither memory nor initial values (Paddle's LazyGuard;
    paddlenlp's no_init_weights skips the models' own init code)."""
    from paddlenlp.transformers.model_utils import no_init_weights

    stack = contextlib.ExitStack()
    stack.enter_context(paddle.LazyGuard())
    stack.enter_context(no_init_weights(_enable=True))
    return stack


def save_model(model, folder):
    """What `save_pretrained` writes for a ppdiffusers model (its config and one Paddle-layout safetensors file),
    written a tensor at a time."""
    from ppdiffusers.utils.constants import PADDLE_SAFETENSORS_WEIGHTS_NAME

    os.makedirs(folder, exist_ok=True)
    model.save_config(folder)
    tensor_files.write_safetensors(model.state_dict(), os.path.join(folder, PADDLE_SAFETENSORS_WEIGHTS_NAME), {"format": "pd"})


def release(c, *names):
    """Drop the frozen models `names` of component namespace `c` from memory (they can be loaded again by
    `loaded`, from `c.loaders`)."""
    import gc

    for name in names:
        setattr(c, name, None)
    gc.collect()
    if "gpu" in paddle.get_device():
        paddle.device.cuda.empty_cache()  # give the memory back to the device, not only to Paddle's allocator
    else:
        _return_free_heap()


def _return_free_heap():
    """On Linux, hand the C heap's free pages back to the system: a released model's smaller tensors leave holes in
    the heap that the process would otherwise keep (and count in its RSS) while larger tensors are allocated anew."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextlib.contextmanager
def loaded(c, names, keep):
    """The models `names` of `c` in memory for a while: any that is not is loaded from `c.loaders`, and released
    again afterwards unless `keep`."""
    missing = [name for name in names if getattr(c, name, None) is None]
    for name in missing:
        setattr(c, name, c.loaders[name]())
    try:
        yield c
    finally:
        if not keep:
            release(c, *missing)


def movq_downscale_factor(movq):
    return 2 ** (len(movq.config.block_out_channels) - 1)


def config_of(cls, repo, subfolder, flag, cache_dir=None):
    """The config of model class `cls` in `repo`/`subfolder` as a dict, read from the config file alone (no weights)."""
    try:
        if hasattr(cls, "load_config"):  # ppdiffusers models
            return dict(cls.load_config(repo, subfolder=subfolder, cache_dir=cache_dir))
        return cls.config_class.from_pretrained(repo, subfolder=subfolder, cache_dir=cache_dir).to_dict()
    except Exception as e:
        raise cannot_load(e, subfolder, flag, repo) from None


def movq_downscale_factor_of_repo(repo, flag, cache_dir=None):
    """The factor from the decoder repo's movq/config.json, without loading the weights."""
    from ppdiffusers import VQModel

    return 2 ** (len(config_of(VQModel, repo, "movq", flag, cache_dir)["block_out_channels"]) - 1)


def check_pair(prior_repo, decoder_repo, cache_dir=None):
    """The prior's image embeddings (its CLIP image encoder's projection_dim, the prior's embedding_dim) must have
    the size the decoder's UNet takes (encoder_hid_dim), e.g. not a Kandinsky 2.1 prior (768) with the 2.2 decoder
    (1280). Read from the config files, so a mismatch stops the run before any weights load, not at its first
    step inside the UNet."""
    from ppdiffusers import PriorTransformer, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPVisionModelWithProjection

    takes = config_of(UNet2DConditionModel, decoder_repo, "unet", DECODER_FLAG, cache_dir).get("encoder_hid_dim")
    sizes = [(config_of(CLIPVisionModelWithProjection, prior_repo, "image_encoder", PRIOR_FLAG, cache_dir)
              .get("projection_dim"), "image_encoder projection_dim"),
             (config_of(PriorTransformer, prior_repo, "prior", PRIOR_FLAG, cache_dir).get("embedding_dim"),
              "prior embedding_dim")]
    for size, where in sizes:
        if size != takes:
            raise UsageError(f"the prior and the decoder do not belong together: {PRIOR_FLAG} {prior_repo} makes "
                             f"{size}-dim image embeddings ({where}), the UNet of {DECODER_FLAG} {decoder_repo} "
                             f"takes {takes}-dim ones (unet encoder_hid_dim)")


def check_resolution(resolution, factor, what):
    if resolution % factor:
        raise UsageError(f"--resolution {resolution} is not a multiple of the MoVQ downscale factor {factor} "
                         f"({what}); try {max(factor, resolution // factor * factor)}")

def memory_efficient_attention(model, wanted, log):
    """--enable_xformers_memory_efficient_attention: Paddle's memory-efficient scaled-dot-product attention, where
    this device and build have it (ppdiffusers checks by running the kernel once)."""
    from ppdiffusers.utils import is_ppxformers_available

    if not wanted:
        return
    if is_ppxformers_available():
        model.enable_xformers_memory_efficient_attention()
    else:
        log.warn("--enable_xformers_memory_efficient_attention: Paddle's memory-efficient attention is not available "
                 f"on {paddle.get_device()} with this Paddle build; using standard attention")


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


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.stop_gradient = True
    return model


def frozen(model, precision):
    """A frozen model as the run uses it: no gradients, eval mode, in the run's low precision under
    --mixed_precision, without the attention layers' no-op upcasts in fp32."""
    freeze(model)
    precision.cast_frozen(model)
    skip_fp32_upcasts(precision, model)
    return model


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
