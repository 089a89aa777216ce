"""The decoder's training task, shared by the full and the LoRA decoder scripts: its components, how a
sample is prepared, the loss, and the pipelines built around the UNet being trained.

Math: MoVQ latents of the image in [-1, 1] (no scaling factor) are noised with the decoder repo's DDPM
schedule; the UNet sees no text, only the CLIP image embedding of the same image, and its first 4 output
channels predict the noise (the other 4, a learned variance, are not trained by this loss).
"""
from types import SimpleNamespace

import numpy as np
import paddle

from . import data, models, training

PRIOR_FLAG, DECODER_FLAG = "--pretrained_prior_model_name_or_path", "--pretrained_decoder_model_name_or_path"


def load_components(args, precision):
    from ppdiffusers import DDPMScheduler, UNet2DConditionModel, VQModel
    from ppdiffusers.transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    decoder_repo, prior_repo = args.pretrained_decoder_model_name_or_path, args.pretrained_prior_model_name_or_path
    models.check_repo(decoder_repo, models.DECODER_SUBFOLDERS, DECODER_FLAG)
    models.check_repo(prior_repo, models.PRIOR_SUBFOLDERS, PRIOR_FLAG)
    c = SimpleNamespace(
        noise_scheduler=models.load(DDPMScheduler, decoder_repo, "scheduler", DECODER_FLAG, args.cache_dir),
        image_processor=models.load(CLIPImageProcessor, prior_repo, "image_processor", PRIOR_FLAG, args.cache_dir),
        image_encoder=training.freeze(models.load(CLIPVisionModelWithProjection, prior_repo, "image_encoder",
                                                  PRIOR_FLAG, args.cache_dir)),
        movq=training.freeze(models.load(VQModel, decoder_repo, "movq", DECODER_FLAG, args.cache_dir)),
        unet=models.load(UNet2DConditionModel, decoder_repo, "unet", DECODER_FLAG, args.cache_dir),
        prior_parts={})
    c.factor = models.movq_downscale_factor(c.movq)
    models.check_resolution(args.resolution, c.factor, "training images")
    precision.cast_frozen(c.image_encoder, c.movq)
    models.skip_fp32_upcasts(precision, c.unet, c.movq)
    return c


def encode(c, precision, pixel_values, clip_pixel_values):
    """The frozen encoders' outputs: (MoVQ latents, CLIP image_embeds), in float32."""
    with paddle.no_grad(), precision.autocast():
        latents = c.movq.encode(training.as_tensor(pixel_values)).latents
        image_embeds = c.image_encoder(training.as_tensor(clip_pixel_values)).image_embeds
    return latents.cast("float32"), image_embeds.cast("float32")


def cached_dataset(ds, args, c, run):
    """--cache_encoder_outputs: ds's images replaced by the encoders' outputs for each view a step can draw
    (the image, and its mirror image with --random_flip). When the augmentation cannot be cached exactly (a random
    crop of an image that is not square), ds itself, after a one-line warning."""
    import datasets

    from . import cache

    if not args.center_crop and not data.all_square(ds, args.image_column):
        run.log.warn("--cache_encoder_outputs: a random crop of non-square images cannot be cached exactly "
                     "(use --center_crop, or square images); training without the cache")
        return ds
    flips = [False, True] if args.random_flip else [False]

    def encode_batch(batch):
        views, sizes = [], []
        for image in batch[args.image_column]:
            sizes.append(list(image.size))
            center = data.draw_view(None, image.size, center=True, flip=False)
            views += [data.apply_view(image, center[:3] + (flipped,), args.resolution) for flipped in flips]
        latents, image_embeds = encode(c, run.precision, np.stack([data.to_movq_input(v) for v in views]),
                                       np.stack([data.clip_input(c.image_processor, v) for v in views]))
        n = len(flips)
        latents, image_embeds = latents.numpy(), image_embeds.numpy()
        return {"size": sizes, "latents": [latents[i:i + n].reshape(-1) for i in range(0, len(views), n)],
                "image_embeds": [image_embeds[i:i + n].reshape(-1) for i in range(0, len(views), n)]}

    floats = datasets.Sequence(datasets.Value("float32"))
    features = datasets.Features({"size": datasets.Sequence(datasets.Value("int32")), "latents": floats,
                                  "image_embeds": floats})
    key = ["decoder", args.image_column, args.resolution, args.center_crop, flips,
           cache.model_fingerprint(c.movq), cache.model_fingerprint(c.image_encoder), c.image_processor.to_dict(),
           run.precision.dtype, paddle.get_device().split(":")[0]]
    return cache.encode_dataset(ds, encode_batch, features, key, args.train_batch_size, run.ctx, run.log, run.clock)


