"""The decoder's training task, shared by the full and the LoRA decoder scripts: its components, how a
sample is prepared, the loss, and the pipelines built around the UNet being trained.

Math: MoVQ latents of the image in [-1, 1] (no scaling factor) are noised with the decoder repo's DDPM
schedule; the UNet sees no text, only the CLIP image embedding of the same image, and its first 4 output
channels predict the noise (the other 4, a learned variance, are not trained by this loss).
"""
import contextlib
from types import SimpleNamespace

import numpy as np
import paddle

from . import buckets, data, diffusion, models
from .loader import as_tensor
from .models import DECODER_FLAG, PRIOR_FLAG


ENCODERS = ("image_encoder", "movq")
PRIOR_PARTS = ("prior_prior", "prior_text_encoder", "prior_tokenizer", "prior_scheduler")


def load_components(args, precision):
    """The decoder's components in a namespace. MoVQ and the CLIP image encoder are frozen (in half precision under
    --mixed_precision); `c.loaders` can load them again once `cached_dataset` has released them. The rest of the
    prior, which only validation uses, is loaded (frozen too) for each validation. The UNet itself is loaded by
    `load_trained`, once the data is ready."""
    from ppdiffusers import DDPMScheduler, PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, VQModel
    from ppdiffusers.transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                                          CLIPVisionModelWithProjection)

    decoder_repo, prior_repo = args.pretrained_decoder_model_name_or_path, args.pretrained_prior_model_name_or_path
    models.check_repo(decoder_repo, models.DECODER_SUBFOLDERS, DECODER_FLAG)
    models.check_repo(prior_repo, models.PRIOR_SUBFOLDERS, PRIOR_FLAG)
    models.check_pair(prior_repo, decoder_repo, args.cache_dir)
    load = lambda cls, sub: models.load(cls, decoder_repo, sub, DECODER_FLAG, args.cache_dir)  # noqa: E731
    load_prior = lambda cls, sub: models.load(cls, prior_repo, sub, PRIOR_FLAG, args.cache_dir)  # noqa: E731

    c = SimpleNamespace(
        noise_scheduler=load(DDPMScheduler, "scheduler"),
        image_processor=load_prior(CLIPImageProcessor, "image_processor"),
        loaders={"image_encoder": lambda: models.frozen(load_prior(CLIPVisionModelWithProjection, "image_encoder"),
                                                        precision),
                 "movq": lambda: models.frozen(load(VQModel, "movq"), precision),
                 "prior_prior": lambda: models.frozen(load_prior(PriorTransformer, "prior"), precision),
                 "prior_text_encoder": lambda: models.frozen(load_prior(CLIPTextModelWithProjection, "text_encoder"),
                                                             precision),
                 "unet": lambda: load(UNet2DConditionModel, "unet"),
                 "prior_tokenizer": lambda: load_prior(CLIPTokenizer, "tokenizer"),
                 "prior_scheduler": lambda: load_prior(UnCLIPScheduler, "scheduler")},
        **dict.fromkeys(PRIOR_PARTS))
    c.image_encoder, c.movq = c.loaders["image_encoder"](), c.loaders["movq"]()
    c.factor = models.movq_downscale_factor(c.movq)
    models.check_resolution(args.resolution, c.factor, "training images")
    if args.enable_bucket:
        unet_levels = len(models.config_of(UNet2DConditionModel, decoder_repo, "unet", DECODER_FLAG,
                                           args.cache_dir)["block_out_channels"])
        buckets.check_args(args, buckets.grid_of(c.factor, unet_levels))
    return c


def bucket_shapes(ds, args, log):
    """--enable_bucket: each image's bucket (width, height) in the dataset's order, read from the image headers, and
    the bucket table logged; None without it (every image trains as a --resolution square)."""
    if not args.enable_bucket:
        return None
    shapes = buckets.assign(data.image_sizes(ds, args.image_column), args,
                            names=lambda row: data.image_name(ds, args.image_column, row))
    log(buckets.table(shapes))
    return shapes


def validation_sizes(args, shapes):
    """The (width, height) pairs validation generates at: the --resolution square, and with buckets the size most
    images trained at."""
    sizes = [(args.resolution, args.resolution)]
    if shapes and buckets.most_common(shapes) not in sizes:
        sizes.append(buckets.most_common(shapes))
    return sizes


def load_trained(c, precision):
    """The UNet to train, into `c.unet`: loaded after `cached_dataset` has released the encoders, so with
    --cache_encoder_outputs the two never share memory (the run peaks at the larger of encoding and training)."""
    c.unet = c.loaders.pop("unet")()
    models.skip_fp32_upcasts(precision, c.unet)
    return c.unet


