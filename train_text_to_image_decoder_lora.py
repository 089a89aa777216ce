"""LoRA fine-tuning of the Kandinsky 2.2 decoder: the UNet stays frozen, small LoRA layers on its attention train.

    python -u train_text_to_image_decoder_lora.py --dataset_name=lambdalabs/naruto-blip-captions --output_dir=out
    python -m paddle.distributed.launch --gpus "0,1" train_text_to_image_decoder_lora.py ...

Load the result with `pipe.unet.load_attn_procs(output_dir)` on a KandinskyV22CombinedPipeline.
"""
from kandinsky_finetune import cpu_threads

cpu_threads.share_cores()  # before paddle is imported: its kernels' thread count is fixed then
from kandinsky_finetune import (  # noqa: E402
    checkpoint, data, decoder, lora, models, optimization, params, startup, training, validation)


def build_parser():
    parser = params.build_parser(__doc__.splitlines()[0], lora=True)
    params.add_decoder_args(parser)
    return parser


def parse_args(argv=None):
    return params.parse(build_parser(), argv)


def main(argv=None):
    args = parse_args(argv)
    run = startup.start_run(args, "decoder", lora=True)
    log, precision = run.log, run.precision

    # ---- components: everything frozen (in half precision under --mixed_precision)
    c = decoder.load_components(args, precision)

    # ---- data: each sample brings its own crop, flip, noise and timestep (see data.py)
    ds = data.load_train_dataset(args, run.seed, [args.image_column])
    shapes = decoder.bucket_shapes(ds, args, log)  # --enable_bucket: each image's bucket (width, height)
    if args.cache_encoder_outputs:  # the frozen encoders run once over the data, not on every step
        ds = decoder.cached_dataset(ds, args, c, run)

    # ---- the frozen UNet (loaded once the encoders are released, see load_trained); LoRA layers train
    unet = decoder.load_trained(c, precision)
    precision.cast_frozen(unet)
    trainable = lora.add_lora(unet, args.lora_rank)  # fp32 whatever the base precision
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    models.memory_efficient_attention(unet, args.enable_xformers_memory_efficient_attention, log)
    # each batch (one bucket's, with --enable_bucket) is encoded and noised before the step, in this thread
    sampler, loader = decoder.build_loader(ds, args, c, run, shapes)

    # ---- optimizer over the LoRA parameters only, checkpoints; the loop resumes and runs
    optimizer, lr_scheduler = optimization.build_optimizer(trainable, args, sampler)
    checkpointer = checkpoint.Checkpointer(args, run.seed, *lora.checkpoint_weights(unet), optimizer, lr_scheduler,
                                           precision, ema=None)
    loop = training.Loop(args, run, unet, trainable, optimizer, lr_scheduler, None, sampler, loader,
                         checkpointer, len(ds),
                         note=f"; {sum(p.size for p in trainable):,} LoRA parameters (rank {args.lora_rank})")

    def validate(step):
        with decoder.combined_pipeline(args, c) as pipe:
            validation.run(pipe, [unet], args, run.seed, step, loop.tracker, log,
                           decoder.validation_sizes(args, shapes))

    def save(folder):
        # the LoRA weights only, in the file `load_attn_procs(output_dir)` reads
        lora.save(unet, folder)
        return f"the LoRA weights ({lora.WEIGHTS_NAME}, {lora.file_size(folder) / 1e6:.2f} MB)"

    for epoch in loop.epochs():
        for batch in loop.micro_batches(epoch):
            with loop.accumulating():
                loop.backward(decoder.loss(c, loop.model, batch, args.snr_gamma, precision))
            loop.step_if_due()
        loop.validate_if_due(epoch, validate)
    loop.finish(save, validate)


if __name__ == "__main__":
    params.run(main)
