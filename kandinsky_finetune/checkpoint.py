"""Checkpoints: `output_dir/checkpoint-<N>/` = model weights (loadable with `from_pretrained`) plus
`training_state.pdparams` (optimizer, lr schedule, EMA, loss scaler, step, seed, number of processes).

Nothing is ever half-written under a name a later run or a user would load. A checkpoint is written into
`.tmp-checkpoint-<N>`, synced to disk, and renamed to `checkpoint-<N>` when complete; rotation deletes old
ones only after the new one exists (renaming them to `.tmp-...` first, so a crash mid-delete leaves no
half-deleted checkpoint). The final save goes through `.tmp-output` the same way (see `publish`). Whatever
`.tmp-*` a crash leaves behind, the next run removes with a warning. A failed write (full disk, no
permission) removes its temporary folder and ends the run with one line; earlier checkpoints stay intact.
"""
import contextlib
import os
import re
import shutil

import paddle

from .faults import RunError, first_line, is_write_error
from .params import UsageError
from .sharding import is_tensor

PREFIX = "checkpoint-"
STATE_FILE = "training_state.pdparams"  # step, seed, schedules; written last of all, so it marks a complete checkpoint
STATE_TENSORS = "training_state.safetensors"  # the optimizer's and EMA's tensors, written a tensor at a time
_TENSOR = "__tensor__"  # stands in STATE_FILE for a tensor kept in STATE_TENSORS
TMP = ".tmp-"  # unfinished work: removed by the next run
PIPELINE_INDEX = "model_index.json"  # what makes a folder load as a pipeline: moved into place last


def list_checkpoints(output_dir):
    """Complete checkpoints as sorted (step, path) pairs."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)", name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def remove_partial(output_dir, log):
    """Delete what an interrupted run left unfinished (a checkpoint or final save being written, an old
    checkpoint being deleted), with one warning line each."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        if name.startswith(TMP):
            log.warn(f"removing {os.path.join(output_dir, name)}: left incomplete by an interrupted run")
            _remove(os.path.join(output_dir, name))


def save(output_dir, step, write_weights, state, total_limit=None):
    """Write checkpoint-<step> atomically: `write_weights(folder)` saves the model(s), `state` goes to STATE_FILE;
    then keep the `total_limit` newest (the new one always among them). All of it rank 0's work alone: with several
    processes it runs under distributed.on_rank_0, the other ranks' shards already in `state` (Checkpointer.save)."""
    from .faults import injected_delay

    final = os.path.join(output_dir, f"{PREFIX}{step}")
    tmp = os.path.join(output_dir, f"{TMP}{PREFIX}{step}")
    injected_delay("checkpoint")
    with _writing(tmp, f"checkpoint {final}", output_dir):
        write_weights(tmp)
        write_state(state, tmp)
        _sync(tmp)
        discard(final)  # e.g. a resumed run reaching the same step again
        os.rename(tmp, final)
        _sync_dir(output_dir)
    if total_limit is not None:
        older = [path for _, path in list_checkpoints(output_dir) if path != final]
        for path in older[:max(0, len(older) - (total_limit - 1))]:
            try:
                discard(path)
            except OSError as e:
                raise RunError(f"cannot delete old checkpoint {path} (--checkpoints_total_limit): "
                               f"{first_line(e)}") from None
    return final


def publish(output_dir, write):
    """The final save. `write(folder)` fills `output_dir/.tmp-output`; once it is complete and synced, each entry
    is renamed into output_dir: folders first, then files, `model_index.json` last (an old one is removed
    before anything moves). So output_dir only looks like a loadable pipeline once it is one, and a single
    weights file (LoRA) is replaced in one rename. output_dir itself cannot be renamed: it also holds the
    checkpoints and logs. Returns what `write` returns."""
    tmp = os.path.join(output_dir, f"{TMP}output")
    with _writing(tmp, f"the final model to {output_dir}", output_dir):
        result = write(tmp)
        _sync(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: (n == PIPELINE_INDEX, os.path.isfile(os.path.join(tmp, n)), n))
        if PIPELINE_INDEX in names and os.path.lexists(os.path.join(output_dir, PIPELINE_INDEX)):
            os.remove(os.path.join(output_dir, PIPELINE_INDEX))
        for name in names:
            src, dst = os.path.join(tmp, name), os.path.join(output_dir, name)
            if os.path.isdir(src):
                discard(dst)
                os.rename(src, dst)
            else:
                os.replace(src, dst)
        _sync_dir(output_dir)
        os.rmdir(tmp)
    return result


