"""Fine-tune the Kandinsky 2.2 prior (text -> CLIP image embedding).

    python -u train_text_to_image_prior.py --dataset_name=lambdalabs/naruto-blip-captions --output_dir=out
    python -m paddle.distributed.launch --gpus "0,1" train_text_to_image_prior.py ...

output_dir then loads with `DiffusionPipeline.from_pretrained(output_dir)` (a KandinskyV22PriorPipeline).
"""
import sys

from kandinsky_finetune import cpu_threads

# the training thread, and the thread encoding the next batch; from a cache there is nothing to encode
cpu_threads.share_cores(compute_threads=1 if "--cache_encoder_outputs" in sys.argv else 2)
from kandinsky_finetune import (  # noqa: E402
    checkpoint, data, models, optimization, params, prior, startup, training, validation)
from kandinsky_finetune.ema import build_ema, ema_weights  # noqa: E402


def build_parser():
    parser = params.build_parser(__doc__.splitlines()[0])
    params.add_prior_args(parser)
    return parser


def parse_args(argv=None):
    return params.parse(build_parser(), argv)


def main(argv=None):
    args = parse_args(argv)
    run = startup.start_run(args, "prior", lora=False)
    ctx, log, precision = run.ctx, run.log, run.precision

    # ---- components: the CLIP encoders are frozen
    c = prior.load_components(args, precision, needs_decoder=bool(args.validation_prompts))

    # ---- data: each sample brings its own caption pick, noise and timestep (see data.py)
    ds = data.load_train_dataset(args, run.seed, [args.image_column, args.caption_column])
    if args.cache_encoder_outputs:  # the frozen encoders run once over the data, not on every step
        ds = prior.cached_dataset(ds, args, c, run)

    # ---- the whole prior trains, but its clip_mean/std (loaded once the encoders are released, see load_trained)
    prior.load_trained(c, precision)
    c.prior.train()
    if args.gradient_checkpointing:
        models.enable_prior_gradient_checkpointing(c.prior)
    # the next batch is built, encoded and noised in a second thread while this one trains (prefetch.py); from the
    # cache only copied and noised: cheaper in this thread than handing the GIL and a core to another
    sampler, loader = data.build_loader(ds, prior.sample_maker(args, c), args, ctx, run.seed,
                                        prepare=prior.batch_inputs(c, precision),
                                        read_ahead=not args.cache_encoder_outputs)

    # ---- optimizer, EMA, checkpoints; the loop resumes and runs
    trainable = [p for p in c.prior.parameters() if not p.stop_gradient]
    optimizer, lr_scheduler = optimization.build_optimizer(trainable, args, sampler)
    ema = build_ema(trainable, args.use_ema)
    checkpointer = checkpoint.Checkpointer(args, run.seed, *checkpoint.full_model_weights(c.prior, "prior", ema, trainable),
                                           optimizer, lr_scheduler, precision, ema)
    loop = training.Loop(args, run, c.prior, trainable, optimizer, lr_scheduler, ema, sampler, loader,
                         checkpointer, len(ds))

    def validate(step):
        with ema_weights(ema, trainable), prior.combined_pipeline(args, c) as pipe:
            validation.run(pipe, [c.prior], args, run.seed, step, loop.tracker, log)

    def save(folder):
        # a KandinskyV22PriorPipeline: the trained prior, the prior repo's other components linked
        return f"the fine-tuned prior pipeline ({prior.save_pipeline(args, c, folder)})"

    for epoch in loop.epochs():
        for batch in loop.micro_batches(epoch):
            with loop.accumulating():
                loop.backward(prior.loss(c, loop.model, batch, args.snr_gamma, precision))
            loop.step_if_due()
        loop.validate_if_due(epoch, validate)
    loop.finish(save, validate)


if __name__ == "__main__":
    params.run(main)
