"""The training-loop pieces every script uses: the step plan, gradient accumulation, the diffusion loss
with Min-SNR weighting, the optimizer and lr schedule, mixed precision and device settings."""
import contextlib
import itertools
import math
import os
import signal

import paddle
import paddle.nn.functional as F

from .params import UsageError


# ---------------------------------------------------------------- plan and accumulation
def plan_steps(batches_per_epoch, accumulation, num_train_epochs, max_train_steps):
    """(optimizer steps per epoch, total steps, epochs). An epoch's last, shorter accumulation group still
    makes an optimizer step, so no gradient is carried into the next epoch."""
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    if max_train_steps is None:
        max_train_steps = num_train_epochs * steps_per_epoch
    return steps_per_epoch, max_train_steps, math.ceil(max_train_steps / steps_per_epoch)


def accumulation_groups(batches, num_batches, accumulation):
    """Yield (batch, group_size, is_last) so each micro-batch's loss can be divided by its group's real size
    and gradients synchronised on the last one only."""
    for i, batch in enumerate(batches):
        start = i - i % accumulation
        size = min(accumulation, num_batches - start)
        yield batch, size, i - start == size - 1


# ---------------------------------------------------------------- loss
def min_snr_weights(alphas_cumprod, timesteps, gamma, prediction_type):
    """Per-sample Min-SNR-gamma weights (Hang et al. 2023) for a loss on the given prediction type."""
    alpha_bar = alphas_cumprod.cast("float32")[timesteps]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = paddle.minimum(snr, paddle.full_like(snr, gamma))
    if prediction_type == "epsilon":
        # min(snr, g) / snr written without dividing when snr < g (snr can be 0 at the last timestep)
        return paddle.where(snr < gamma, paddle.ones_like(snr), gamma / snr)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def diffusion_loss(pred, target, timesteps, noise_scheduler, snr_gamma):
    """MSE per sample, Min-SNR weighted when snr_gamma is set, averaged over the batch."""
    per_sample = F.mse_loss(pred.cast("float32"), target.cast("float32"), reduction="none")
    per_sample = per_sample.reshape([per_sample.shape[0], -1]).mean(axis=1)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(noise_scheduler.alphas_cumprod, timesteps, snr_gamma,
                                                  noise_scheduler.config.prediction_type)
    return per_sample.mean()


def diffusion_target(noise_scheduler, clean, noise, timesteps):
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return clean
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    raise UsageError(f"unsupported scheduler prediction_type {kind!r}")


# ---------------------------------------------------------------- tensors and models
def as_tensor(x):
    """A loader's tensor as it is, a numpy array (the cache's encoding batches) as a tensor."""
    return x if isinstance(x, paddle.Tensor) else paddle.to_tensor(x)


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.stop_gradient = True
    return model


# ---------------------------------------------------------------- precision and device
def on_gpu():
    return "gpu" in paddle.get_device()


class Precision:
    """--mixed_precision: autocast (O1) in fp16/bf16 with a dynamic loss scaler for fp16; trainable weights
    stay fp32. Paddle's autocast does nothing on CPU, so there the run says so and trains in fp32."""

    def __init__(self, mode, log):
        self.mode, self.enabled = mode, mode != "no" and on_gpu()
        if mode != "no" and not self.enabled:
            log.warn(f"--mixed_precision {mode} needs a GPU (Paddle's autocast is a no-op on "
                     f"{paddle.get_device()}); training in fp32")
        if self.enabled and mode == "bf16" and not paddle.amp.is_bfloat16_supported():
            raise UsageError("--mixed_precision bf16: this GPU does not support bfloat16; use fp16")
        self.dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(mode) if self.enabled else "float32"
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=2.0 ** 15) if self.enabled and mode == "fp16" else None

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, dtype=self.dtype, level="O1")

    def cast_frozen(self, *models):
        """Frozen models run in the low precision to save memory; nothing trains in it, and outputs take the frozen
        components from their source files (output.py), never from these copies."""
        if self.enabled:
            for m in models:
                m.to(dtype=self.dtype)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer):
        """fp16: divide the gradients by the loss scale now, so clipping sees their true norm."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer):
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self):
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state):
        if self.scaler and state:
            self.scaler.load_state_dict(state)


def memory_efficient_attention(model, wanted, log):
    """--enable_xformers_memory_efficient_attention: Paddle's memory-efficient scaled-dot-product attention, where
    this device and build have it (ppdiffusers checks by running the kernel once)."""
    from ppdiffusers.utils import is_ppxformers_available

    if not wanted:
        return
    if is_ppxformers_available():
        model.enable_xformers_memory_efficient_attention()
    else:
        log.warn("--enable_xformers_memory_efficient_attention: Paddle's memory-efficient attention is not available "
                 f"on {paddle.get_device()} with this Paddle build; using standard attention")


def configure_tf32(allow_tf32, log):
    """As the references' flag (PyTorch's matmul switch): TF32 matmuls (cuBLAS) only with --allow_tf32, where Paddle's
    GPU build allows them by default. cuDNN convolutions keep Paddle's default, TF32 allowed, which is PyTorch's default
    too (the references leave it). Paddle's own switch, set before any GPU kernel runs."""
    if not on_gpu():
        if allow_tf32:
            log.warn("--allow_tf32 only affects NVIDIA GPUs; ignored on " + paddle.get_device())
        return
    paddle.base.core.set_cublas_switch(allow_tf32)


