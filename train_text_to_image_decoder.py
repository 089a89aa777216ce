"""Fine-tune the Kandinsky 2.2 decoder (the UNet over MoVQ latents, conditioned on CLIP image embeddings).

    python -u train_text_to_image_decoder.py --dataset_name=lambdalabs/pokemon-blip-captions --output_dir=out
    python -m paddle.distributed.launch --gpus "0,1" train_text_to_image_decoder.py ...

output_dir then loads with `KandinskyV22CombinedPipeline.from_pretrained(output_dir)`.
"""
import paddle

from kandinsky_finetune import checkpoint, data, distributed, hub, models, params, tracking, training, validation


def parse_args(argv=None):
    parser = params.build_parser(__doc__.splitlines()[0])
    params.add_decoder_args(parser)
    return params.parse(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    run = training.start_run(args)
    ctx, log, precision = run.ctx, run.log, run.precision

    # ---- components: the UNet trains; MoVQ and the CLIP image encoder are frozen feature extractors
    from ppdiffusers import DDPMScheduler, UNet2DConditionModel, VQModel
    from ppdiffusers.transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    decoder_repo, decoder_flag = args.pretrained_decoder_model_name_or_path, "--pretrained_decoder_model_name_or_path"
    prior_repo, prior_flag = args.pretrained_prior_model_name_or_path, "--pretrained_prior_model_name_or_path"
    models.check_repo(decoder_repo, models.DECODER_SUBFOLDERS, decoder_flag)
    models.check_repo(prior_repo, models.PRIOR_SUBFOLDERS, prior_flag)
    load = lambda cls, repo, sub, flag: models.load(cls, repo, sub, flag, args.cache_dir)  # noqa: E731
    noise_scheduler = load(DDPMScheduler, decoder_repo, "scheduler", decoder_flag)
    image_processor = load(CLIPImageProcessor, prior_repo, "image_processor", prior_flag)
    image_encoder = training.freeze(load(CLIPVisionModelWithProjection, prior_repo, "image_encoder", prior_flag))
    movq = training.freeze(load(VQModel, decoder_repo, "movq", decoder_flag))
    unet = load(UNet2DConditionModel, decoder_repo, "unet", decoder_flag)
    factor = models.movq_downscale_factor(movq)
    models.check_resolution(args.resolution, factor, "training images")
    precision.cast_frozen(image_encoder, movq)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        if training.on_gpu():
            unet.enable_xformers_memory_efficient_attention()
        else:
            log.warn("--enable_xformers_memory_efficient_attention needs a GPU; using standard attention")

    # ---- data: each sample brings its own crop, flip, noise and timestep (see data.py)
    ds = data.load_train_dataset(args, run.seed, [args.image_column])
    latent_shape = (unet.config.in_channels, args.resolution // factor, args.resolution // factor)
    num_timesteps = noise_scheduler.config.num_train_timesteps

    def make_sample(example, rng, row):
        image = data.square_crop_resize(example[args.image_column], args.resolution, args.center_crop, rng,
                                        args.random_flip)
        noise = rng.standard_normal(latent_shape, dtype="float32")
        if args.noise_offset:
            noise += args.noise_offset * rng.standard_normal((latent_shape[0], 1, 1), dtype="float32")
        return {"pixel_values": data.to_movq_input(image), "clip_pixel_values": data.clip_input(image_processor, image),
                "noise": noise, "timestep": rng.integers(num_timesteps)}

    sampler = data.ShardedBatchSampler(len(ds), args.train_batch_size, ctx.rank, ctx.world_size, run.seed)
    loader = data.make_loader(data.TrainSet(ds, make_sample, run.seed), sampler, args.dataloader_num_workers)
    steps_per_epoch, max_train_steps, num_epochs = training.plan_steps(
        sampler.batches_per_epoch, args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps)

    # ---- optimizer, EMA, checkpoints, resume
    from ppdiffusers.training_utils import EMAModel

    trainable = [p for p in unet.parameters() if not p.stop_gradient]
    optimizer, lr_scheduler = training.build_optimizer(trainable, args, max_train_steps)
    ema = EMAModel(trainable) if args.use_ema else None
    checkpointer = checkpoint.Checkpointer(args, run.seed, *checkpoint.full_model_weights(unet, "unet", ema, trainable),
                                           optimizer, lr_scheduler, precision, ema)
    global_step = checkpointer.restore(run.resume_path, run.resume_state) if run.resume_state else 0
    if global_step:
        log(f"resumed from {run.resume_path} at step {global_step}")
    model = distributed.wrap(unet, ctx)

    prior_parts = {}  # prior components for validation and the final pipeline, loaded once when first needed

    def combined_pipeline():
        from ppdiffusers import KandinskyV22CombinedPipeline, PriorTransformer, UnCLIPScheduler
        from ppdiffusers.transformers import CLIPTextModelWithProjection, CLIPTokenizer

        if not prior_parts:
            prior_parts.update(
                prior_prior=load(PriorTransformer, prior_repo, "prior", prior_flag),
                prior_text_encoder=load(CLIPTextModelWithProjection, prior_repo, "text_encoder", prior_flag),
                prior_tokenizer=load(CLIPTokenizer, prior_repo, "tokenizer", prior_flag),
                prior_scheduler=load(UnCLIPScheduler, prior_repo, "scheduler", prior_flag))
        return KandinskyV22CombinedPipeline(unet=unet, scheduler=noise_scheduler, movq=movq,
                                            prior_image_encoder=image_encoder, prior_image_processor=image_processor,
                                            **prior_parts)

    def validate(step):
        with training.ema_weights(ema, trainable):
            unet.eval()
            folder = validation.generate(combined_pipeline(), args.validation_prompts, 1, args.resolution, run.seed,
                                         args.output_dir, step, tracker)
            unet.train()
        log(f"validation images: {folder}")

    # ---- train
    training.prepare_output_dir(args.output_dir, ctx, log)
    tracker = tracking.Tracker(args, ctx.is_main)
    log(f"{len(ds)} samples, {ctx.world_size} process(es), {steps_per_epoch} optimizer steps per epoch, "
        f"{max_train_steps} steps in all")
    loop = training.Loop(args, ctx, model, trainable, optimizer, lr_scheduler, precision, ema, sampler, loader,
                         checkpointer, tracker, log, max_train_steps, steps_per_epoch, num_epochs, global_step)
    for epoch in loop.epochs():
        for batch in loop.micro_batches(epoch):
            with loop.accumulating():
                with paddle.no_grad(), precision.autocast():
                    latents = movq.encode(batch["pixel_values"]).latents.cast("float32")
                    image_embeds = image_encoder(batch["clip_pixel_values"]).image_embeds
                noise, timesteps = batch["noise"], batch["timestep"]
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                target = training.diffusion_target(noise_scheduler, latents, noise, timesteps)
                with precision.autocast():
                    # channels 4: of the output are the learned variance, which this loss does not train
                    pred = model(noisy_latents, timesteps, None, added_cond_kwargs={"image_embeds": image_embeds}
                                 ).sample[:, :latents.shape[1]]
                loop.backward(training.diffusion_loss(pred, target, timesteps, noise_scheduler, args.snr_gamma))
            loop.step_if_due()
        if args.validation_prompts and ctx.is_main and validation.is_due(epoch, args.validation_epochs) \
                and not loop.done:
            validate(loop.global_step)
    loop.close()

    # ---- save: the whole combined pipeline, so `KandinskyV22CombinedPipeline.from_pretrained(output_dir)` works
    distributed.barrier(ctx)
    if ctx.is_main:
        if ema is not None:
            ema.copy_to(trainable)
        if args.validation_prompts:
            validate(loop.global_step)
        combined_pipeline().save_pretrained(args.output_dir)
        log(f"saved the fine-tuned pipeline to {args.output_dir}")
        if args.push_to_hub:
            hub.upload(args, log)
    tracker.close()
    distributed.barrier(ctx)


if __name__ == "__main__":
    params.run(main)
