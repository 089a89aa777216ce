"""Checkpoint and final-model folders on disk, each complete under its name or not there at all; the complete
checkpoints listed; what a crash left half-written removed.

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

from .faults import RunError, first_line, is_write_error
from .training_state import STATE_FILE, write_state

PREFIX = "checkpoint-"
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
