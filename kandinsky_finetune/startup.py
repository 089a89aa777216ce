"""The start of every run, before any model loads: processes, logging, the memory plan, checks of the input, precision,
the seed and the checkpoint to resume from."""
import os

import paddle

from .params import UsageError
from .precision import Precision, configure_tf32, on_gpu


def start_run(args, kind, lora):
    """What every script does first: devices and processes, logging, the memory plan of this `kind` ("prior" or
    "decoder") of run (all that --print_memory_plan does), precision, the seed, and the checkpoint to resume from
    (whose seed wins, so a resumed run continues the same shuffles and noise)."""
    from types import SimpleNamespace

    from . import checkpoint, distributed, tracking
    from .training_state import load_state

    clock = tracking.Stopwatch()
    tracking.quiet_libraries()
    # a plan alone starts no process group: PADDLE_TRAINERS_NUM=8 sizes each of 8 cards without launching 8 processes
    ctx = distributed.setup(args.local_rank) if not args.print_memory_plan else distributed.planned()
    log = tracking.Log(ctx.is_main)
    from . import memory_plan, output_dir, sharding

    if getattr(args, "enable_bucket", False):  # (the plan counts the largest bucket)
        from .buckets import check_args

        check_args(args)
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
    resume_state = load_state(resume_path, mapped_optimizer=True) if resume_path else None
    checkpoint.check_every_rank_resumes_alike(args, resume_state, ctx)
    if resume_state is not None:
        seed = resume_state["seed"]
    paddle.seed(seed)  # new weights (LoRA layers) start the same on every rank and in every run with this seed
    return SimpleNamespace(ctx=ctx, log=log, precision=precision, seed=seed, resume_path=resume_path,
                           resume_state=resume_state, clock=clock, kind=kind, lora=lora)
