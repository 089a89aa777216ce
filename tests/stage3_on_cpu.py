"""Run a training script with --sharding stage3 on CPU processes, for the tests: Paddle's GroupShardedStage3 itself,
with its device checks lifted (it asserts a CUDA build and uses no CUDA call on this path: its buffers are made on
the host and its collectives are the process group's, gloo here), slices padded to a GPU's 256-byte alignment (not
the 4 KB it takes on a CPU) and cut at a small size, so the tiny models'
parameters are sliced as a real model's are (Paddle slices only parameters of more than `segment_size` elements,
2**20 by default). Everything else is the script's own code path.

    python -m paddle.distributed.launch --nproc_per_node 2 tests/stage3_on_cpu.py train_text_to_image_prior.py ...
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEGMENT_SIZE = 256  # elements: the tiny models' weight matrices are sliced, their biases and norms kept whole


def group_sharded_parallel_on_cpu(model, optimizer, level, scaler=None, **kwargs):
    from paddle.base import core
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_stage3
    from paddle.distributed.fleet.meta_parallel.sharding.group_sharded_stage3 import GroupShardedStage3

    group_sharded_stage3.alignment["cpu"] = group_sharded_stage3.alignment["gpu"]  # slices padded as on a GPU

    assert level == "p_g_os", level
    compiled_with_cuda = core.is_compiled_with_cuda
    core.is_compiled_with_cuda = lambda: True
    try:
        model = GroupShardedStage3(model, optimizer=optimizer, segment_size=SEGMENT_SIZE, device="cpu",
                                   **kwargs)
    finally:
        core.is_compiled_with_cuda = compiled_with_cuda
    return model, optimizer, scaler


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from kandinsky_finetune import cpu_threads

    cpu_threads.share_cores()
    import paddle.distributed.sharding

    from kandinsky_finetune import sharding

    paddle.distributed.sharding.group_sharded_parallel = group_sharded_parallel_on_cpu
    sharding.GPU_ONLY.discard("stage3")
    script = os.path.join(ROOT, sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
