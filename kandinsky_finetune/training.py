"""The training loop every script runs: epochs, micro-batches, gradient accumulation and the optimizer step (`Loop`)."""
import contextlib
import itertools
import signal

import paddle

from .output_dir import prepare_output_dir
from .steps import accumulation_groups, plan_steps


class Loop:
    """Epochs, micro-batches and optimizer steps; the script computes the loss in between.

        loop = Loop(...)                   # resumes, creates output_dir and the tracker
        for epoch in loop.epochs():
            for batch in loop.micro_batches(epoch):
                with loop.accumulating():
                    loop.backward(loss)    # loss of `batch` with loop.model
                loop.step_if_due()         # after a group's last micro-batch: step, EMA, log, checkpoint
            loop.validate_if_due(epoch, validate)
        loop.finish(save, validate)

    Each micro-batch's loss is divided by the real size of its accumulation group; gradients are
    all-reduced on the group's last micro-batch only; the logged loss is the group's mean over all ranks.

    Faults (see faults.py): before each optimizer step one all-reduce brings every rank the loss, whether any
    gradient is non-finite and whether any rank got SIGTERM/SIGINT, so all ranks decide alike. A non-finite
    loss or gradient ends the run before the step (RunError); after a stop request the step completes, rank 0
    writes checkpoint-<step>, and every rank raises faults.Stopped. No checkpoint and no final save is ever
    written from non-finite weights.
    """

    def __init__(self, args, run, model, trainable, optimizer, lr_scheduler, ema, sampler, loader, checkpointer,
                 num_samples, note=""):
        from . import distributed, faults, tracking

        self.args, self.ctx, self.log, self.precision, self.clock = args, run.ctx, run.log, run.precision, run.clock
        self.run = run  # (for the model card)
        self.trainable, self.optimizer, self.lr_scheduler, self.ema = trainable, optimizer, lr_scheduler, ema
        self.sampler, self.loader, self.checkpointer = sampler, loader, checkpointer
        self.steps_per_epoch, self.max_train_steps, self.num_epochs = plan_steps(
            sampler.batches_per_epoch, args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps)
        # the ranks' first collective since start_run: each arrives after minutes of loading, at its own time
        faults.injected_delay("loading")
        distributed.wait_for_everyone("loading their models and data", self.ctx)
        if args.sharding:  # before resuming: each rank's sharding optimizer takes its own part of the saved state
            from . import sharding

            model, self.optimizer = sharding.wrap(model, optimizer, self.precision, args)
            checkpointer.optimizer = self.optimizer
            if sharding.is_stage3(model):
                checkpointer.load_weights = sharding.loads_into_slices(model, checkpointer.load_weights)
        self.global_step = checkpointer.resume(run, self.log)
        self._first_step = self.global_step + 1
        # From here on a stop signal becomes a checkpoint; once rank 0 is past the barrier, on every rank
        self.stop = faults.StopRequest().install()
        distributed.barrier(self.ctx)
        self.model = model if args.sharding else distributed.wrap(model, self.ctx)
        prepare_output_dir(args, self.ctx, self.log)
        self.tracker = tracking.Tracker(args, self.ctx.is_main)
        self.log(f"{num_samples} samples, {self.ctx.world_size} process(es), {self.steps_per_epoch} optimizer steps "
                 f"per epoch, {self.max_train_steps} steps in all{note}")
        self._group, self._last, self._losses = 1, True, []
        self._batches = None  # the loader's stream of batches, while epochs() runs
        self.clock.samples_per_step = args.train_batch_size * args.gradient_accumulation_steps * self.ctx.world_size
        self.bar = tracking.progress_bar(self.max_train_steps, self.global_step, self.ctx.is_main)

    @property
    def done(self):
        return self.global_step >= self.max_train_steps

    def epochs(self):
        self.clock.start_training()
        first = self.global_step // self.steps_per_epoch
        self._first_epoch_skip = (first, (self.global_step - first * self.steps_per_epoch)  # > 0 when resuming
                                  * self.args.gradient_accumulation_steps)
        # one stream over all epochs, so reading ahead does not stop at an epoch's end
        self._batches = self.loader.epochs(first, self._first_epoch_skip[1], self.num_epochs)
        try:
            for epoch in range(first, self.num_epochs):
                if self.done:
                    return
                yield epoch
        finally:  # the loader's read-ahead thread stops here, not whenever the iterator is collected
            self._end_batches()

    def _end_batches(self):
        getattr(self._batches, "close", lambda: None)()
        self._batches = None

    def micro_batches(self, epoch):
        skip = self._first_epoch_skip[1] if epoch == self._first_epoch_skip[0] else 0
        num_batches = self.sampler.batches_per_epoch - skip
        batches = itertools.islice(self._batches, num_batches)
        for batch, self._group, self._last in accumulation_groups(batches, num_batches,
                                                                  self.args.gradient_accumulation_steps):
            yield batch
            if self.done:
                self._end_batches()  # nothing more is read ahead
                return

    def accumulating(self):
        from .distributed import no_sync_unless

        return no_sync_unless(self._last, self.model)

    def backward(self, loss):
        if self._group > 1:  # (divided by 1 it is the same loss and gradient, with one op more each way)
            loss = loss / self._group
        self.precision.backward(loss)
        self._losses.append(loss.detach())  # read in _step, once per optimizer step: on a GPU each read is a wait

    def step_if_due(self):
        """After a group's last micro-batch: check, step, EMA, log; a checkpoint when due or when asked to stop."""
        if not self._last:
            return
        try:
            self._step()
        except BaseException:  # the progress bar closes before the error line
            self._close()
            raise

    def _step(self):
        from . import distributed, faults
        from .optimization import clip_gradients
        from .sharding import local_gradients

        step = self.global_step + 1
        grads = local_gradients(self.model, self.trainable)
        self.precision.unscale(self.optimizer)
        # Clipping computes the global norm anyway: it is the finite check; without clipping, a pass of its own.
        # With --sharding the optimizer clips (sharding.wrap): here each rank's own, unreduced gradients are checked
        max_norm = self.args.max_grad_norm
        clip_here = max_norm > 0 and not self.args.sharding
        grads_finite = clip_gradients(grads, max_norm) if clip_here else faults.all_finite(grads)
        loss = 0.0  # the group's micro-batch losses, read at once now that the device has finished the backward pass
        for value in paddle.stack(self._losses).numpy().tolist():
            loss += value
        loss, bad_grads, stop = distributed.sum_across_ranks(
            [loss, 0.0 if grads_finite else 1.0, 1.0 if self.stop.signum else 0.0], self.ctx)
        loss /= self.ctx.world_size
        try:  # every rank has the same loss and count, so all stop here together
            warning = faults.check_step(step, loss, bad_grads == 0, self.precision.scaler)
        except faults.RunError as e:
            distributed.raise_together(e, self.ctx)
        if warning:
            self.log.warn(warning)
        self.precision.step(self.optimizer)
        if self.args.sharding and step == self._first_step:
            from .sharding import log_shares

            log_shares(self.optimizer, self.log, self.model, self.trainable)
        self.lr_scheduler.step()
        # Gradients are freed, not zeroed: between steps (checkpoints, validation) their memory is free
        self.optimizer.clear_grad(set_to_zero=False)
        if self.ema is not None:
            self.ema.step(self.trainable)
        self.global_step += 1
        self.clock.step_done()
        logged = {"train_loss": loss, "lr": self.lr_scheduler.get_lr()}
        self._losses = []
        self.tracker.scalars(logged, self.global_step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{logged['train_loss']:.4f}", lr=f"{logged['lr']:.2e}", refresh=False)
        if self.global_step % self.args.checkpointing_steps == 0 or stop:
            path = self._checkpoint()
        if stop:
            distributed.barrier(self.ctx)  # no rank exits while rank 0 still writes
            signum = self.stop.signum or signal.SIGTERM  # (a signal another rank got)
            self.log(f"stopped by {signal.Signals(signum).name} after step {self.global_step}: saved {path}; "
                     "continue with --resume_from_checkpoint latest")
            distributed.raise_together(faults.Stopped(signum), self.ctx)

    def _checkpoint(self):
        """checkpoint-<step> (checkpoint.write_from_loop); its path on rank 0, None on the other ranks."""
        from .checkpoint import write_from_loop

        self.tracker.flush(to_disk=True)  # the log on disk has every step up to the checkpoint
        return write_from_loop(self)

    def paused(self):
        """A while in which the loader reads nothing ahead (validation runs the same frozen encoders)."""
        return getattr(self._batches, "paused", contextlib.nullcontext)()

    def _close(self):
        """End of the run, whatever the way: the progress bar, the tracker, the signal handlers."""
        if self.stop is None:
            return
        if self._batches is not None:
            self._end_batches()
        self.bar.close()
        self.tracker.close()
        self.stop.restore()
        self.stop = None

    def validate_if_due(self, epoch, validate):
        """`validate(step)` after epochs 0, every, 2*every, ... (see validation.if_due)."""
        from .validation import if_due

        if_due(self, epoch, validate)

    def finish(self, save, validate):
        """The end of training: the final save (final_save.py) on rank 0 while every rank waits, then each rank leaves."""
        from . import distributed, final_save
        from .optimization import release_optimizer_state

        self.bar.close()
        self.clock.stop_training()
        release_optimizer_state(self.optimizer)  # the last checkpoint is written: the final save needs the room
        distributed.barrier(self.ctx)
        try:
            final_save.run(self, save, validate)
        finally:
            self._close()
        distributed.leave(self.ctx)
        self.log(self.clock.summary())
