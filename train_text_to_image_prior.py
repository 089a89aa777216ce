"""Fine-tune the Kandinsky 2.2 prior (text -> CLIP image embedding).

    python -u train_text_to_image_prior.py --dataset_name=lambdalabs/pokemon-blip-captions --output_dir=out
    python -m paddle.distributed.launch --gpus "0,1" train_text_to_image_prior.py ...

output_dir then loads with `DiffusionPipeline.from_pretrained(output_dir)` (a KandinskyV22PriorPipeline).
"""
import numpy as np
import paddle

from kandinsky_finetune import checkpoint, data, distributed, hub, models, params, tracking, training, validation


def parse_args(argv=None):
    parser = params.build_parser(__doc__.splitlines()[0])
    params.add_prior_args(parser)
    return params.parse(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    run = training.start_run(args)
    ctx, log, precision = run.ctx, run.log, run.precision

    # ---- components: the prior trains; the CLIP text and image encoders are frozen feature extractors
    from ppdiffusers import DDPMScheduler, PriorTransformer, UnCLIPScheduler
    from ppdiffusers.transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                                          CLIPVisionModelWithProjection)

    prior_repo, prior_flag = args.pretrained_prior_model_name_or_path, "--pretrained_prior_model_name_or_path"
    decoder_repo, decoder_flag = args.pretrained_decoder_model_name_or_path, "--pretrained_decoder_model_name_or_path"
    models.check_repo(prior_repo, models.PRIOR_SUBFOLDERS, prior_flag)
    if args.validation_prompts:  # the decoder is only needed to turn validation embeddings into images
        models.check_repo(decoder_repo, models.DECODER_SUBFOLDERS, decoder_flag)
        models.check_resolution(args.resolution, models.movq_downscale_factor_of_repo(
            decoder_repo, decoder_flag, args.cache_dir), "validation images")
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
    ds = data.load_train_dataset(args, run.seed, [args.image_column, args.caption_column])
    embed_dim = prior.config.embedding_dim
    num_timesteps = noise_scheduler.config.num_train_timesteps

    def make_sample(example, rng, row):
        caption = data.pick_caption(example[args.caption_column], rng, row)
        tokens = tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                           return_attention_mask=True)
        return {"text_input_ids": np.asarray(tokens["input_ids"], dtype="int64"),
                "text_mask": np.asarray(tokens["attention_mask"], dtype="bool"),
                "clip_pixel_values": data.clip_input(image_processor, example[args.image_column].convert("RGB")),
                "noise": rng.standard_normal(embed_dim, dtype="float32"), "timestep": rng.integers(num_timesteps)}

    sampler = data.ShardedBatchSampler(len(ds), args.train_batch_size, ctx.rank, ctx.world_size, run.seed)
    loader = data.make_loader(data.TrainSet(ds, make_sample, run.seed), sampler, args.dataloader_num_workers)
    steps_per_epoch, max_train_steps, num_epochs = training.plan_steps(
        sampler.batches_per_epoch, args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps)

    # ---- optimizer, EMA, checkpoints, resume
    from ppdiffusers.training_utils import EMAModel

    trainable = [p for p in prior.parameters() if not p.stop_gradient]
    optimizer, lr_scheduler = training.build_optimizer(trainable, args, max_train_steps)
    ema = EMAModel(trainable) if args.use_ema else None
    checkpointer = checkpoint.Checkpointer(args, run.seed, *checkpoint.full_model_weights(prior, "prior", ema, trainable),
                                           optimizer, lr_scheduler, precision, ema)
    global_step = checkpointer.restore(run.resume_path, run.resume_state) if run.resume_state else 0
    if global_step:
        log(f"resumed from {run.resume_path} at step {global_step}")
    model = distributed.wrap(prior, ctx)

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
        with training.ema_weights(ema, trainable):
            prior.eval()
            prior_parts = {"prior_" + k: v for k, v in prior_pipeline().components.items()}
            folder = validation.generate(KandinskyV22CombinedPipeline(**decoder_parts, **prior_parts),
                                         args.validation_prompts, 1, args.resolution, run.seed, args.output_dir, step,
                                         tracker)
            prior.train()
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
                    text = text_encoder(batch["text_input_ids"])
                    image_embeds = image_encoder(batch["clip_pixel_values"]).image_embeds.cast("float32")
                    image_embeds = (image_embeds - clip_mean) / clip_std
                noise, timesteps = batch["noise"], batch["timestep"]
                noisy_embeds = noise_scheduler.add_noise(image_embeds, noise, timesteps)
                target = training.diffusion_target(noise_scheduler, image_embeds, noise, timesteps)
                with precision.autocast():
                    pred = model(noisy_embeds, timestep=timesteps, proj_embedding=text.text_embeds,
                                 encoder_hidden_states=text.last_hidden_state,
                                 attention_mask=batch["text_mask"]).predicted_image_embedding
                loop.backward(training.diffusion_loss(pred, target, timesteps, noise_scheduler, args.snr_gamma))
            loop.step_if_due()
        if args.validation_prompts and ctx.is_main and validation.is_due(epoch, args.validation_epochs) \
                and not loop.done:
            validate(loop.global_step)
    loop.close()

    # ---- save: a KandinskyV22PriorPipeline with the repo's UnCLIPScheduler
    distributed.barrier(ctx)
    if ctx.is_main:
        if ema is not None:
            ema.copy_to(trainable)
        if args.validation_prompts:
            validate(loop.global_step)
        prior_pipeline().save_pretrained(args.output_dir)
        log(f"saved the fine-tuned prior pipeline to {args.output_dir}")
        if args.push_to_hub:
            hub.upload(args, log)
    tracker.close()
    distributed.barrier(ctx)


if __name__ == "__main__":
    params.run(main)