def encode(c, precision, pixel_values, clip_pixel_values):
    """The frozen encoders' outputs: (MoVQ latents, CLIP image_embeds), in float32."""
    with paddle.no_grad(), precision.autocast():
        latents = c.movq.encode(as_tensor(pixel_values)).latents
        image_embeds = c.image_encoder(as_tensor(clip_pixel_values)).image_embeds
    return latents.cast("float32"), image_embeds.cast("float32")


def cached_dataset(ds, args, c, run):
    """--cache_encoder_outputs: ds's images replaced by the encoders' outputs for each view a step can draw
    (the image, and its mirror image with --random_flip). When the augmentation cannot be cached exactly
    (--random_crop of an image that is not square), ds itself, after a one-line warning. Once the outputs are cached,
    training needs the encoders no more: they are released (validation and the final save load them again)."""
    import datasets

    from . import cache

    candidates = buckets.sizes(args) if args.enable_bucket else None
    shape_of = (lambda size: buckets.bucket_of(size, args, candidates)) if args.enable_bucket else (lambda size: None)
    if args.random_crop and any(data.crop_size(size, shape_of(size)) != size
                                for size in data.image_sizes(ds, args.image_column)):
        run.log.warn("--cache_encoder_outputs: --random_crop of images larger than their crop (not square, or not of "
                     "their bucket's aspect ratio) cannot be cached exactly (drop --random_crop for the default centre "
                     "crop); training without the cache")
        return ds
    flips = [False, True] if args.random_flip else [False]

    def encode_batch(batch):
        inputs, sizes = [], []
        for image in batch[args.image_column]:
            sizes.append(list(image.size))
            shape = shape_of(image.size)
            center = data.draw_view(None, image.size, center=True, flip=False, shape=shape)
            inputs += [data.view_inputs(c.image_processor, image, center[:4] + (flipped,), shape or args.resolution)
                       for flipped in flips]
        latents, image_embeds = [None] * len(inputs), [None] * len(inputs)
        for same_size in {movq_input.shape for movq_input, _ in inputs}:  # (buckets: one encoder batch per size)
            picked = [i for i, (movq_input, _) in enumerate(inputs) if movq_input.shape == same_size]
            encoded = encode(c, run.precision, *(np.stack([inputs[i][k] for i in picked]) for k in (0, 1)))
            for j, i in enumerate(picked):
                latents[i], image_embeds[i] = encoded[0][j].numpy(), encoded[1][j].numpy()
        n = len(flips)
        return {"size": sizes,
                "latents": [np.concatenate([x.reshape(-1) for x in latents[i:i + n]]) for i in range(0, len(inputs), n)],
                "image_embeds": [np.concatenate(image_embeds[i:i + n]) for i in range(0, len(inputs), n)]}

    floats = datasets.Sequence(datasets.Value("float32"))
    features = datasets.Features({"size": datasets.Sequence(datasets.Value("int32")), "latents": floats,
                                  "image_embeds": floats})
    key = ["decoder", args.image_column, args.resolution, args.random_crop, flips,
           cache.model_fingerprint(c.movq), cache.model_fingerprint(c.image_encoder), c.image_processor.to_dict(),
           run.precision.dtype, paddle.get_device().split(":")[0]]
    if args.enable_bucket:  # (only then: caches written without buckets keep their keys)
        key.append([args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps, args.bucket_no_upscale])
    encoded = cache.encode_dataset(ds, encode_batch, features, key, args.train_batch_size, run.ctx, run.log, run.clock)
    models.release(c, *ENCODERS)
    return encoded


