"""The end of a run: the EMA weights into the model, the weights check, a last validation, the model and its card
published into output_dir, the upload."""


def run(loop, save, validate):
    """Rank 0: the EMA weights (if any) become the model, a last validation (if asked), `save(folder)` (which returns
    what it saved, for the log) and the model card moved into output_dir by `checkpoint_files.publish`, the upload (if
    asked). Every rank waits for it (distributed.on_rank_0), so none exits while rank 0 still writes."""
    from . import distributed
    from .sharding import is_stage3, whole_parameters
    from .validation import in_loop, prompts

    if is_stage3(loop.model):  # every rank validates (see validation.if_due), then the weights are gathered
        if prompts(loop.args):
            in_loop(loop, validate)
        validate = None
    what = ", ".join(["validating"] * bool(validate and prompts(loop.args)) + ["saving the final model"]
                     + ["uploading it"] * bool(loop.args.push_to_hub or loop.args.save_to_aistudio))
    with whole_parameters(loop.model):
        distributed.on_rank_0(what, lambda: _on_rank_0(loop, save, validate), loop.ctx)


def _on_rank_0(loop, save, validate):
    from . import hub, model_card
    from .checkpoint import check_weights
    from .checkpoint_files import publish
    from .faults import injected_delay
    from .validation import in_loop, prompts

    if loop.ema is not None:
        loop.ema.copy_to(loop.trainable)
    check_weights(loop, whole=True)
    if validate is not None and prompts(loop.args):
        in_loop(loop, validate)
    with loop.clock.phase("saving"):
        injected_delay("final_save")
        what = publish(loop.args.output_dir, model_card.with_card(save, loop.args, loop.run, loop.global_step))
    loop.log(f"saved {what} to {loop.args.output_dir}")
    if loop.args.push_to_hub or loop.args.save_to_aistudio:
        hub.upload(loop.args, loop.log)