@contextlib.contextmanager
def _writing(tmp, what, output_dir):
    """Write into the fresh folder `tmp`; on any failure remove it, and turn a file-system error into a RunError
    naming the last complete checkpoint, which is untouched."""
    try:
        _remove(tmp)  # a leftover of a crashed run
        os.makedirs(tmp)
        yield
    except BaseException as e:
        _remove(tmp)
        if not is_write_error(e):
            raise
        found = list_checkpoints(output_dir)
        kept = f"the last complete checkpoint, {found[-1][1]}, is intact" if found else "no checkpoint was written yet"
        raise RunError(f"cannot write {what}: {first_line(e)}; {kept}") from None


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


def discard(path):
    """Delete a folder so that a crash never leaves it half-deleted under its name: rename it away first."""
    if not os.path.lexists(path):
        return
    trash = os.path.join(os.path.dirname(path), f"{TMP}delete-{os.path.basename(path)}")
    _remove(trash)
    os.rename(path, trash)
    _remove(trash)


def _sync(folder):
    """fsync every file and folder under `folder`, so a rename published after it never points at data still in
    the page cache (a machine that loses power, a preempted VM)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(root)


def _sync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the files are synced
        pass
    finally:
        os.close(fd)


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
            from . import sharding

            optimizer = sharding.gathered_state(self.optimizer)
            if paddle.distributed.get_rank() != 0:
                sharding.take_part(optimizer)
                return alone(lambda: None)
            optimizer = sharding.received(optimizer)
        else:
            optimizer = self.optimizer.state_dict()
        state = {"global_step": step, "seed": self.seed, "processes": paddle.distributed.get_world_size(),
                 "optimizer": optimizer,
                 "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.precision.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None}
        return alone(lambda: save(self.args.output_dir, step, self.save_weights, state,
                                  self.args.checkpoints_total_limit))

    def resume(self, run, log):
        """Restore the checkpoint `training.start_run` found, if any; return the step to continue from."""
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
    from .training import ema_weights

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


def write_state(state, folder):
    """The training state: its tensors (AdamW's moments, EMA weights: 12 bytes per trained parameter) streamed to
    STATE_TENSORS, the rest pickled to STATE_FILE. paddle.save of the whole state would hold a host copy of every
    tensor until the file is complete (its pickler keeps them), twice the optimizer's memory at real size."""
    from .tensor_files import write_safetensors

    tensors = {}
    skeleton = _split(state, "", tensors)
    write_safetensors(tensors, os.path.join(folder, STATE_TENSORS))
    paddle.save(skeleton, os.path.join(folder, STATE_FILE))


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


def load_state(path, mapped_optimizer=False):
    """The training state written by `write_state` (or, from older checkpoints, pickled whole). With
    `mapped_optimizer`, the optimizer's tensors are read-only memory maps of the file, read only when the optimizer
    takes them: a sharded run's process reads its own part of the moments, not every process all of them (and none
    of them sits on the device before the optimizer does)."""
    state = paddle.load(os.path.join(path, STATE_FILE))
    tensors_file = os.path.join(path, STATE_TENSORS)
    if not os.path.isfile(tensors_file):
        return state
    from .tensor_files import map_safetensors, read_safetensors

    optimizer = "/optimizer/"
    tensors = read_safetensors(tensors_file, skip=lambda name: mapped_optimizer and name.startswith(optimizer))
    if mapped_optimizer:
        tensors.update((k, v) for k, v in map_safetensors(tensors_file).items() if k.startswith(optimizer))
    return _join(state, tensors.__getitem__)


def _split(obj, path, tensors):
    """`obj` with each tensor replaced by {_TENSOR: its path}, the tensors collected in `tensors` by path."""
    if is_tensor(obj):
        tensors[path] = obj
        return {_TENSOR: path}
    if isinstance(obj, dict):
        return {k: _split(v, f"{path}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj))
    return obj


def _join(obj, tensor):
    if isinstance(obj, dict):
        if obj.keys() == {_TENSOR}:
            return tensor(obj[_TENSOR])
        return {k: _join(v, tensor) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join(v, tensor) for v in obj)
    return obj


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
