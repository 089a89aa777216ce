"""A run's checkpoints (`output_dir/checkpoint-<N>/`: model weights loadable with `from_pretrained`, plus the training
state): saved and restored by `Checkpointer`, the one to resume from, the training loop's, from finite weights only.

How a checkpoint folder is written whole: checkpoint_files.py; the training state's files: training_state.py.
"""
import os

import paddle

from .checkpoint_files import list_checkpoints, save
from .faults import RunError
from .params import UsageError
from .training_state import STATE_FILE

class Checkpointer:
    """Saves and restores one run's checkpoints. `save_weights(folder)` / `load_weights(folder)` write and read
    the trained weights (a full model, or LoRA layers); the rest of the training state is common."""

    def __init__(self, args, seed, save_weights, load_weights, optimizer, lr_scheduler, precision, ema):
        self.args, self.seed = args, seed
        self.save_weights, self.load_weights = save_weights, load_weights
        self.optimizer, self.lr_scheduler, self.precision, self.ema = optimizer, lr_scheduler, precision, ema

    def save(self, step, alone=None):
        """checkpoint-<step>, written by rank 0 as `alone(work)` (distributed.on_rank_0, which the other ranks join;
        it returns the path on rank 0, None on the others). With --sharding every rank calls it: first the other ranks
        send rank 0 their part of the optimizer state (sharding.py; the checkpoint holds all of it), and only once
        that exchange is over does rank 0 touch the disk, so no rank waits in a collective while rank 0 writes."""
        alone = alone or (lambda work: work())
        if getattr(self.args, "sharding", None):
            from .sharded_checkpoint import gathered_state, received, take_part

            optimizer = gathered_state(self.optimizer)
            if paddle.distributed.get_rank() != 0:
                take_part(optimizer)
                return alone(lambda: None)
            optimizer = received(optimizer)
        else:
            optimizer = self.optimizer.state_dict()
        state = {"global_step": step, "seed": self.seed, "processes": paddle.distributed.get_world_size(),
                 "optimizer": optimizer,
                 "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.precision.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None}
        return alone(lambda: save(self.args.output_dir, step, self.save_weights, state,
                                  self.args.checkpoints_total_limit))

    def resume(self, run, log):
        """Restore the checkpoint `startup.start_run` found, if any; return the step to continue from."""
        if run.resume_state is None:
            return 0
        step = self.restore(run.resume_path, run.resume_state)
        log(f"resumed from {run.resume_path} at step {step}")
        written_by = run.resume_state.get("processes", run.ctx.world_size)
        run.resume_state = None  # what the optimizer and EMA did not take is freed now, not at the end of the run
        if written_by != run.ctx.world_size:  # works: every checkpoint holds the whole optimizer state
            log(f"the checkpoint was written by {written_by} process(es), this run has {run.ctx.world_size}: the "
                f"optimizer state is whole, but from here on each step sees other batches than a {written_by}-process "
                "run would")
        return step

    def restore(self, path, state):
        """Load weights and training state from checkpoint `path`; return the step it was taken at. A checkpoint
        of another model or LoRA rank is one clear error, not a shape error from deep inside paddle."""
        try:
            return self._restore(path, state)
        except (ValueError, KeyError, AssertionError, RuntimeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f"--resume_from_checkpoint: {path} does not fit this run ({reason}); resume with the "
                             "model, --lora_rank and options it was written with") from None

    def _restore(self, path, state):
        self.load_weights(path)
        self.optimizer.set_state_dict(state["optimizer"])
        self.lr_scheduler.set_state_dict(state["lr_scheduler"])
        self.precision.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise UsageError(f"--use_ema: checkpoint {path} was written without EMA; resume without --use_ema")
            self.ema.load_state_dict(state["ema"])
        return state["global_step"]


def full_model_weights(model, name, ema=None, trainable=None):
    """(save, load) for a fully fine-tuned model kept as `<checkpoint>/<name>/` (and `<name>_ema/` with EMA),
    each loadable with `from_pretrained`."""
    from .ema import ema_weights

    from .models import save_model

    def save_weights(folder):
        save_model(model, os.path.join(folder, name))
        if ema is not None:
            with ema_weights(ema, trainable):
                save_model(model, os.path.join(folder, f"{name}_ema"))

    def load_weights(folder):
        load_weights_into(model, os.path.join(folder, name))

    return save_weights, load_weights


def resolve(resume_from, output_dir):
    """The checkpoint folder to resume from, or None for a fresh start."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = resume_from if os.path.isdir(resume_from) else os.path.join(output_dir, resume_from)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise UsageError(f"--resume_from_checkpoint {resume_from}: {path} is not a complete checkpoint "
                         f"(no {STATE_FILE})")
    return path


def written_by(path):
    """(model, lora) of the script that wrote checkpoint `path`, from what it holds (checkpoints of every version
    alike): a full run's model folder (prior/ or unet/), or a LoRA file, whose layer names tell the UNet's
    down/mid/up blocks from the prior's transformer blocks. None if it is none of these."""
    from .lora import WEIGHTS_NAME
    from .tensor_files import safetensors_header

    for model, folder in (("prior", "prior"), ("decoder", "unet")):
        if os.path.isdir(os.path.join(path, folder)):
            return model, False
    lora_file = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(lora_file):
        names = [k for k in safetensors_header(lora_file) if k != "__metadata__"]
        unet = any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in names)
        return ("decoder" if unet else "prior"), True
    return None


