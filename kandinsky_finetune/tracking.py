"""Logging: quieter library loggers, one-line messages, the experiment tracker and the progress bar.

Only rank 0 logs; on other ranks every call here is a no-op.
"""
import contextlib
import logging
import os
import sys
import time

import numpy as np


def quiet_libraries():
    """ppdiffusers and paddlenlp print an INFO line per loaded component; keep warnings and errors."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    for name in ("ppdiffusers", "paddlenlp", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from ppdiffusers.utils import logging as pd_logging

        pd_logging.set_verbosity_warning()
        from paddlenlp.utils.log import logger as nlp_logger

        nlp_logger.set_level("WARNING")
    except Exception:  # logging is cosmetic; never fail a run over it
        pass


class Log:
    def __init__(self, is_main):
        self.is_main = is_main

    def __call__(self, message):
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message):
        if self.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)


class Tracker:
    """Scalars and images to VisualDL (default), tensorboard or wandb, under output_dir/logging_dir.

    Scalars are handed over in batches (every HAND_OVER_STEPS calls or HAND_OVER_SECONDS, and before images, a
    checkpoint and the end): each VisualDL write wakes its writer thread, which then takes the interpreter from the
    training thread; per step that was ~3% of a tiny prior step. The trackers write their files later still
    (VisualDL every 2 minutes), so nothing shows later than before, and every step's value is logged. At each
    checkpoint the log is written to disk (flush(to_disk=True)): a run killed after it has its log up to there."""

    HAND_OVER_STEPS, HAND_OVER_SECONDS = 100, 10

    def __init__(self, args, is_main):
        self.kind, self.writer = args.report_to, None
        self._pending, self._handed_over = [], time.time()
        if not is_main:
            return
        logdir = os.path.join(args.output_dir, args.logging_dir, args.tracker_project_name)
        os.makedirs(logdir, exist_ok=True)  # wandb falls back to /tmp when its dir does not exist
        if self.kind == "visualdl":
            from visualdl import LogWriter

            self.writer = LogWriter(logdir=logdir)
        elif self.kind == "tensorboard":
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir=logdir)
        else:
            import wandb

            # the run's settings, but no hub token (wandb shows its config to everyone who sees the run)
            config = {k: v for k, v in vars(args).items() if not k.endswith("_token") and k != "command_line"}
            self.writer = wandb.init(project=args.tracker_project_name, dir=logdir, config=config)

    def scalars(self, values, step):
        if self.writer is None:
            return
        self._pending.append((values, step))
        if len(self._pending) >= self.HAND_OVER_STEPS or time.time() - self._handed_over > self.HAND_OVER_SECONDS:
            self.flush()

    def flush(self, to_disk=False):
        """Hand the pending scalars to the tracker; `to_disk`: and have it write everything it holds."""
        pending, self._pending, self._handed_over = self._pending, [], time.time()
        for values, step in pending:
            if self.kind == "wandb":
                self.writer.log(values, step=step)
                continue
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        if to_disk and self.writer is not None and self.kind != "wandb":  # (wandb syncs on its own)
            self.writer.flush()

    def images(self, tag, images, step):
        if self.writer is None:
            return
        self.flush()  # (wandb wants its steps in order)
        if self.kind == "wandb":
            import wandb

            self.writer.log({tag: [wandb.Image(im) for im in images]}, step=step)
            return
        for i, image in enumerate(images):
            self.image(f"{tag}/{i}", image, step)

    def image(self, tag, image, step):
        if self.writer is None:
            return
        self.flush()
        if self.kind == "wandb":
            import wandb

            self.writer.log({tag: wandb.Image(image)}, step=step)
            return
        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self):
        if self.writer is None:
            return
        self.flush()
        if self.kind == "wandb":
            self.writer.finish()
        else:
            self.writer.close()


def check_available(report_to):
    """Fail before training when the chosen tracker is not installed."""
    module = {"visualdl": "visualdl", "tensorboard": "tensorboardX", "wandb": "wandb"}[report_to]
    try:
        __import__(module)
    except ImportError:
        from .params import UsageError

        raise UsageError(f"--report_to {report_to} needs the {module} package: pip install {module}") from None


def progress_bar(total, initial, is_main):
    from tqdm.auto import tqdm

    # redrawn twice a second, not tqdm's ten times: each redraw formats the line and asks the terminal for its width
    return tqdm(total=total, initial=initial, desc="steps", disable=not is_main, dynamic_ncols=True, mininterval=0.5)


class Stopwatch:
    """Where a run's wall time goes: start-up (from process start to the first training step, less encoding),
    encoding (the encoder-output cache), training, and, within the training loop but not counted as training,
    validation and checkpointing; saving; plus the steady-state step rate over training time only.
    `summary()` is one line at the end of every run; benchmarks/run.py and benchmarks/real_size.py read it."""

    WARMUP_STEPS = 3  # the first optimizer steps are slower (allocator, kernel selection): not steady state
    PAUSES = ("validation", "checkpointing")  # inside the training loop, not training

    def __init__(self):
        import psutil

        self.process_start = psutil.Process().create_time()
        self.seconds, self.step_times, self.training_start, self.samples_per_step = {}, [], None, 0

    @contextlib.contextmanager
    def phase(self, name):
        start = time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - start

    def _paused(self):
        return sum(self.seconds.get(name, 0.0) for name in self.PAUSES)

    def start_training(self):
        self.training_start = time.time()

    def stop_training(self):
        """Training time is the loop's wall time less the validations and checkpoints inside it."""
        self.seconds["training"] = time.time() - self.training_start - self._paused()

    def step_done(self):
        self.step_times.append(time.time() - self._paused())  # a clock that stops during validation and checkpoints

    def steady_steps_per_second(self):
        t = self.step_times[self.WARMUP_STEPS:] if len(self.step_times) > self.WARMUP_STEPS + 1 else self.step_times
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else float("nan")

    def summary(self):
        import resource

        import paddle

        startup = (self.training_start or time.time()) - self.process_start - self.seconds.get("encoding", 0.0)
        rate = self.steady_steps_per_second()
        phases = [f"start-up {startup:.1f} s"] + [f"{k} {v:.1f} s" for k, v in self.seconds.items()]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
        line = (f"time: {', '.join(phases)}; {rate:.3f} steps/s steady, {rate * self.samples_per_step:.2f} samples/s; "
                f"peak RSS {peak:.0f} MB")
        if "gpu" in paddle.get_device():
            line += f", peak GPU memory {paddle.device.cuda.max_memory_allocated() / 2 ** 20:.0f} MB"
        return line