def sample_maker(args, c):
    """make_sample(example, rng, row) for data.TrainSet: crop/flip, the encoders' inputs (or their cached
    outputs), noise, timestep. Both paths draw the same random numbers in the same order."""
    latent_shape = (c.unet.config.in_channels, args.resolution // c.factor, args.resolution // c.factor)
    num_timesteps = c.noise_scheduler.config.num_train_timesteps

    def make_sample(example, rng, row):
        if "latents" in example:  # cached: the view's crop is the whole (square or centre-cropped) image
            flipped = data.draw_view(rng, tuple(example["size"]), args.center_crop, args.random_flip)[3]
            views = 2 if args.random_flip else 1
            inputs = {"latents": example["latents"].reshape(views, *latent_shape)[int(flipped)],
                      "image_embeds": example["image_embeds"].reshape(views, -1)[int(flipped)]}
        else:
            image = example[args.image_column]
            image = data.apply_view(image, data.draw_view(rng, image.size, args.center_crop, args.random_flip),
                                    args.resolution)
            inputs = {"pixel_values": data.to_movq_input(image),
                      "clip_pixel_values": data.clip_input(c.image_processor, image)}
        noise = rng.standard_normal(latent_shape, dtype="float32")
        if args.noise_offset:
            noise += args.noise_offset * rng.standard_normal((latent_shape[0], 1, 1), dtype="float32")
        return {**inputs, "noise": noise, "timestep": rng.integers(num_timesteps)}

    return make_sample


def loss(c, model, batch, snr_gamma, precision):
    """The training loss of `model` (the UNet, possibly wrapped) on one micro-batch."""
    if "latents" in batch:
        latents, image_embeds = batch["latents"], batch["image_embeds"]
    else:
        latents, image_embeds = encode(c, precision, batch["pixel_values"], batch["clip_pixel_values"])
    noise, timesteps = batch["noise"], batch["timestep"]
    noisy_latents = c.noise_scheduler.add_noise(latents, noise, timesteps)
    target = training.diffusion_target(c.noise_scheduler, latents, noise, timesteps)
    with precision.autocast():
        pred = model(noisy_latents, timesteps, None, added_cond_kwargs={"image_embeds": image_embeds}
                     ).sample[:, :latents.shape[1]]
    return training.diffusion_loss(pred, target, timesteps, c.noise_scheduler, snr_gamma)


def combined_pipeline(args, c):
    """A KandinskyV22CombinedPipeline around the live UNet; the prior's components are loaded once, on first use."""
    from ppdiffusers import KandinskyV22CombinedPipeline, PriorTransformer, UnCLIPScheduler
    from ppdiffusers.transformers import CLIPTextModelWithProjection, CLIPTokenizer

    repo = args.pretrained_prior_model_name_or_path
    if not c.prior_parts:
        c.prior_parts.update(
            prior_prior=models.load(PriorTransformer, repo, "prior", PRIOR_FLAG, args.cache_dir),
            prior_text_encoder=models.load(CLIPTextModelWithProjection, repo, "text_encoder", PRIOR_FLAG, args.cache_dir),
            prior_tokenizer=models.load(CLIPTokenizer, repo, "tokenizer", PRIOR_FLAG, args.cache_dir),
            prior_scheduler=models.load(UnCLIPScheduler, repo, "scheduler", PRIOR_FLAG, args.cache_dir))
    return KandinskyV22CombinedPipeline(unet=c.unet, scheduler=c.noise_scheduler, movq=c.movq,
                                        prior_image_encoder=c.image_encoder, prior_image_processor=c.image_processor,
                                        **c.prior_parts)
