"""Command line shared by the four scripts.

Names, defaults and meanings follow the two reference examples (PaddleMIX's ppdiffusers port and
Hugging Face diffusers' original), so their README commands run unchanged. Each script adds what only
it has (`add_*_args`) and then calls `parse(parser, argv)`, which checks the combinations that argparse
cannot and turns every mistake into one `UsageError` line.
"""
import argparse
import os
import re

DEFAULT_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
DEFAULT_DECODER = "kandinsky-community/kandinsky-2-2-decoder"
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, before any training."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, unless there is none to show (unset, or a switch that is off)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _boolean(text):
    """true/false (yes/no, 1/0), as PaddleNLP's argument parser reads a boolean flag's value."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def build_parser(description, lora=False):
    # No abbreviations: a mistyped flag (--max_train_step) must be an error, not silently taken for another.
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a("--pretrained_decoder_model_name_or_path", default=DEFAULT_DECODER,
      help="Decoder repo (hub id or local folder with unet/, movq/, scheduler/).")
    a("--pretrained_prior_model_name_or_path", default=DEFAULT_PRIOR,
      help="Prior repo (hub id or local folder with prior/, image_encoder/, text_encoder/, tokenizer/, scheduler/, "
           "image_processor/).")
    a("--dataset_name", default=None,
      help="A dataset on the hub, or a local dataset folder (a `save_to_disk` folder or data files, e.g. an imagefolder).")
    a("--dataset_config_name", default=None, help="The dataset's config name, if it has several.")
    a("--train_data_dir", default=None,
      help="A local imagefolder: images plus a metadata.jsonl with `file_name` and the caption column.")
    a("--image_column", default="image", help="The dataset column holding the images.")
    a("--max_train_samples", type=int, default=None,
      help="Train on this many samples only (taken after a seeded shuffle), for debugging or quick runs.")
    a("--output_dir", default="kandi_2_2-model-finetuned" + ("-lora" if lora else ""),  # the references' defaults
      help="Where the trained model and checkpoints are written. A folder that already holds an earlier run's "
           "checkpoints or saved model is an error unless --resume_from_checkpoint or --overwrite_output_dir says "
           "what to do with it; it may not be (or be inside) a local model folder the script reads.")
    a("--overwrite_output_dir", action="store_true",
      help="Start over in an --output_dir that holds an earlier run: once every input is checked (before the first "
           "step), its checkpoint-* folders, its saved model and model card, and its validation/ images are deleted, "
           "so none of them mixes with the new run's (`--resume_from_checkpoint latest` never finds an old one). "
           "Logs are kept.")
    a("--cache_dir", default=None, help="Where downloaded models and datasets are stored.")
    a("--seed", type=int, default=None,
      help="Seed for shuffling, noise and timesteps (a random one is drawn and recorded in checkpoints if unset).")
    a("--resolution", type=int, default=512,
      help="Image side in pixels: training images for the decoder, and the size of the validation images that "
           "--validation_prompt(s) generate in all scripts. Must be a multiple of the MoVQ downscale factor (8).")
    a("--train_batch_size", type=int, default=1, help="Batch size per device.")
    a("--num_train_epochs", type=int, default=100, help="Passes over the dataset (unless --max_train_steps is set).")
    a("--max_train_steps", type=int, default=None,
      help="Total optimizer steps; overrides --num_train_epochs when set.")
    a("--gradient_accumulation_steps", type=int, default=1,
      help="Micro-batches accumulated per optimizer step (gradients are synchronised once per step).")
    a("--gradient_checkpointing", action="store_true",
      help="Recompute activations in backward to save memory (slower).")
    a("--learning_rate", type=float, default=1e-4, help="Peak learning rate of AdamW (reached after the warm-up).")
    a("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="Learning-rate schedule over optimizer steps.")
    a("--lr_warmup_steps", type=int, default=500, help="Warm-up length in optimizer steps.")
    a("--snr_gamma", type=float, default=None,
      help="Min-SNR weighting gamma (5.0 is recommended); unset means plain MSE.")
    a("--use_8bit_adam", action="store_true", help="Not available in Paddle: the script exits with an explanation.")
    a("--allow_tf32", action="store_true",
      help="Allow TF32 matmuls (cuBLAS) on Ampere or newer GPUs, as the references' flag does; cuDNN convolutions "
           "use TF32 either way (Paddle's default, and PyTorch's).")
    a("--cache_encoder_outputs", action="store_true",
      help="Run the frozen encoders (CLIP image/text encoders, MoVQ) once over the dataset and keep their outputs on "
           "disk in the datasets cache; later steps, epochs and runs with the same models, data and preprocessing "
           "reuse them instead of re-encoding every step.")
    a("--dataloader_num_workers", type=int, default=0, help="Data-loading worker processes (0 = in the main process).")
    a("--adam_beta1", type=float, default=0.9, help="AdamW's decay rate of the first moment (the gradients' mean).")
    a("--adam_beta2", type=float, default=0.999,
      help="AdamW's decay rate of the second moment (the squared gradients' mean).")
    a("--adam_weight_decay", type=float, default=0.0, help="AdamW's decoupled weight decay.")
    a("--adam_epsilon", type=float, default=1e-8, help="AdamW's epsilon, added to the denominator for stability.")
    a("--max_grad_norm", type=float, default=1.0, help="Clip gradients to this global norm (0 disables clipping).")
    a("--push_to_hub", action="store_true",
      help="Upload output_dir (without checkpoints, logs or validation folders) to the Hugging Face Hub.")
    a("--hub_token", default=None, help="Token for --push_to_hub (default: the one saved by `huggingface-cli login`).")
    a("--hub_model_id", default=None, help="Repo for --push_to_hub (default: the output_dir's name).")
    # AI Studio: the spelling of PaddleNLP's fine-tuning arguments
    a("--save_to_aistudio", action="store_true",
      help="Upload output_dir (without checkpoints, logs or validation folders) to AI Studio; needs --aistudio_repo_id.")
    a("--aistudio_repo_id", default=None, help="AI Studio repo for --save_to_aistudio, as <user name>/<repo name>.")
    a("--aistudio_token", default=None,
      help="AI Studio access token for --save_to_aistudio (default: $AISTUDIO_ACCESS_TOKEN, or the one saved by "
           "`aistudio config -t <token>`).")
    a("--aistudio_repo_private", type=_boolean, nargs="?", const=True, default=None, metavar="{true,false}",
      help="Whether a repo that --save_to_aistudio creates is private (default: true, as in PaddleNLP); "
           "`--aistudio_repo_private false` makes it public. An existing repo keeps its visibility.")
    a("--logging_dir", default="logs", help="Log folder, relative to output_dir.")
    a("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
      help="Train with paddle.amp autocast in this precision (trainable weights stay fp32). GPU only: fp32 on CPU.")
    a("--report_to", default="visualdl", choices=["visualdl", "tensorboard", "wandb"],
      help="Where to log scalars and validation images (under output_dir/logging_dir).")
    a("--tracker_project_name", default="text2image-fine-tune",
      help="Run name: the log sub-folder (visualdl, tensorboard) or the wandb project.")
    a("--local_rank", type=int, default=-1,
      help="GPU index for a single-process run (a paddle.distributed.launch run gets its GPU from --gpus).")
    a("--checkpointing_steps", type=int, default=500,
      help="Save a checkpoint-<N> folder (weights and training state) every N optimizer steps.")
    a("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoint folders.")
    a("--print_memory_plan", nargs="?", const="here", choices=["here", "gpu", "cpu"], default=None,
      metavar="gpu|cpu",
      help="Print the per-device memory plan (weights, gradients, optimizer states, EMA, frozen models, activations; "
           "from the model configs: no weights loaded, no dataset needed) for this machine's device, or for a GPU "
           "or a CPU (`--print_memory_plan gpu` sizes a GPU from a laptop), and exit. Every run logs it first.")
    a("--sharding", default=None, choices=["stage1", "stage2", "stage3"],
      help="Split the training state across the processes of a paddle.distributed.launch run, as PaddleNLP's trainer "
           "spells it: stage1 = AdamW's moments (fleet's sharding optimizer; CPU and GPU), stage2 = + gradients, "
           "stage3 = + parameters (group_sharded_parallel; GPU only: on a CPU one error line; stage3 validates on "
           "every process together, and not with --use_ema). Checkpoints hold the whole training state (written by "
           "rank 0) and resume on any number of processes. On one process there is nothing to shard: the run says so "
           "and trains unsharded.")
    a("--resume_from_checkpoint", default=None,
      help='Resume from a checkpoint folder, or "latest" for the newest complete one in output_dir.')
    a("--num_inference_steps", type=int, default=30 if lora else 20,
      help="Denoising steps of the prior and of the decoder for each validation image: the references' 20 in the full "
           "scripts, 30 in the LoRA scripts (fewer make validation cheaper).")
    if lora:
        a("--lora_rank", "--rank", dest="lora_rank", type=int, default=4, help="Rank of the LoRA update matrices.")
        a("--validation_prompt", default=None, help="Prompt that validation images are generated from.")
        a("--num_validation_images", type=int, default=4, help="Images generated per validation.")
        a("--validation_epochs", type=int, default=1, help="Validate every N epochs (epoch 0 included).")
    else:
        a("--validation_prompts", nargs="+", default=None, help="Prompts that validation images are generated from.")
        a("--validation_epochs", type=int, default=5, help="Validate every N epochs (epoch 0 included) and at the end.")
        a("--use_ema", action="store_true",
          help="Keep an exponential moving average of the weights; it is checkpointed and becomes the saved model.")
    return p


def add_prior_args(p):
    p.add_argument("--caption_column", default="text",
                   help="The dataset column holding captions: a string, or a list of strings (one is picked at random).")


def add_decoder_args(p):
    p.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="Use memory-efficient attention kernels (GPU only).")
    p.add_argument("--noise_offset", type=float, default=0.0, help="Scale of the per-channel offset noise (0 = off).")
    p.add_argument("--random_flip", action="store_true", help="Flip training images horizontally at random.")
    crop = p.add_mutually_exclusive_group()
    # one setting, two spellings: --center_crop (the references') states the default explicitly
    crop.add_argument("--random_crop", dest="random_crop", action="store_const", const=True, default=False,
                      help="Crop the square from a random place of each image (an augmentation for non-square images; "
                           "with --cache_encoder_outputs such images are then trained without the cache).")
    crop.add_argument("--center_crop", dest="random_crop", action="store_const", const=False,
                      help="Crop the centre of each image to a square, as the references do. This is the default: the "
                           "flag is kept so their commands run.")
    # kohya-ss sd-scripts' names and defaults; set only with --enable_bucket (None here: not given)
    p.add_argument("--enable_bucket", action="store_true",
                   help="Aspect-ratio buckets: train each image at the bucket size nearest its aspect ratio (area at "
                        "most --resolution squared; resized to cover it and cropped), every batch from one bucket, "
                        "instead of a square crop.")
    p.add_argument("--min_bucket_reso", type=int, default=None, help="Smallest bucket side in px (default 256).")
    p.add_argument("--max_bucket_reso", type=int, default=None, help="Largest bucket side in px (default 1024).")
    p.add_argument("--bucket_reso_steps", type=int, default=None,
                   help="Bucket sides are multiples of this, in px (default 64: the grid the decoder generates on).")
    p.add_argument("--bucket_no_upscale", action="store_true",
                   help="Never enlarge an image: each gets a bucket of its own size (shrunk to --resolution squared "
                        "where larger), rounded down to --bucket_reso_steps.")


def parse(parser, argv=None):
    import sys

    args = parser.parse_args(argv)
    check(args)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # for the model card
    return args


def check(args):
    if args.sharding == "stage3" and getattr(args, "use_ema", False):
        raise UsageError("--use_ema with --sharding stage3: EMA averages the whole weights after every step, and "
                         "stage 3 keeps only a slice of them on each card; use --sharding stage2 with --use_ema")
    check_bucket_flags(args)
    if args.print_memory_plan:  # needs the models' configs only
        return
    if args.dataset_name is None and args.train_data_dir is None:
        raise UsageError("give a dataset: --dataset_name (hub name or local folder) or --train_data_dir (imagefolder)")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise UsageError("give either --dataset_name or --train_data_dir, not both")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                 "validation_epochs", "resolution", "num_inference_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    for name in ("max_train_steps", "max_train_samples", "checkpoints_total_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1 (got {value})")
    if getattr(args, "lora_rank", 1) < 1:
        raise UsageError(f"--lora_rank must be at least 1 (got {args.lora_rank})")
    if args.lr_warmup_steps < 0 or args.dataloader_num_workers < 0:
        raise UsageError("--lr_warmup_steps and --dataloader_num_workers cannot be negative")
    if args.use_8bit_adam:
        raise UsageError("--use_8bit_adam needs bitsandbytes, which has no Paddle version; drop the flag "
                         "(LoRA scripts or --gradient_checkpointing also cut memory)")
    if os.path.isfile(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir} is a file; give a folder")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise UsageError(f"--train_data_dir {args.train_data_dir} is not a folder")
    if not args.push_to_hub and (args.hub_model_id or args.hub_token):
        raise UsageError("--hub_model_id and --hub_token are for --push_to_hub; add it or drop them")
    if not args.save_to_aistudio and (args.aistudio_repo_id or args.aistudio_token
                                      or args.aistudio_repo_private is not None):
        raise UsageError("--aistudio_repo_id, --aistudio_token and --aistudio_repo_private are for --save_to_aistudio; "
                         "add it or drop them")
    if args.report_to == "wandb" and (args.hub_token or args.aistudio_token):
        flag, safe = (("--hub_token", "run `huggingface-cli login` or set HF_TOKEN") if args.hub_token else
                      ("--aistudio_token", "set AISTUDIO_ACCESS_TOKEN or run `aistudio config -t <token>`"))
        raise UsageError(f"--report_to wandb records the command line, {flag} included, where everyone who sees the "
                         f"run can read it: drop {flag} and {safe} instead")
    if args.save_to_aistudio and not re.fullmatch(r"[^/\s]+/[^/\s]+", args.aistudio_repo_id or ""):
        raise UsageError(f"--save_to_aistudio needs --aistudio_repo_id <user name>/<repo name> (got "
                         f"{args.aistudio_repo_id!r})")
    resume = args.resume_from_checkpoint
    if resume is not None and args.overwrite_output_dir:
        raise UsageError(f"--resume_from_checkpoint {resume} continues a run, --overwrite_output_dir starts over: "
                         "give one of them")
    if resume not in (None, "latest") and not os.path.isdir(resume) \
            and not os.path.isdir(os.path.join(args.output_dir, resume)):
        raise UsageError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")


def run(main):
    """Run a script's main(): a UsageError becomes one `error:` line and exit status 2, a failure during training
    (faults.RunError) one `error:` line and status 1, a honoured stop request status 128 + the signal number
    (the run has said where its checkpoint is), a Ctrl-C that could not wait status 130."""
    import sys

    from tqdm import tqdm

    from .faults import RunError, Stopped

    def error(message, status):
        tqdm.write(f"error: {message}", file=sys.stderr)  # on a line of its own, even under a progress bar
        return status

    try:
        main()
        status = 0
    except UsageError as e:
        status = error(e, 2)
    except RunError as e:
        status = error(e, 1)
    except Stopped as e:
        status = 128 + e.signum
    except KeyboardInterrupt:
        status = error("interrupted (Ctrl-C): no checkpoint was written for the step in progress", 130)
    exit_process(status)


def exit_process(status):
    """Exit with `status`. A process of a multi-process launch skips the interpreter's teardown, where Paddle 3.3 was
    seen to abort (SIGABRT without Paddle's own abort message, so the launcher exits 250 for a run that had finished
    and said so: twice in one CI run of the suite's gloo launches); by now the run has closed what it wrote: its files,
    its tracker, the process group."""
    import logging
    import sys

    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


BUCKET_DEFAULTS = {"min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64}


def check_bucket_flags(args):
    """The bucket flags are for --enable_bucket (decoder scripts only): given without it they are an error, with it
    the ones not given take kohya-ss's defaults. (Their arithmetic is checked in buckets.check_args.)"""
    if not hasattr(args, "enable_bucket"):
        return
    given = [f"--{name}" for name in BUCKET_DEFAULTS if getattr(args, name) is not None]
    given += ["--bucket_no_upscale"] if args.bucket_no_upscale else []
    if given and not args.enable_bucket:
        raise UsageError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --enable_bucket; add it or drop "
                         f"{'it' if len(given) == 1 else 'them'}")
    for name, value in BUCKET_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
