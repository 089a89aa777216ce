"""LoRA fine-tuning of the Kandinsky 2.2 prior: the prior stays frozen, small LoRA layers on its attention train.

    python -u train_text_to_image_prior_lora.py --dataset_name=lambdalabs/naruto-blip-captions --output_dir=out
    python -m paddle.distributed.launch --gpus "0,1" train_text_to_image_prior_lora.py ...

Load the result with `pipe.prior_prior.load_attn_procs(output_dir)` on a KandinskyV22CombinedPipeline.
"""
import sys

from kandinsky_finetune import cpu_threads

# the training thread, and the thread encoding the next batch; from a cache there is nothing to encode
cpu_threads.share_cores(compute_threads=1 if "--cache_encoder_outputs" in sys.argv else 2)
from kandinsky_finetune import (  # noqa: E402
    checkpoint, data, lora, models, optimization, params, prior, startup, training, validation)


def build_parser():
    parser = params.build_parser(__doc__.splitlines()[0], lora=True)
    params.add_prior_args(parser)
    return parser


def parse_args(argv=None):
    return params.parse(build_parser(), argv)


def main(argv=None):
    args = parse_args(argv)
    run = startup.start_run(args, "prior", lora=True)
    ctx, log, precision = run.ctx, run.log, run.precision

    # ---- components: everything frozen (in half precision under --mixed_precision)
    c = prior.load_components(args, precision, needs_decoder=bool(args.validation_prompt))

    # ---- data: each sample brings its own caption pick, noise and timestep (see data.py)
    ds = data.load_train_dataset(args, run.seed, [args.image_column, args.caption_column])
    if args.cache_encoder_outputs:  # the frozen encoders run once over the data, not on every step
        ds = prior.cached_dataset(ds, args, c, run)

    # ---- the frozen prior (loaded once the encoders are released, see load_trained); LoRA layers train
    prior.load_trained(c, precision)
    precision.cast_frozen(c.prior)
    trainable = lora.add_lora(c.prior, args.lora_rank)  # fp32 whatever the base precision
    c.prior.train()
    if args.gradient_checkpointing:
        models.enable_prior_gradient_checkpointing(c.prior)
    # the next batch is built, encoded and noised in a second thread while this one trains (prefetch.py); from the
    # cache only copied and noised: cheaper in this thread than handing the GIL and a core to another
    sampler, loader = data.build_loader(ds, prior.sample_maker(args, c), args, ctx, run.seed,
                                        prepare=prior.batch_inputs(c, precision),
                                        read_ahead=not args.cache_encoder_outputs)

    # ---- optimizer over the LoRA parameters only, checkpoints; the loop resumes and runs
    optimizer, lr_scheduler = optimization.build_optimizer(trainable, args, sampler)
    checkpointer = checkpoint.Checkpointer(args, run.seed, *lora.checkpoint_weights(c.prior), optimizer, lr_scheduler,
                                           precision, ema=None)
    loop = training.Loop(args, run, c.prior, trainable, optimizer, lr_scheduler, None, sampler, loader,
                         checkpointer, len(ds),
                         note=f"; {sum(p.size for p in trainable):,} LoRA parameters (rank {args.lora_rank})")

    def validate(step):
        with prior.combined_pipeline(args, c) as pipe:
            validation.run(pipe, [c.prior], args, run.seed, step, loop.tracker, log)

    def save(folder):
        # the LoRA weights only, in the file `load_attn_procs(output_dir)` reads
        lora.save(c.prior, folder)
        return f"the LoRA weights ({lora.WEIGHTS_NAME}, {lora.file_size(folder) / 1e6:.2f} MB)"

    for epoch in loop.epochs():
        for batch in loop.micro_batches(epoch):
            with loop.accumulating():
                loop.backward(prior.loss(c, loop.model, batch, args.snr_gamma, precision))
            loop.step_if_due()
        loop.validate_if_due(epoch, validate)
    loop.finish(save, validate)


if __name__ == "__main__":
    params.run(main)
