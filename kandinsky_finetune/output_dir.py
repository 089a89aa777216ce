"""What a run may do to an --output_dir that is not new: never write into a model folder it reads, never silently
replace an earlier run's checkpoints or model (continue it with --resume_from_checkpoint, or start over with
--overwrite_output_dir, which deletes them once the new run's input is checked)."""
import json
import os

from .params import UsageError

SOURCE_FLAGS = {"prior": "--pretrained_prior_model_name_or_path", "decoder": "--pretrained_decoder_model_name_or_path"}


def check(args, kind, ctx):
    """Before anything loads, on every rank alike (rank 0's file system decides: only rank 0 writes output_dir)."""
    check_not_a_source(args, kind)
    if args.resume_from_checkpoint is not None or args.overwrite_output_dir:
        return
    from . import distributed

    steps, model = earlier_run(args.output_dir) if ctx.is_main else ([], False)
    # rank 0's [checkpoints, newest step, oldest step, saved model] on every rank, in one all-reduce
    count, newest, oldest, model = map(int, distributed.sum_across_ranks(
        [len(steps), steps[-1] if steps else 0, steps[0] if steps else 0, float(model)], ctx,
        what="agreeing on what output_dir holds"))
    if not count and not model:
        return
    held = ([f"checkpoint-{newest}" if count == 1 else f"{count} checkpoints (checkpoint-{oldest} to checkpoint-{newest})"]
            if count else []) + ["a saved model"] * model
    ways = ("continue it with --resume_from_checkpoint latest, or start over with --overwrite_output_dir (which deletes "
            "them)" if count else "start over with --overwrite_output_dir (which deletes it), or choose another "
            "--output_dir")
    error = UsageError(f"--output_dir {args.output_dir} already holds {' and '.join(held)} of an earlier run: {ways}")
    distributed.raise_together(error, ctx)


def check_not_a_source(args, kind):
    """--output_dir equal to or inside a local model folder the script reads would overwrite that model."""
    from .validation import prompts

    used = ["prior"] + (["decoder"] if kind == "decoder" or prompts(args) else [])  # a prior run's decoder validates
    out = os.path.realpath(args.output_dir)
    for name in used:
        source = getattr(args, SOURCE_FLAGS[name][2:])
        if not os.path.isdir(source):  # a hub id
            continue
        folder = os.path.realpath(source)
        if out == folder or out.startswith(folder.rstrip(os.sep) + os.sep):
            where = "is" if out == folder else "is inside"
            raise UsageError(f"--output_dir {args.output_dir} {where} {SOURCE_FLAGS[name]} {source}: the run would "
                             "write over the model it reads; choose another --output_dir")


def earlier_run(output_dir):
    """(sorted steps of its complete checkpoints, whether it holds a saved model) of an earlier run in output_dir.
    Logs, validation images and unfinished .tmp-* work alone do not count."""
    from .checkpoint_files import list_checkpoints

    return [step for step, _ in list_checkpoints(output_dir)], bool(saved_model(output_dir))


def saved_model(output_dir):
    """The entries of output_dir that a finished run wrote: a pipeline (model_index.json and its component folders)
    or a LoRA file, with the model card and its grid beside them; [] if there is no saved model."""
    from .checkpoint_files import PIPELINE_INDEX
    from .lora import WEIGHTS_NAME
    from .model_card import CARD, GRID

    index = os.path.join(output_dir, PIPELINE_INDEX)
    entries = []
    if os.path.isfile(index):
        try:
            with open(index) as f:
                components = [k for k, v in json.load(f).items() if isinstance(v, list)]
        except (OSError, ValueError):
            components = []
        entries += [PIPELINE_INDEX, *components]
    if os.path.isfile(os.path.join(output_dir, WEIGHTS_NAME)):
        entries.append(WEIGHTS_NAME)
    if entries:
        entries += [CARD, GRID]
    return [name for name in entries if os.path.lexists(os.path.join(output_dir, name))]


def clear_earlier_run(output_dir, log):
    """--overwrite_output_dir, on rank 0 once every input is checked: delete the earlier run's checkpoints, saved model
    (with its card) and validation images, so nothing of it mixes with the new run's. Logs stay."""
    from .checkpoint_files import discard, list_checkpoints

    gone = [path for _, path in list_checkpoints(output_dir)]
    gone += [os.path.join(output_dir, name) for name in saved_model(output_dir)]
    validation = os.path.join(output_dir, "validation")
    gone += [validation] if os.path.isdir(validation) else []
    for path in gone:
        discard(path)
    if gone:
        log(f"--overwrite_output_dir: deleted the earlier run's {', '.join(os.path.basename(p) for p in gone)} from "
            f"{output_dir}")


def prepare_output_dir(args, ctx, log):
    """Called once all input is checked, so a bad run leaves nothing behind (--overwrite_output_dir: not even
    deletes the earlier run's work before then)."""
    if ctx.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        from .checkpoint_files import remove_partial

        remove_partial(args.output_dir, log)
        if args.overwrite_output_dir:
            clear_earlier_run(args.output_dir, log)