def check_written_by(path, kind, lora):
    """A checkpoint of another script (full or LoRA, prior or decoder) is one line naming that script, before anything
    loads (its weights are not where this script looks: it would ask the hub for them)."""
    found = written_by(path)
    if found is None or found == (kind, lora):
        return
    model, other_lora = found
    script = f"train_text_to_image_{model}{'_lora' if other_lora else ''}.py"
    this = f"train_text_to_image_{kind}{'_lora' if lora else ''}.py"
    raise UsageError(f"--resume_from_checkpoint: {path} was written by {script} ({model}, "
                     f"{'LoRA' if other_lora else 'full fine-tuning'}), not {this}: resume it with that script")


def check_every_rank_resumes_alike(args, resume_state, ctx):
    """Each rank finds --resume_from_checkpoint in its own file system: on several machines one that does not see
    rank 0's checkpoint would start over and train a different number of steps. Then every rank stops."""
    from . import distributed

    if args.resume_from_checkpoint is None or ctx.world_size == 1:
        return
    step = resume_state["global_step"] if resume_state is not None else -1
    rank_0_step = distributed.broadcast_int(step, ctx)
    (others,) = distributed.sum_across_ranks([float(step != rank_0_step)], ctx, what="comparing the checkpoints found")
    if others:
        def found(s):
            return f"checkpoint-{s}" if s >= 0 else "no checkpoint"

        here = "" if step == rank_0_step else f"; rank {ctx.rank} finds {found(step)}"
        distributed.raise_together(UsageError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint}: {int(others)} of {ctx.world_size} processes do "
            f"not find the checkpoint rank 0 resumes from ({found(rank_0_step)}{here}): every machine must see "
            "output_dir's checkpoints: put --output_dir on a shared file system, or copy the checkpoint to the same "
            "path on each machine"), ctx)


def load_weights_into(model, folder):
    """Copy the weights saved by `save_pretrained` in `folder` into the live `model` (keeps its parameters,
    so the optimizer's references stay valid), a tensor at a time where the file allows it."""
    import glob

    from .tensor_files import read_safetensors_into

    files = glob.glob(os.path.join(folder, "*.safetensors"))
    if len(files) == 1 and read_safetensors_into(model, files[0]):
        return
    saved = type(model).from_pretrained(folder).state_dict()
    live = model.state_dict()
    for key, tensor in live.items():
        if key not in saved or list(saved[key].shape) != list(tensor.shape):
            found = list(saved[key].shape) if key in saved else "missing"
            raise ValueError(f"{key}: {found} in the checkpoint, {list(tensor.shape)} in the model")
    model.set_state_dict(saved)


def write_from_loop(loop):
    """The training loop's checkpoint-<step> (training.Loop), from finite weights only: written by rank 0 while the
    others wait in on_rank_0's heartbeats (with --sharding they first send it their optimizer shards, then wait the same
    way); returns its path (None on other ranks)."""
    from .distributed import on_rank_0
    from .sharding import whole_parameters

    def write(alone=None):
        with loop.clock.phase("checkpointing"):
            path = loop.checkpointer.save(loop.global_step, alone)
        if path:
            loop.log(f"saved {path}")
        return path

    what = f"writing checkpoint-{loop.global_step}"
    check_weights(loop)
    with whole_parameters(loop.model):  # (--sharding stage3: gathered to rank 0, which writes them)
        if loop.args.sharding:  # every rank takes part in writing the optimizer state; the rest is rank 0's alone
            return write(alone=lambda work: on_rank_0(what, work, loop.ctx))
        return on_rank_0(what, write, loop.ctx)


def check_weights(loop, whole=False):
    """Nothing is saved from non-finite weights (and EMA weights) of the loop's model. Every rank checks what it holds
    (with --sharding stage3 its slices, and all ranks agree); `whole`: rank 0 alone, with the weights gathered."""
    from . import distributed
    from .faults import all_finite
    from .sharding import is_stage3, local_weights

    held = loop.trainable if whole else local_weights(loop.model, loop.trainable)
    finite = all_finite(list(held) + (list(loop.ema.shadow_params) if loop.ema is not None else []))
    agreed = is_stage3(loop.model) and not whole
    if agreed:
        finite = distributed.sum_across_ranks([0.0 if finite else 1.0], loop.ctx)[0] == 0
    if not finite:
        error = RunError(f"step {loop.global_step}: the weights are not finite after this optimizer step: "
                         "training diverged; nothing was saved from it (try a lower --learning_rate, or "
                         "--max_grad_norm)")
        if agreed:
            distributed.raise_together(error, loop.ctx)
        raise error
