"""The prior's bare training step beside the cached prior script, interleaved in one run: what the loop costs.

    python benchmarks/bare_step.py [--workdir DIR] [--steps 200] [--repeats 3]

On the benchmark's tiny "reference" models (benchmarks/run.py builds them, or reuses them in --workdir), batch 2:
the bare step is the prior's forward, loss, backward, AdamW step and clear_grad on a few batches encoded beforehand,
nothing else, with the script's CPU threads per kernel; the script is train_text_to_image_prior.py
--cache_encoder_outputs run as benchmarks/run.py runs it. Both rates are steady steps/s (the first 3 steps left out,
the same clock as the script's `time:` line); runs of the two alternate, and the medians are printed, with the median of
each repeat's script/bare ratio (its two runs back to back, so the machine's speed, which drifts over minutes on shared
machines, cancels out).

    python benchmarks/bare_step.py --pieces [--block 40] [--blocks 30]

Where the loop's time goes instead: in this one process, the bare step and the bare step with the loop's pieces added one
at a time (clipping; reading the loss and the schedule; the cached batches built as the script builds them; the
tracker), run in alternating blocks of --block steps, so the drift cancels out within each block pair; printed as each
one's speed over the bare step's (median of the blocks, with quartiles).
"""
import argparse
import itertools
import os
import shutil
import statistics
import sys
import time

import run as bench  # (benchmarks/run.py: keeps the environment as given, before paddle sets OMP_NUM_THREADS)

sys.argv.append("--cache_encoder_outputs")  # the script's thread count for a cached run (it reads sys.argv)
import train_text_to_image_prior as script  # noqa: E402  (sets OMP_NUM_THREADS as the script does, imports paddle)

sys.argv.pop()


def encoded_batches(prior_repo, decoder_repo, data, count):
    """(components, `count` prepared micro-batches of 2) as the script's loader makes them, encoders run now."""
    from types import SimpleNamespace

    from kandinsky_finetune import data as data_lib, prior, tracking
    from kandinsky_finetune.precision import Precision

    args = script.parse_args(["--pretrained_prior_model_name_or_path", prior_repo, "--train_data_dir", data,
                              "--pretrained_decoder_model_name_or_path", decoder_repo, "--resolution", "64",
                              "--train_batch_size", "2", "--seed", "0", "--output_dir", os.devnull])
    precision = Precision("no", tracking.Log(False))
    c = prior.load_components(args, precision, needs_decoder=False)
    prior.load_trained(c, precision)
    ds = data_lib.load_train_dataset(args, 0, [args.image_column, args.caption_column])
    ctx = SimpleNamespace(rank=0, world_size=1)
    _, loader = data_lib.build_loader(ds, prior.sample_maker(args, c), args, ctx, 0,
                                      prepare=prior.batch_inputs(c, precision))
    return c, args, precision, list(itertools.islice(loader.epochs(0, 0, 10 ** 6), count))


def bare_optimizer(trainable, args):
    """The bare step's AdamW: the script's settings at a fixed learning rate, no schedule, no clipping."""
    import paddle

    return paddle.optimizer.AdamW(learning_rate=1e-4, parameters=trainable, beta1=args.adam_beta1,
                                  beta2=args.adam_beta2, epsilon=args.adam_epsilon, weight_decay=args.adam_weight_decay)


def bare_steps_per_second(c, args, precision, batches, steps):
    from kandinsky_finetune import prior, tracking

    c.prior.train()
    optimizer = bare_optimizer([p for p in c.prior.parameters() if not p.stop_gradient], args)
    clock = tracking.Stopwatch()
    for batch in itertools.islice(itertools.cycle(batches), steps):
        prior.loss(c, c.prior, batch, args.snr_gamma, precision).backward()
        optimizer.step()
        optimizer.clear_grad(set_to_zero=False)
        clock.step_done()
    return clock.steady_steps_per_second()


PIECES = ("bare step", "+ clipping", "+ loss read, schedule", "+ cached batches", "+ tracker")


