"""LoRA fine-tuning of the Kandinsky 2.2 prior: the prior stays frozen, small LoRA layers on its attention train.

    python -u train_text_to_image_prior_lora.py --dataset_name=lambdalabs/pokemon-blip-captions --output_dir=out
    python -m paddle.distributed.launch --gpus "0,1" train_text_to_image_prior_lora.py ...

Load the result with `pipe.prior_prior.load_attn_procs(output_dir)` on a KandinskyV22CombinedPipeline.
"""
from kandinsky_finetune import checkpoint, data, distributed, hub, lora, models, params, prior, tracking, training
from kandinsky_finetune import validation


def parse_args(argv=None):
    parser = params.build_parser(__doc__.splitlines()[0], lora=True)
    params.add_prior_args(parser)
    return params.parse(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    run = training.start_run(args)
    ctx, log, precision = run.ctx, run.log, run.precision

    # ---- components: everything frozen (the prior in half precision under --mixed_precision); LoRA layers train
    c = prior.load_components(args, precision, needs_decoder=bool(args.validation_prompt))
    precision.cast_frozen(c.prior)
    trainable = lora.add_lora(c.prior, args.lora_rank)  # fp32 whatever the base precision
    c.prior.train()
    if args.gradient_checkpointing:
        models.enable_prior_gradient_checkpointing(c.prior)

    # ---- data: each sample brings its own caption pick, noise and timestep (see data.py)
    ds = data.load_train_dataset(args, run.seed, [args.image_column, args.caption_column])
    sampler, loader = data.build_loader(ds, prior.sample_maker(args, c), args, ctx, run.seed)
    steps_per_epoch, max_train_steps, num_epochs = training.plan_steps(
        sampler.batches_per_epoch, args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps)

    # ---- optimizer over the LoRA parameters only, checkpoints, resume
    optimizer, lr_scheduler = training.build_optimizer(trainable, args, max_train_steps)
    checkpointer = checkpoint.Checkpointer(args, run.seed, *lora.checkpoint_weights(c.prior), optimizer, lr_scheduler,
                                           precision, ema=None)
    global_step = checkpointer.resume(run, log)
    model = distributed.wrap(c.prior, ctx)

    def validate(step):
        validation.run(prior.combined_pipeline(args, c), [c.prior], [args.validation_prompt],
                       args.num_validation_images, args, run.seed, step, tracker, log)

    # ---- train
    training.prepare_output_dir(args.output_dir, ctx, log)
    tracker = tracking.Tracker(args, ctx.is_main)
    log(f"{len(ds)} samples, {ctx.world_size} process(es), {steps_per_epoch} optimizer steps per epoch, "
        f"{max_train_steps} steps in all; {sum(p.size for p in trainable):,} LoRA parameters (rank {args.lora_rank})")
    loop = training.Loop(args, ctx, model, trainable, optimizer, lr_scheduler, precision, None, sampler, loader,
                         checkpointer, tracker, log, max_train_steps, steps_per_epoch, num_epochs, global_step)
    for epoch in loop.epochs():
        for batch in loop.micro_batches(epoch):
            with loop.accumulating():
                loop.backward(prior.loss(c, model, batch, args.snr_gamma, precision))
            loop.step_if_due()
        if args.validation_prompt and ctx.is_main and validation.is_due(epoch, args.validation_epochs, loop):
            validate(loop.global_step)
    loop.close()

    # ---- save: the LoRA weights only, in the file `prior.load_attn_procs(output_dir)` reads
    distributed.barrier(ctx)
    if ctx.is_main:
        if args.validation_prompt:
            validate(loop.global_step)
        lora.save(c.prior, args.output_dir)
        log(f"saved the LoRA weights to {args.output_dir}/{lora.WEIGHTS_NAME} "
            f"({lora.file_size(args.output_dir) / 1e6:.2f} MB)")
        if args.push_to_hub:
            hub.upload(args, log)
    tracker.close()
    distributed.barrier(ctx)


if __name__ == "__main__":
    params.run(main)
