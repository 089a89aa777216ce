"""The decoder's training task, shared by the full and the LoRA decoder scripts: its components, how a
sample is prepared, the loss, and the pipelines built around the UNet being trained.

Math: MoVQ latents of the image in [-1, 1] (no scaling factor) are noised with the decoder repo's DDPM
schedule; the UNet sees no text, only the CLIP image embedding of the same image, and its first 4 output
channels predict the noise (the other 4, a learned variance, are not trained by this loss).
"""
from types import SimpleNamespace

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
    return c


def sample_maker(args, c):
    """make_sample(example, rng, row) for data.TrainSet: crop/flip, MoVQ and CLIP inputs, noise, timestep."""
    latent_shape = (c.unet.config.in_channels, args.resolution // c.factor, args.resolution // c.factor)
    num_timesteps = c.noise_scheduler.config.num_train_timesteps

    def make_sample(example, rng, row):
        image = data.square_crop_resize(example[args.image_column], args.resolution, args.center_crop, rng,
                                        args.random_flip)
        noise = rng.standard_normal(latent_shape, dtype="float32")
        if args.noise_offset:
            noise += args.noise_offset * rng.standard_normal((latent_shape[0], 1, 1), dtype="float32")
        return {"pixel_values": data.to_movq_input(image), "clip_pixel_values": data.clip_input(c.image_processor, image),
                "noise": noise, "timestep": rng.integers(num_timesteps)}

    return make_sample


def loss(c, model, batch, snr_gamma, precision):
    """The training loss of `model` (the UNet, possibly wrapped) on one micro-batch."""
    with paddle.no_grad(), precision.autocast():
        latents = c.movq.encode(batch["pixel_values"]).latents.cast("float32")
        image_embeds = c.image_encoder(batch["clip_pixel_values"]).image_embeds
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