# ---------------------------------------------------------------- EMA
def build_ema(parameters, use_ema):
    if not use_ema:
        return None
    from ppdiffusers.training_utils import EMAModel

    return EMAModel(parameters)


@contextlib.contextmanager
def ema_weights(ema, parameters):
    """Put the EMA weights into the live model for a while (validation, the checkpoint's EMA copy)."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


# ---------------------------------------------------------------- the loop's book-keeping
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
        """checkpoint-<step>, written by rank 0 while the others wait in on_rank_0's heartbeats (with --sharding they
        first send it their optimizer shards, then wait the same way); returns its path (None on other ranks)."""
        from .distributed import on_rank_0
        from .sharding import whole_parameters

        what = f"writing checkpoint-{self.global_step}"
        self._check_weights()
        with whole_parameters(self.model):  # (--sharding stage3: gathered to rank 0, which writes them)
            if self.args.sharding:  # every rank takes part in writing the optimizer state; the rest is rank 0's alone
                return self._write_checkpoint(alone=lambda work: on_rank_0(what, work, self.ctx))
            return on_rank_0(what, self._write_checkpoint, self.ctx)

    def _write_checkpoint(self, alone=None):
        with self.clock.phase("checkpointing"):
            path = self.checkpointer.save(self.global_step, alone)
        if path:
            self.log(f"saved {path}")
        return path

    def _check_weights(self, whole=False):
        """Every rank checks what it holds (with --sharding stage3 its slices, and all ranks agree); `whole`: rank 0
        alone, with the weights gathered."""
        from . import distributed
        from .faults import RunError, all_finite
        from .sharding import is_stage3, local_weights

        held = self.trainable if whole else local_weights(self.model, self.trainable)
        finite = all_finite(list(held) + (list(self.ema.shadow_params) if self.ema is not None else []))
        agreed = is_stage3(self.model) and not whole
        if agreed:
            finite = distributed.sum_across_ranks([0.0 if finite else 1.0], self.ctx)[0] == 0
        if not finite:
            error = RunError(f"step {self.global_step}: the weights are not finite after this optimizer step: "
                             "training diverged; nothing was saved from it (try a lower --learning_rate, or "
                             "--max_grad_norm)")
            if agreed:
                distributed.raise_together(error, self.ctx)
            raise error

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
        """`validate(step)` after epochs 0, every, 2*every, ... (counting from 0), on rank 0 while the others wait,
        when there is a prompt; the end of training validates in finish(). With --sharding stage3 every rank
        validates alike (the trained model's layers gather their slices from every rank); rank 0 writes the images."""
        from .distributed import on_rank_0
        from .sharding import is_stage3
        from .validation import prompts

        if prompts(self.args) and epoch % self.args.validation_epochs == 0 and not self.done:
            if is_stage3(self.model):
                self._validate(validate)
            else:
                on_rank_0(f"validating at step {self.global_step}", lambda: self._validate(validate), self.ctx)

    def _validate(self, validate):
        from .faults import injected_delay

        # the read-ahead thread waits meanwhile: validation runs the same frozen encoders. Entered in the thread that
        # validates (autocast is per thread): frozen parts may be in half precision
        paused = getattr(self._batches, "paused", contextlib.nullcontext)
        with paused(), self.clock.phase("validation"), self.precision.autocast():
            injected_delay("validation")
            validate(self.global_step)

    def finish(self, save, validate):
        """Rank 0: the EMA weights (if any) become the model, a last validation (if asked), `save(folder)` (which
        returns what it saved, for the log) and the model card moved into output_dir by `checkpoint.publish`, the
        upload (if asked). Every rank waits for it (distributed.on_rank_0), so none exits while rank 0 still writes."""
        from . import distributed
        from .optimization import release_optimizer_state
        from .sharding import is_stage3, whole_parameters
        from .validation import prompts

        self.bar.close()
        self.clock.stop_training()
        release_optimizer_state(self.optimizer)  # the last checkpoint is written: the final save needs the room
        distributed.barrier(self.ctx)
        try:
            if is_stage3(self.model):  # every rank validates (see validate_if_due), then the weights are gathered
                if prompts(self.args):
                    self._validate(validate)
                validate = None
            what = ", ".join(["validating"] * bool(validate and prompts(self.args)) + ["saving the final model"]
                             + ["uploading it"] * bool(self.args.push_to_hub or self.args.save_to_aistudio))
            with whole_parameters(self.model):
                distributed.on_rank_0(what, lambda: self._final_save(save, validate), self.ctx)
        finally:
            self._close()
        distributed.leave(self.ctx)
        self.log(self.clock.summary())

    def _final_save(self, save, validate):
        from . import checkpoint, hub, model_card
        from .faults import injected_delay
        from .validation import prompts

        if self.ema is not None:
            self.ema.copy_to(self.trainable)
        self._check_weights(whole=True)
        if validate is not None and prompts(self.args):
            self._validate(validate)
        with self.clock.phase("saving"):
            injected_delay("final_save")
            what = checkpoint.publish(self.args.output_dir,
                                      model_card.with_card(save, self.args, self.run, self.global_step))
        self.log(f"saved {what} to {self.args.output_dir}")
        if self.args.push_to_hub or self.args.save_to_aistudio:
            hub.upload(self.args, self.log)


# ---------------------------------------------------------------- start-up
def start_run(args, kind, lora):
    """What every script does first: devices and processes, logging, the memory plan of this `kind` ("prior" or
    "decoder") of run (all that --print_memory_plan does), precision, the seed, and the checkpoint to resume from
    (whose seed wins, so a resumed run continues the same shuffles and noise)."""
    from types import SimpleNamespace

    from . import checkpoint, distributed, tracking

    clock = tracking.Stopwatch()
    tracking.quiet_libraries()
    # a plan alone starts no process group: PADDLE_TRAINERS_NUM=8 sizes each of 8 cards without launching 8 processes
    ctx = distributed.setup(args.local_rank) if not args.print_memory_plan else distributed.planned()
    log = tracking.Log(ctx.is_main)
    from . import memory_plan, output_dir, sharding

    if not args.print_memory_plan:  # (a plan may be for a GPU and more processes than this machine has)
        sharding.check(args, ctx, log)
        output_dir.check(args, kind, ctx)
    plan = memory_plan.report(args, kind, lora, log, device=None if args.print_memory_plan in (None, "here")
                              else args.print_memory_plan, processes=ctx.world_size)
    if args.print_memory_plan:  # all that was asked for
        if plan is None:
            raise UsageError("--print_memory_plan: the plan cannot be computed (see the warning above)")
        raise SystemExit(0)
    sharding.init(args, ctx)
    if not on_gpu():
        from .cpu_threads import decided

        if decided:
            log(f"CPU: {decided[0]} thread(s) per process for Paddle's kernels ({decided[1]})")
    tracking.check_available(args.report_to)
    if args.push_to_hub or args.save_to_aistudio:  # rank 0 asks the hub; the others stop with it if it fails
        from . import hub

        distributed.on_rank_0("checking the hub repo", lambda: hub.check_access(args), ctx)
    configure_tf32(args.allow_tf32, log)
    precision = Precision(args.mixed_precision, log)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    seed = distributed.broadcast_int(seed, ctx)  # a drawn seed must be the same on every rank
    resume_path = checkpoint.resolve(args.resume_from_checkpoint, args.output_dir)
    if resume_path:
        checkpoint.check_written_by(resume_path, kind, lora)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        log(f"no checkpoint in {args.output_dir} yet: starting a new run")
    resume_state = checkpoint.load_state(resume_path, mapped_optimizer=True) if resume_path else None
    checkpoint.check_every_rank_resumes_alike(args, resume_state, ctx)
    if resume_state is not None:
        seed = resume_state["seed"]
    paddle.seed(seed)  # new weights (LoRA layers) start the same on every rank and in every run with this seed
    return SimpleNamespace(ctx=ctx, log=log, precision=precision, seed=seed, resume_path=resume_path,
                           resume_state=resume_state, clock=clock, kind=kind, lora=lora)


def prepare_output_dir(args, ctx, log):
    """Called once all input is checked, so a bad run leaves nothing behind (--overwrite_output_dir: not even
    deletes the earlier run's work before then)."""
    if ctx.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        from .checkpoint import remove_partial
        from .output_dir import clear_earlier_run

        remove_partial(args.output_dir, log)
        if args.overwrite_output_dir:
            clear_earlier_run(args.output_dir, log)
