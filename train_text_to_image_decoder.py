"""Fine-tune the Kandinsky 2.2 decoder (the UNet over MoVQ latents, conditioned on CLIP image embeddings).

    python -u train_text_to_image_decoder.py --dataset_name=lambdalabs/naruto-blip-captions --output_dir=out
    python -m paddle.distributed.launch --gpus "0,1" train_text_to_image_decoder.py ...

output_dir then loads with `KandinskyV22CombinedPipeline.from_pretrained(output_dir)`.
"""
from kandinsky_finetune import cpu_threads

cpu_threads.share_cores()  # before paddle is imported: its kernels' thread count is fixed then
from kandinsky_finetune import (  # noqa: E402
    checkpoint, data, decoder, models, optimization, params, startup, training, validation)
from kandinsky_finetune.ema import build_ema, ema_weights  # noqa: E402


def build_parser():
    parser = params.build_parser(__doc__.splitlines()[0])
    params.add_decoder_args(parser)
    return parser


def parse_args(argv=None):
    return params.parse(build_parser(), argv)


def main(argv=None):
    args = parse_args(argv)
    run = startup.start_run(args, "decoder", lora=False)
    log, precision = run.log, run.precision

    # ---- components: MoVQ and the CLIP image encoder are frozen
    c = decoder.load_components(args, precision)

    # ---- data: each sample brings its own crop, flip, noise and timestep (see data.py)
    ds = data.load_train_dataset(args, run.seed, [args.image_column])
    shapes = decoder.bucket_shapes(ds, args, log)  # --enable_bucket: each image's bucket (width, height)
    if args.cache_encoder_outputs:  # the frozen encoders run once over the data, not on every step
        ds = decoder.cached_dataset(ds, args, c, run)

    # ---- the whole UNet trains (loaded once the encoders are released, see load_trained)
    unet = decoder.load_trained(c, precision)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    models.memory_efficient_attention(unet, args.enable_xformers_memory_efficient_attention, log)
    # each batch (one bucket's, with --enable_bucket) is encoded and noised before the step, in this thread
    sampler, loader = decoder.build_loader(ds, args, c, run, shapes)

    # ---- optimizer, EMA, checkpoints; the loop resumes and runs
    trainable = [p for p in unet.parameters() if not p.stop_gradient]
    optimizer, lr_scheduler = optimization.build_optimizer(trainable, args, sampler)
    ema = build_ema(trainable, args.use_ema)
    checkpointer = checkpoint.Checkpointer(args, run.seed, *checkpoint.full_model_weights(unet, "unet", ema, trainable),
                                           optimizer, lr_scheduler, precision, ema)
    loop = training.Loop(args, run, unet, trainable, optimizer, lr_scheduler, ema, sampler, loader,
                         checkpointer, len(ds))

    def validate(step):
        with ema_weights(ema, trainable), decoder.combined_pipeline(args, c) as pipe:
            validation.run(pipe, [unet], args, run.seed, step, loop.tracker, log,
                           decoder.validation_sizes(args, shapes))

    def save(folder):
        # the whole combined pipeline: the trained UNet, the repos' other components linked
        return f"the fine-tuned pipeline ({decoder.save_pipeline(args, c, folder)})"

    for epoch in loop.epochs():
        for batch in loop.micro_batches(epoch):
            with loop.accumulating():
                loop.backward(decoder.loss(c, loop.model, batch, args.snr_gamma, precision))
            loop.step_if_due()
        loop.validate_if_due(epoch, validate)
    loop.finish(save, validate)


if __name__ == "__main__":
    params.run(main)