def pieces_loops(c, args, precision, batches, workdir):
    """{name: steps(n)} for each of PIECES, each with the pieces before it: n training steps of the prior."""
    from types import SimpleNamespace

    import paddle

    from kandinsky_finetune import data as data_lib, prior, tracking
    from kandinsky_finetune.optimization import build_optimizer, clip_gradients

    ctx = SimpleNamespace(rank=0, world_size=1, is_main=True)
    run = SimpleNamespace(ctx=ctx, log=tracking.Log(False), seed=0, precision=precision, clock=tracking.Stopwatch())
    args.cache_dir = os.path.join(workdir, "reference", "hf-datasets-cache")  # (the script runs' encoder cache)
    tracker_dir = os.path.join(workdir, "reference", "pieces-tracker")
    shutil.rmtree(tracker_dir, ignore_errors=True)
    cached = prior.cached_dataset(data_lib.load_train_dataset(args, 0, [args.image_column, args.caption_column]),
                                  args, c, run)
    c.prior.train()
    trainable = [p for p in c.prior.parameters() if not p.stop_gradient]
    args.max_train_steps, args.learning_rate = 10 ** 9, 1e-4
    loops = {}
    for level, name in enumerate(PIECES):
        if level < 2:
            optimizer, schedule = bare_optimizer(trainable, args), None
        else:
            optimizer, schedule = build_optimizer(trainable, args, SimpleNamespace(batches_per_epoch=1))
        source = itertools.cycle(batches)
        if level >= 3:
            _, loader = data_lib.build_loader(cached, prior.sample_maker(args, c), args, ctx, 0,
                                              prepare=prior.batch_inputs(c, precision))
            source = loader.epochs(0, 0, 10 ** 9)
        tracker = tracking.Tracker(SimpleNamespace(report_to="visualdl", output_dir=tracker_dir, logging_dir="logs",
                                                   tracker_project_name="pieces"), level >= 4)

        def steps(n, level=level, optimizer=optimizer, schedule=schedule, source=source, tracker=tracker):
            for batch in itertools.islice(source, n):
                loss = prior.loss(c, c.prior, batch, args.snr_gamma, precision)
                loss.backward()
                if level >= 1:
                    clip_gradients([p.grad for p in trainable], args.max_grad_norm)
                value = paddle.stack([loss.detach()]).numpy().tolist()[0] if level >= 2 else None
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                optimizer.clear_grad(set_to_zero=False)
                tracker.scalars({"train_loss": value, "lr": 1e-4}, 1)

        loops[name] = steps
    return loops


def print_pieces(loops, block, blocks):
    for steps in loops.values():
        steps(3)  # warm-up
    seconds = {name: [] for name in loops}
    for b in range(blocks):
        for name in (PIECES if b % 2 == 0 else PIECES[::-1]):
            start = time.perf_counter()
            loops[name](block)
            seconds[name].append(time.perf_counter() - start)
    print(f"{os.cpu_count()} CPU(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, batch 2, "
          f"{blocks} alternating blocks of {block} steps")
    for name in PIECES:
        speeds = [bare / t for bare, t in zip(seconds[PIECES[0]], seconds[name])]
        # (inclusive: within the blocks' range; the default extrapolates past it, below 0 with few blocks)
        low, _, high = statistics.quantiles(speeds, n=4, method="inclusive") if len(speeds) > 1 else speeds * 3
        print(f"{name}: {block / statistics.median(seconds[name]):.2f} steps/s, {statistics.median(speeds):.3f} of the "
              f"bare step (quartiles {low:.3f}-{high:.3f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(bench.ROOT, "benchmark_output"))
    parser.add_argument("--steps", type=int, help="Optimizer steps per run, of each (default 200).")
    parser.add_argument("--repeats", type=int, help="Runs of each; the medians are printed (default 3).")
    parser.add_argument("--pieces", action="store_true",
                        help="Add the loop's pieces to the bare step one at a time instead of running the script.")
    parser.add_argument("--block", type=int, help="With --pieces: steps per block (default 40).")
    parser.add_argument("--blocks", type=int, help="With --pieces: blocks of each (default 30).")
    args = parser.parse_args()
    # each mode's own flags; the other mode's would be ignored
    unused = ("--steps", "--repeats") if args.pieces else ("--block", "--blocks")
    given = [flag for flag in unused if getattr(args, flag[2:]) is not None]
    if given:
        parser.error(f"{', '.join(given)} {'are' if len(given) > 1 else 'is'} "
                     f"{'not used with' if args.pieces else 'only used with'} --pieces")
    for flag, default in (("steps", 200), ("repeats", 3), ("block", 40), ("blocks", 30)):
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    from kandinsky_finetune.tracking import quiet_libraries

    quiet_libraries()
    started = time.time()
    prior_repo, decoder_repo, data = bench.build(args.workdir, "reference")
    components = encoded_batches(prior_repo, decoder_repo, data, 4)
    if args.pieces:
        print_pieces(pieces_loops(*components, args.workdir), args.block, args.blocks)
        print(f"took {time.time() - started:.0f} s")
        return
    out = os.path.join(args.workdir, "reference", "prior-cached")
    hf_cache = os.path.join(args.workdir, "reference", "hf-datasets-cache")
    rates = {"bare": [], "script": []}
    for r in range(args.repeats):
        for kind in ("bare", "script") if r % 2 == 0 else ("script", "bare"):
            rate = (bare_steps_per_second(*components, args.steps) if kind == "bare" else
                    bench.run("prior", prior_repo, decoder_repo, data, out, args.steps, True, hf_cache, [])["steps"])
            rates[kind].append(rate)
            print(f"  {kind}: {rate:.2f} steps/s", file=sys.stderr, flush=True)
    bare, full = statistics.median(rates["bare"]), statistics.median(rates["script"])
    # each repeat's two runs are back to back: their ratio is free of the machine's drift over the minutes
    ratios = [s / b for s, b in zip(rates["script"], rates["bare"])]
    print(f"{os.cpu_count()} CPU(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, batch 2, {args.steps} steps "
          f"per run, median of {args.repeats}")
    print(f"bare step: {bare:.2f} steps/s")
    print(f"cached prior script: {full:.2f} steps/s")
    print(f"script / bare step: {statistics.median(ratios):.2f} (median of the repeats' ratios: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; ratio of the medians {full / bare:.2f})")
    print(f"took {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
