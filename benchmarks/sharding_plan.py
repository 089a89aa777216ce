"""Per-card memory of full prior and full decoder fine-tuning with --sharding, as the scripts' memory plan computes it.

    python benchmarks/sharding_plan.py [--resolution 512] [--mixed_precision no]

Writes the real Kandinsky 2.2 architectures' config files (no weights: a second, nothing big) to a temporary folder and
prints, per script, a Markdown table of the plan's peak per GPU (batch 1, without validation) on 1, 2, 4 and 8 cards,
for each --sharding stage, with and without --gradient_checkpointing and --cache_encoder_outputs: what
`PADDLE_TRAINERS_NUM=<cards> python train_text_to_image_<kind>.py --print_memory_plan gpu --sharding <stage> ...` logs.
"""
import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CARDS = (1, 2, 4, 8)
STAGES = (None, "stage1", "stage2", "stage3")


def write_configs(out_dir):
    """The real architectures' config files in the hub layout; (prior repo, decoder repo)."""
    from kandinsky_finetune import models, tiny_models

    where = {"prior": "prior", "image_encoder": "prior", "text_encoder": "prior", "unet": "decoder", "movq": "decoder"}
    for name, repo in where.items():
        with models.lazy_init():
            model = tiny_models.build_model(tiny_models.REAL_SPEC, name)
        folder = os.path.join(out_dir, repo, name)
        (model.save_config if hasattr(model, "save_config") else model.config.save_pretrained)(folder)
    return os.path.join(out_dir, "prior"), os.path.join(out_dir, "decoder")


def plan_args(kind, repos, flags):
    from kandinsky_finetune import params

    parser = params.build_parser("plan")
    (params.add_prior_args if kind == "prior" else params.add_decoder_args)(parser)
    return params.parse(parser, ["--pretrained_prior_model_name_or_path", repos[0],
                                 "--pretrained_decoder_model_name_or_path", repos[1], "--print_memory_plan", "gpu",
                                 *flags])


def table(kind, repos, common):
    from kandinsky_finetune import memory_plan

    lines = ["| --sharding | --gradient_checkpointing | --cache_encoder_outputs | "
             + " | ".join(f"{n} card{'s' if n > 1 else ''}" for n in CARDS) + " |",
             "|---|---|---|" + "---|" * len(CARDS)]
    for stage in STAGES:
        for checkpointing in (False, True):
            for cached in (False, True):
                flags = [*common, *(["--sharding", stage] if stage else []),
                         *(["--gradient_checkpointing"] if checkpointing else []),
                         *(["--cache_encoder_outputs"] if cached else [])]
                args = plan_args(kind, repos, flags)
                peaks = [memory_plan.build(args, kind, False, "gpu", n).peak / memory_plan.GB for n in CARDS]
                yes_no = ["yes" if on else "no" for on in (checkpointing, cached)]
                lines.append(f"| {stage or 'none'} | {' | '.join(yes_no)} | "
                             + " | ".join(f"{p:.1f} GB" for p in peaks) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", default="512", help="The decoder's training resolution.")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repos = write_configs(tmp)
        common = ["--mixed_precision", args.mixed_precision]
        print(f"full prior, batch 1, {args.mixed_precision if args.mixed_precision != 'no' else 'fp32'}:\n")
        print(table("prior", repos, common))
        print(f"\nfull decoder, batch 1, {args.resolution} px, "
              f"{args.mixed_precision if args.mixed_precision != 'no' else 'fp32'}:\n")
        print(table("decoder", repos, common + ["--resolution", args.resolution]))


if __name__ == "__main__":
    main()
