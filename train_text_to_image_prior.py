"""Fine-tune the Kandinsky 2.2 prior (text -> CLIP image embedding).

    python -u train_text_to_image_prior.py --dataset_name=lambdalabs/pokemon-blip-captions --output_dir=out
    python -m paddle.distributed.launch --gpus "0,1" train_text_to_image_prior.py ...

output_dir then loads with `DiffusionPipeline.from_pretrained(output_dir)` (a KandinskyV22PriorPipeline).
"""
import os

import paddle

from kandinsky_finetune import checkpoint, data, distributed, hub, models, params, tracking, training, validation


def parse_args(argv=None):
    parser = params.build_parser(__doc__.splitlines()[0])
    params.add_prior_args(parser)
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

    # ---- components: the prior trains; the CLIP text and image encoders are frozen feature extractors
    from ppdiffusers import DDPMScheduler, PriorTransformer, UnCLIPScheduler
    from ppdiffusers.transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                                          CLIPVisionModelWithProjection)

    prior_repo, prior_flag = args.pretrained_prior_model_name_or_path, "--pretrained_prior_model_name_or_path"
    decoder_repo, decoder_flag = args.pretrained_decoder_model_name_or_path, "--pretrained_decoder_model_name_or_path"
    models.check_repo(prior_repo, models.PRIOR_SUBFOLDERS, prior_flag)
    if args.validation_prompts:  # the decoder is only needed to turn validation embeddings into images
        models.check_repo(decoder_repo, models.DECODER_SUBFOLDERS, decoder_flag)
    resume_path = checkpoint.resolve(args.resume_from_checkpoint, args.output_dir)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        log(f"no checkpoint in {args.output_dir} yet: starting a new run")
    state = checkpoint.load_state(resume_path) if resume_path else None
    if state is not None:
        seed = state["seed"]  # the resumed run continues the same shuffles and noise
    load = lambda cls, repo, sub, flag: models.load(cls, repo, sub, flag, args.cache_dir)  # noqa: E731
    # Training uses the DDPM form of the prior's noise schedule; the saved pipeline keeps the repo's
    # UnCLIPScheduler, which the prior pipeline needs at inference.
    noise_scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    inference_scheduler = load(UnCLIPScheduler, prior_repo, "scheduler", prior_flag)
    image_processor = load(CLIPImageProcessor, prior_repo, "image_processor", prior_flag)
    tokenizer = load(CLIPTokenizer, prior_repo, "tokenizer", prior_flag)
    image_encoder = training.freeze(load(CLIPVisionModelWithProjection, prior_repo, "image_encoder", prior_flag))
    text_encoder = training.freeze(load(CLIPTextModelWithProjection, prior_repo, "text_encoder", prior_flag))
    prior = load(PriorTransformer, prior_repo, "prior", prior_flag)
    # clip_mean / clip_std are the fixed statistics of the CLIP image embeddings, not weights to learn
    prior.clip_mean.stop_gradient = prior.clip_std.stop_gradient = True
    clip_mean, clip_std = prior.clip_mean.detach(), prior.clip_std.detach()
    precision.cast_frozen(image_encoder, text_encoder)
    prior.train()
    if args.gradient_checkpointing:
        models.enable_prior_gradient_checkpointing(prior)

    # ---- data: each sample brings its own caption pick, noise and timestep (see data.py)
    ds = data.load_train_dataset(args, seed, [args.image_column, args.caption_column])
    embed_dim = prior.config.embedding_dim
    num_timesteps = noise_scheduler.config.num_train_timesteps

    def make_sample(example, rng, row):
        caption = data.pick_caption(example[args.caption_column], rng, row)
        tokens = tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                           return_attention_mask=True)
        return {"text_input_ids": paddle.to_tensor(tokens["input_ids"]).numpy(),
                "text_mask": paddle.to_tensor(tokens["attention_mask"]).numpy(),
                "clip_pixel_values": data.clip_input(image_processor, example[args.image_column].convert("RGB")),
                "noise": rng.standard_normal(embed_dim, dtype="float32"), "timestep": rng.integers(num_timesteps)}

    sampler = data.ShardedBatchSampler(len(ds), args.train_batch_size, ctx.rank, ctx.world_size, seed)
    loader = data.make_loader(data.TrainSet(ds, make_sample, seed), sampler, args.dataloader_num_workers)
    steps_per_epoch, max_train_steps, num_epochs = training.plan_steps(
        sampler.batches_per_epoch, args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps)

    # ---- optimizer, EMA, resume
    from ppdiffusers.training_utils import EMAModel

    trainable = [p for p in prior.parameters() if not p.stop_gradient]
    optimizer, lr_scheduler = training.build_optimizer(trainable, args, max_train_steps)
    ema = EMAModel(trainable) if args.use_ema else None
    global_step = 0
    if state is not None:
        checkpoint.load_weights_into(prior, os.path.join(resume_path, "prior"))
        optimizer.set_state_dict(state["optimizer"])
        lr_scheduler.set_state_dict(state["lr_scheduler"])
        precision.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        global_step = state["global_step"]
        log(f"resumed from {resume_path} at step {global_step}")
    model = distributed.wrap(prior, ctx)

    def write_checkpoint_weights(folder):
        prior.save_pretrained(os.path.join(folder, "prior"))
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
            prior.save_pretrained(os.path.join(folder, "prior_ema"))
            ema.restore(trainable)

    def training_state():
        return {"global_step": global_step, "seed": seed, "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "scaler": precision.state_dict(),
                "ema": ema.state_dict() if ema is not None else None}

    def prior_pipeline():
        from ppdiffusers import KandinskyV22PriorPipeline

        return KandinskyV22PriorPipeline(prior=prior, image_encoder=image_encoder, text_encoder=text_encoder,
                                         tokenizer=tokenizer, scheduler=inference_scheduler,
                                         image_processor=image_processor)

    decoder_parts = {}  # decoder components for validation images, loaded once when first needed

    def validate(step):
        from ppdiffusers import DDPMScheduler as DecoderScheduler, KandinskyV22CombinedPipeline
        from ppdiffusers import UNet2DConditionModel, VQModel

        if not decoder_parts:
            decoder_parts.update(unet=load(UNet2DConditionModel, decoder_repo, "unet", decoder_flag),
                                 movq=load(VQModel, decoder_repo, "movq", decoder_flag),
                                 scheduler=load(DecoderScheduler, decoder_repo, "scheduler", decoder_flag))
            models.check_resolution(args.resolution, models.movq_downscale_factor(decoder_parts["movq"]),
                                    "validation images")
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
        prior.eval()
        pipe = KandinskyV22CombinedPipeline(**decoder_parts, **{"prior_" + k: v for k, v in
                                                                 prior_pipeline().components.items()})
        folder = validation.generate(pipe, args.validation_prompts, 1, args.resolution, seed, args.output_dir, step,
                                     tracker)
        prior.train()
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
                    text = text_encoder(batch["text_input_ids"])
                    image_embeds = image_encoder(batch["clip_pixel_values"]).image_embeds.cast("float32")
                    image_embeds = (image_embeds - clip_mean) / clip_std
                noise, timesteps = batch["noise"], batch["timestep"]
                noisy_embeds = noise_scheduler.add_noise(image_embeds, noise, timesteps)
                target = training.diffusion_target(noise_scheduler, image_embeds, noise, timesteps)
                with precision.autocast():
                    pred = model(noisy_embeds, timestep=timesteps, proj_embedding=text.text_embeds,
                                 encoder_hidden_states=text.last_hidden_state,
                                 attention_mask=batch["text_mask"].cast("bool")).predicted_image_embedding
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

    # ---- save: a KandinskyV22PriorPipeline with the repo's UnCLIPScheduler
    distributed.barrier(ctx)
    if ctx.is_main:
        if ema is not None:
            ema.copy_to(trainable)
        if args.validation_prompts:
            validate(global_step)
        prior_pipeline().save_pretrained(args.output_dir)
        log(f"saved the fine-tuned prior pipeline to {args.output_dir}")
        if args.push_to_hub:
            hub.upload(args.output_dir, args.hub_model_id, args.hub_token, log)
    tracker.close()
    distributed.barrier(ctx)


if __name__ == "__main__":
    params.run(main)
