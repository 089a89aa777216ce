"""A 2-process launch (gloo on CPU) trains, syncs, and writes one output from rank 0; every rank ends cleanly."""
import os
import sys

import numpy as np
import pytest

from conftest import ROOT, logged, model_args, run, state_dict_of


@pytest.mark.parametrize("script,model,extra", [("train_text_to_image_prior.py", "prior", []),
                                                ("train_text_to_image_decoder.py", "unet", []),
                                                # each rank encodes its half of the 8 samples, both train from all 8
                                                ("train_text_to_image_prior_lora.py", None, ["--cache_encoder_outputs"]),
                                                ("train_text_to_image_decoder_lora.py", None, [])])
def test_two_process_launch(tiny, tmp_path, script, model, extra):
    out = tmp_path / "out"
    proc = run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                str(tmp_path / "log"), str(ROOT / script),
                *model_args(tiny, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--train_batch_size", 2,
                            "--gradient_accumulation_steps", 2, "--learning_rate", 1e-3, *extra)],
               cwd=tmp_path, check=False, env={"HF_DATASETS_CACHE": str(tmp_path / "hf")})
    logs = {name: (tmp_path / "log" / name).read_text() for name in ("workerlog.0", "workerlog.1")}
    assert proc.returncode == 0, proc.stdout[-3000:] + logs["workerlog.0"][-3000:] + logs["workerlog.1"][-3000:]
    if "--cache_encoder_outputs" in extra:
        assert "encoder-output cache: encoded 4 samples here, 8 samples" in logs["workerlog.0"]
    assert "saved the" in logs["workerlog.0"] and "saved" not in logs["workerlog.1"]
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    assert len(logged(out)) == 4  # one log, from rank 0, one value per optimizer step
    if model is None:  # LoRA: the LoRA file, trained away from its zero-initialised up-projections
        final = state_dict_of(out)
        assert any(np.abs(v).max() > 0 for k, v in final.items() if "lora.up" in k)
    else:
        final = state_dict_of(out / model)
        start = state_dict_of(os.path.join(tiny.prior if model == "prior" else tiny.decoder, model))
        assert any(not np.array_equal(final[k], start[k]) for k in final)
    assert all(np.isfinite(v).all() for v in final.values())