def sample_maker(args, c, shapes=None):
    """make_sample(example, rng, row) for loader.TrainSet: crop/flip, the encoders' inputs (or their cached
    outputs), noise, timestep, at the row's bucket size from `shapes` (bucket_shapes) or the --resolution square.
    Both paths draw the same random numbers in the same order."""
    num_timesteps = c.noise_scheduler.config.num_train_timesteps

    def make_sample(example, rng, row):
        shape = shapes[row] if shapes else None
        width, height = shape or (args.resolution, args.resolution)
        latent_shape = (c.unet.config.in_channels, height // c.factor, width // c.factor)
        if "latents" in example:  # cached: the view's crop is the whole (square or centre-cropped) image
            flipped = data.draw_view(rng, tuple(example["size"]), not args.random_crop, args.random_flip, shape)[4]
            views = 2 if args.random_flip else 1
            inputs = {"latents": example["latents"].reshape(views, *latent_shape)[int(flipped)],
                      "image_embeds": example["image_embeds"].reshape(views, -1)[int(flipped)]}
        else:
            image = example[args.image_column]
            view = data.draw_view(rng, image.size, not args.random_crop, args.random_flip, shape)
            pixel_values, clip_pixel_values = data.view_inputs(c.image_processor, image, view, (width, height))
            inputs = {"pixel_values": pixel_values, "clip_pixel_values": clip_pixel_values}
        noise = rng.standard_normal(latent_shape, dtype="float32")
        if args.noise_offset:
            noise += args.noise_offset * rng.standard_normal((latent_shape[0], 1, 1), dtype="float32")
        return {**inputs, "noise": noise, "timestep": rng.integers(num_timesteps)}

    return make_sample


def build_loader(ds, args, c, run, shapes):
    """This rank's (sampler, loader) of decoder batches: samples from sample_maker at their bucket sizes (`shapes`,
    or squares), prepared by batch_inputs in the training thread (the UNet's kernels already use every core)."""
    return data.build_loader(ds, sample_maker(args, c, shapes), args, run.ctx, run.seed,
                             prepare=batch_inputs(c, run.precision), buckets=shapes)


def batch_inputs(c, precision):
    """prepare(batch) for the loader: what the UNet's step needs before the UNet runs (the frozen encoders' outputs,
    unless cached; the noised latents and the loss target), computed in the training thread just before the step
    (the UNet's kernels already use every core, so a read-ahead thread would only compete with them)."""

    def prepare(batch):
        if "latents" in batch:
            latents, image_embeds = batch["latents"], batch["image_embeds"]
        else:
            latents, image_embeds = encode(c, precision, batch["pixel_values"], batch["clip_pixel_values"])
        noise, timesteps = batch["noise"], batch["timestep"]
        return {"noisy_latents": c.noise_scheduler.add_noise(latents, noise, timesteps), "timesteps": timesteps,
                "target": diffusion.diffusion_target(c.noise_scheduler, latents, noise, timesteps),
                "image_embeds": image_embeds}

    return prepare


def loss(c, model, batch, snr_gamma, precision):
    """The training loss of `model` (the UNet, possibly wrapped) on one prepared micro-batch (batch_inputs)."""
    latents = batch["noisy_latents"]
    with precision.autocast():
        pred = model(latents, batch["timesteps"], None, added_cond_kwargs={"image_embeds": batch["image_embeds"]}
                     ).sample[:, :latents.shape[1]]
    return diffusion.diffusion_loss(pred, batch["target"], batch["timesteps"], c.noise_scheduler, snr_gamma)


def save_pipeline(args, c, folder):
    """The full decoder script's output: a KandinskyV22CombinedPipeline folder, the trained UNet with the decoder
    repo's MoVQ and scheduler and the prior repo's components (linked, see output.py), so
    `KandinskyV22CombinedPipeline.from_pretrained(output_dir)` works."""
    from . import output

    decoder_repo, prior_repo = args.pretrained_decoder_model_name_or_path, args.pretrained_prior_model_name_or_path
    sources = {"scheduler": (decoder_repo, "scheduler", DECODER_FLAG), "movq": (decoder_repo, "movq", DECODER_FLAG),
               **{"prior_" + name: (prior_repo, name, PRIOR_FLAG) for name in output.PRIOR_COMPONENTS}}
    return output.save_pipeline(folder, "KandinskyV22CombinedPipeline", output.COMBINED_COMPONENTS, {"unet": c.unet},
                                sources, args.cache_dir)


@contextlib.contextmanager
def combined_pipeline(args, c):
    """A KandinskyV22CombinedPipeline around the live UNet, with the models it needs beyond training's loaded for
    it and released after (the prior's always; the encoders with --cache_encoder_outputs, which trains without
    them), as the references free their validation pipeline."""
    from ppdiffusers import KandinskyV22CombinedPipeline

    with models.loaded(c, ENCODERS, keep=not args.cache_encoder_outputs), models.loaded(c, PRIOR_PARTS, keep=False):
        yield KandinskyV22CombinedPipeline(unet=c.unet, scheduler=c.noise_scheduler, movq=c.movq,
                                           prior_image_encoder=c.image_encoder, prior_image_processor=c.image_processor,
                                           **{name: getattr(c, name) for name in PRIOR_PARTS})
