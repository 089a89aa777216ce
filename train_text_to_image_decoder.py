"""Fine-tune the Kandinsky 2.2 decoder (the UNet over MoVQ latents, conditioned on CLIP image embeddings).

    python -u train_text_to_image_decoder.py --dataset_name=lambdalabs/pokemon-blip-captions --output_dir=out
    python -m paddle.distributed.launch --gpus "0,1" train_text_to_image_decoder.py ...

output_dir then loads with `KandinskyV22CombinedPipeline.from_pretrained(output_dir)`.
"""
import os

import paddle

from kandinsky_finetune import checkpoint, data, distributed, hub, models, params, tracking, training, validation


def parse_args(argv=None):
    parser = params.build_parser(__doc__.splitlines()[0])
    params.add_decoder_args(parser)
    return params.parse(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    tracking.quiet_libraries()
    ctx = distributed.setup(args.local_rank)
    log = tracking.Log(ctx.is_main)
    tracking.check_available(args.report_to)
    training.configure_tf32(args.allow_tf32, log)
    precision = training.Precision(args.mixed_precision, log)
    seed = distributed.broadcast_int(args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little"), ctx)

    # ---- components: the UNet trains; MoVQ and the CLIP image encoder are frozen feature extractors
    from ppdiffusers import DDPMScheduler, UNet2DConditionModel, VQModel
    from ppdiffusers.transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    decoder_repo, prior_repo = args.pretrained_decoder_model_name_or_path, args.pretrained_prior_model_name_or_path
    models.check_repo(decoder_repo, models.DECODER_SUBFOLDERS, "--pretrained_decoder_model_name_or_path")
    models.check_repo(prior_repo, models.PRIOR_SUBFOLDERS, "--pretrained_prior_model_name_or_path")
    resume_path = checkpoint.resolve(args.resume_from_checkpoint, args.output_dir)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        log(f"no checkpoint in {args.output_dir} yet: starting a new run")
    state = checkpoint.load_state(resume_path) if resume_path else None
    if state is not None:
        seed = state["seed"]  # the resumed run continues the same shuffles and noise
    load = lambda cls, repo, sub, flag: models.load(cls, repo, sub, flag, args.cache_dir)  # noqa: E731
    decoder_flag, prior_flag = "--pretrained_decoder_model_name_or_path", "--pretrained_prior_model_name_or_path"
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

    # ---- data: each sample brings its own noise and timestep (see data.py)
    ds = data.load_train_dataset(args, seed, [args.image_column])
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

    sampler = data.ShardedBatchSampler(len(ds), args.train_batch_size, ctx.rank, ctx.world_size, seed)
    loader = data.make_loader(data.TrainSet(ds, make_sample, seed), sampler, args.dataloader_num_workers)
    steps_per_epoch, max_train_steps, num_epochs = training.plan_steps(
        sampler.batches_per_epoch, args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps)

    # ---- optimizer, EMA, resume
    from ppdiffusers.training_utils import EMAModel

    trainable = [p for p in unet.parameters() if not p.stop_gradient]
    optimizer, lr_scheduler = training.build_optimizer(trainable, args, max_train_steps)
    ema = EMAModel(trainable) if args.use_ema else None
    global_step = 0
    if state is not None:
        checkpoint.load_weights_into(unet, os.path.join(resume_path, "unet"))
        optimizer.set_state_dict(state["optimizer"])
        lr_scheduler.set_state_dict(state["lr_scheduler"])
        precision.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        global_step = state["global_step"]
        log(f"resumed from {resume_path} at step {global_step}")
    model = distributed.wrap(unet, ctx)

    def write_checkpoint_weights(folder):
        unet.save_pretrained(os.path.join(folder, "unet"))
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
            unet.save_pretrained(os.path.join(folder, "unet_ema"))
            ema.restore(trainable)

    def training_state():
        return {"global_step": global_step, "seed": seed, "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "scaler": precision.state_dict(),
                "ema": ema.state_dict() if ema is not None else None}

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
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
        unet.eval()
        folder = validation.generate(combined_pipeline(), args.validation_prompts, 1, args.resolution, seed,
                                     args.output_dir, step, tracker)
        unet.train()
        if ema is not None:
            ema.restore(trainable)
        log(f"validation images: {folder}")

    # ---- train
    if ctx.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        checkpoint.remove_partial(args.output_dir, log)
    tracker = tracking.Tracker(args, ctx.is_main)
    log(f"{len(ds)} samples, {ctx.world_size} process(es), {steps_per_epoch} optimizer steps per epoch, "
        f"{max_train_steps} steps in all")
    bar = tracking.progress_bar(max_train_steps, global_step, ctx.is_main)
    first_epoch = global_step // steps_per_epoch
    for epoch in range(first_epoch, num_epochs):
        sampler.set_epoch(epoch, skip_batches=(global_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps)
        step_loss = 0.0
        for batch, group, last in training.accumulation_groups(loader, len(sampler), args.gradient_accumulation_steps):
            with distributed.no_sync_unless(last, model):
                with paddle.no_grad(), precision.autocast():
                    latents = movq.encode(batch["pixel_values"]).latents.cast("float32")
                    image_embeds = image_encoder(batch["clip_pixel_values"]).image_embeds
                noise, timesteps = batch["noise"], batch["timestep"]
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                target = training.diffusion_target(noise_scheduler, latents, noise, timesteps)
                with precision.autocast():
                    # the UNet predicts the noise and (in channels 4:) a learned variance, which is not trained
                    pred = model(noisy_latents, timesteps, None, added_cond_kwargs={"image_embeds": image_embeds}
                                 ).sample[:, :latents.shape[1]]
                loss = training.diffusion_loss(pred, target, timesteps, noise_scheduler, args.snr_gamma) / group
                precision.backward(loss)
            step_loss += float(loss.item())
            if not last:
                continue
            precision.step(optimizer)
            lr_scheduler.step()
            optimizer.clear_grad()
            if ema is not None:
                ema.step(trainable)
            global_step += 1
            logged = {"train_loss": distributed.mean_across_ranks(step_loss, ctx), "lr": lr_scheduler.get_lr()}
            tracker.scalars(logged, global_step)
            bar.update(1)
            bar.set_postfix(loss=f"{logged['train_loss']:.4f}", lr=f"{logged['lr']:.2e}")
            step_loss = 0.0
            if global_step % args.checkpointing_steps == 0 and ctx.is_main:
                path = checkpoint.save(args.output_dir, global_step, write_checkpoint_weights, training_state(),
                                       args.checkpoints_total_limit)
                log(f"saved {path}")
            if global_step >= max_train_steps:
                break
        if args.validation_prompts and ctx.is_main and validation.is_due(epoch, args.validation_epochs) \
                and global_step < max_train_steps:
            validate(global_step)
        if global_step >= max_train_steps:
            break
    bar.close()

    # ---- save: the whole combined pipeline, so `KandinskyV22CombinedPipeline.from_pretrained(output_dir)` works
    distributed.barrier(ctx)
    if ctx.is_main:
        if ema is not None:
            ema.copy_to(trainable)
        if args.validation_prompts:
            validate(global_step)
        combined_pipeline().save_pretrained(args.output_dir)
        log(f"saved the fine-tuned pipeline to {args.output_dir}")
        if args.push_to_hub:
            hub.upload(args.output_dir, args.hub_model_id, args.hub_token, log)
    tracker.close()
    distributed.barrier(ctx)


if __name__ == "__main__":
    params.run(main)
