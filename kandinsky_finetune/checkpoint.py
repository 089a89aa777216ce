"""Checkpoints: `output_dir/checkpoint-<N>/` = model weights (loadable with `from_pretrained`) plus
`training_state.pdparams` (optimizer, lr schedule, EMA, loss scaler, step, seed).

A checkpoint is written under a temporary name and renamed when complete, so a folder named
`checkpoint-<N>` is always whole; rotation deletes old ones only after the new one exists.
"""
import os
import re
import shutil

import paddle

from .params import UsageError

PREFIX = "checkpoint-"
STATE_FILE = "training_state.pdparams"
_TMP_PREFIX = ".tmp-" + PREFIX


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
    """Delete temporary folders a crashed save left behind."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(_TMP_PREFIX):
            log(f"removing incomplete checkpoint {name} left by an interrupted save")
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def save(output_dir, step, write_weights, state, total_limit=None):
    """Write checkpoint-<step> atomically: `write_weights(folder)` saves the model(s), `state` goes to STATE_FILE."""
    final = os.path.join(output_dir, f"{PREFIX}{step}")
    tmp = os.path.join(output_dir, f"{_TMP_PREFIX}{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_weights(tmp)
    paddle.save(state, os.path.join(tmp, STATE_FILE))
    if os.path.exists(final):  # e.g. a resumed run reaching the same step again
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit is not None:
        for _, old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


class Checkpointer:
    """Saves and restores one run's checkpoints. `save_weights(folder)` / `load_weights(folder)` write and read
    the trained weights (a full model, or LoRA layers); the rest of the training state is common."""

    def __init__(self, args, seed, save_weights, load_weights, optimizer, lr_scheduler, precision, ema):
        self.args, self.seed = args, seed
        self.save_weights, self.load_weights = save_weights, load_weights
        self.optimizer, self.lr_scheduler, self.precision, self.ema = optimizer, lr_scheduler, precision, ema

    def save(self, step):
        state = {"global_step": step, "seed": self.seed, "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.precision.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None}
        return save(self.args.output_dir, step, self.save_weights, state, self.args.checkpoints_total_limit)

    def resume(self, run, log):
        """Restore the checkpoint `training.start_run` found, if any; return the step to continue from."""
        if run.resume_state is None:
            return 0
        step = self.restore(run.resume_path, run.resume_state)
        log(f"resumed from {run.resume_path} at step {step}")
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

    def save_weights(folder):
        model.save_pretrained(os.path.join(folder, name))
        if ema is not None:
            with ema_weights(ema, trainable):
                model.save_pretrained(os.path.join(folder, f"{name}_ema"))

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


def load_state(path):
    return paddle.load(os.path.join(path, STATE_FILE))


def load_weights_into(model, folder):
    """Copy the weights saved by `save_pretrained` in `folder` into the live `model` (keeps its parameters,
    so the optimizer's references stay valid)."""
    saved = type(model).from_pretrained(folder).state_dict()
    live = model.state_dict()
    for key, tensor in live.items():
        if key not in saved or list(saved[key].shape) != list(tensor.shape):
            found = list(saved[key].shape) if key in saved else "missing"
            raise ValueError(f"{key}: {found} in the checkpoint, {list(tensor.shape)} in the model")
    model.set_state_dict(saved)
