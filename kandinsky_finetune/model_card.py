"""The model card of every final output: README.md with the YAML front matter both hubs read (license, library, task,
base models, the `prior:` entry, tags, dataset), the command and hyperparameters, the last validation grid and the code
that loads the output."""
import json
import os
import re
import shlex
import shutil

from . import validation

CARD = "README.md"
GRID = "validation_grid.png"  # the last validation round's grid, beside the card
LICENSE = "apache-2.0"  # Kandinsky 2.2's license on the Hugging Face Hub (kandinsky-community/kandinsky-2-2-*)
SECRET_FLAGS = ("--hub_token", "--aistudio_token")


def with_card(save, args, run, step):
    """`save(folder)` for checkpoint_files.publish, followed by the card (and the grid) in the same folder: they are
    published with the model or not at all, and never go into checkpoints."""
    def save_with_card(folder):
        what = save(folder)
        write(folder, args, run, step)
        return f"{what}, with its model card ({CARD})"

    return save_with_card


def write(folder, args, run, step):
    """README.md (and validation_grid.png) into `folder`, for the run `run` (startup.start_run's) after `step` steps."""
    grid = os.path.join(validation.step_folder(args.output_dir, step), validation.GRID)
    has_grid = bool(validation.prompts(args)) and os.path.isfile(grid)
    if has_grid:
        shutil.copyfile(grid, os.path.join(folder, GRID))
    with open(os.path.join(folder, CARD), "w", encoding="utf-8") as f:
        f.write(card(args, run, step, has_grid))


def hub_id(repo):
    """`repo` if it is a hub id (user/name, and no path here: `from_pretrained` and `load_dataset` read an existing
    folder, even one named like a hub id), else None: a local folder means nothing to a hub reader, and the Hugging
    Face Hub rejects a card whose base_model is not a model id."""
    if not repo or os.path.exists(repo):
        return None
    return repo if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo) else None


def front_matter(args, kind, lora):
    """The card's metadata. A decoder output's `prior:` names the prior repo it was trained with (what a Kandinsky
    decoder repo's card says, so a combined pipeline can find its prior); a prior output has none: it is a prior."""
    import yaml

    prior, decoder = args.pretrained_prior_model_name_or_path, args.pretrained_decoder_model_name_or_path
    # the library that loads it, the task hubs file it under, and no hosted inference widget (which cannot run it)
    meta = {"license": LICENSE, "library_name": "ppdiffusers", "pipeline_tag": "text-to-image", "inference": False}
    base = hub_id(decoder if kind == "decoder" else prior)
    if base:
        meta["base_model"] = [base]
    if kind == "decoder" and hub_id(prior):
        meta["prior"] = [hub_id(prior)]
    if hub_id(args.dataset_name):
        meta["datasets"] = [args.dataset_name]
    meta["tags"] = ["kandinsky", "text-to-image", "ppdiffusers", "paddlepaddle"] + (["lora"] if lora else [])
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)


def command_line(kind, lora, argv):
    """The command that trained it, shell-quoted, with hub tokens left out."""
    words, hide = [], False
    for word in argv:
        flag = word.split("=", 1)[0]
        if hide:
            word, hide = "<token>", False
        elif flag in SECRET_FLAGS:
            word, hide = (f"{flag}=<token>", False) if "=" in word else (word, True)
        words.append(word)
    return shlex.join(["python", "-u", script_name(kind, lora), *words])


def script_name(kind, lora):
    return f"train_text_to_image_{kind}{'_lora' if lora else ''}.py"


def loading_code(args, kind, lora, prompt):
    """The lines of README 5.1 / 6.1 / 8.3 with this output's folder and the repos it was trained from."""
    q = lambda text: json.dumps(text, ensure_ascii=False)  # noqa: E731  (a Python string literal)
    out = q(args.output_dir)
    prior, decoder = q(args.pretrained_prior_model_name_or_path), q(args.pretrained_decoder_model_name_or_path)
    if lora:
        load = ("from ppdiffusers import KandinskyV22CombinedPipeline, KandinskyV22PriorPipeline\n\n"
                f"prior = KandinskyV22PriorPipeline.from_pretrained({prior})\n"
                "pipe = KandinskyV22CombinedPipeline.from_pretrained(\n"
                f"    {decoder}, **{{\"prior_\" + k: v for k, v in prior.components.items()}}\n)\n"
                f"pipe.{'unet' if kind == 'decoder' else 'prior_prior'}.load_attn_procs({out})\n")
    elif kind == "decoder":
        load = ("from ppdiffusers import KandinskyV22CombinedPipeline\n\n"
                f"pipe = KandinskyV22CombinedPipeline.from_pretrained({out})\n")
    else:
        load = ("from ppdiffusers import DiffusionPipeline, KandinskyV22CombinedPipeline\n\n"
                f"pipe_prior = DiffusionPipeline.from_pretrained({out})\n"
                "prior_components = {\"prior_\" + k: v for k, v in pipe_prior.components.items()}\n"
                f"pipe = KandinskyV22CombinedPipeline.from_pretrained({decoder}, **prior_components)\n")
    size, steps = args.resolution, args.num_inference_steps
    return (f"{load}\nimage = pipe(prompt={q(prompt)}, height={size}, width={size}, num_inference_steps={steps}, "
            f"prior_num_inference_steps={steps}).images[0]\nimage.save(\"example.png\")\n")


def hyperparameters(args, run, step):
    kind, lora, world_size = run.kind, run.lora, run.ctx.world_size
    rows = {"optimizer steps": step, "processes": world_size, "batch size per process": args.train_batch_size,
            "gradient accumulation steps": args.gradient_accumulation_steps,
            "samples per optimizer step": args.train_batch_size * args.gradient_accumulation_steps * world_size,
            "learning rate": args.learning_rate,
            "lr schedule": f"{args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps",
            "AdamW betas, weight decay, epsilon":
                f"{args.adam_beta1}, {args.adam_beta2}, {args.adam_weight_decay}, {args.adam_epsilon}",
            "max gradient norm": args.max_grad_norm, "Min-SNR gamma": args.snr_gamma,
            "precision": f"{args.mixed_precision} (computed in {run.precision.dtype})", "seed": run.seed}
    if lora:
        rows["LoRA rank"] = args.lora_rank
    else:
        rows["EMA"] = args.use_ema
    if kind == "decoder":
        rows["resolution"] = args.resolution
        rows["crop, flip, noise offset"] = (f"{'random' if args.random_crop else 'centre'}, "
                                            f"{'random' if args.random_flip else 'none'}, {args.noise_offset}")
        if args.enable_bucket:
            rows["aspect-ratio buckets"] = (f"--enable_bucket: sides {args.min_bucket_reso}-{args.max_bucket_reso} px in "
                                            f"steps of {args.bucket_reso_steps}, area at most {args.resolution}^2"
                                            + (", never upscaled (--bucket_no_upscale)" if args.bucket_no_upscale
                                               else ""))
    return "| hyperparameter | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows.items())


WHAT = {
    ("decoder", False): ("decoder", "a complete `KandinskyV22CombinedPipeline`: the fine-tuned UNet with the MoVQ of "
                                    "{decoder} and the prior it was trained with, {prior}, whose components are in "
                                    "this folder too (`prior_*`)"),
    ("prior", False): ("prior", "a `KandinskyV22PriorPipeline`: the fine-tuned prior with the CLIP encoders of {prior}. "
                                "It is itself a prior, so its metadata has no `prior:` entry (that entry names a "
                                "decoder's prior); use it with a decoder such as {decoder}"),
    ("decoder", True): ("decoder LoRA", "LoRA weights for the UNet of {decoder} "
                                        "(`paddle_lora_weights.safetensors`), trained with the prior {prior}"),
    ("prior", True): ("prior LoRA", "LoRA weights for the prior of {prior} (`paddle_lora_weights.safetensors`), "
                                    "used with a decoder such as {decoder}. It is a prior's LoRA, so its metadata has "
                                    "no `prior:` entry"),
}


def card(args, run, step, has_grid):
    kind, lora = run.kind, run.lora
    title, what = WHAT[kind, lora]
    what = what.format(prior=f"`{args.pretrained_prior_model_name_or_path}`",
                       decoder=f"`{args.pretrained_decoder_model_name_or_path}`")
    prompts = validation.prompts(args)
    dataset = (f"`{args.dataset_name}`" if args.dataset_name else
               f"the local image folder `{args.train_data_dir}`")
    parts = [f"---\n{front_matter(args, kind, lora)}---\n",
             f"# Kandinsky 2.2 {title}, fine-tuned with PaddlePaddle\n",
             f"This folder is {what}. Trained on {dataset} for {step} optimizer steps.\n"]
    if has_grid:
        images = getattr(args, "num_validation_images", 1)
        parts.append("## Validation images\n\n"
                     f"After the last step ({step}), {args.num_inference_steps} denoising steps, {images} image(s) per "
                     f"prompt; a row per prompt:\n\n![validation images]({GRID})\n\n"
                     + "".join(f"- row {k}: {p}\n" for k, p in enumerate(prompts, 1)))
    parts.append("## Use it\n\n"
                 "With ppdiffusers (`pip install ppdiffusers`); for a copy on a hub, put its repo id in place of the "
                 "folder (on AI Studio, with `FROM_AISTUDIO=1` set):\n\n"
                 f"```python\n{loading_code(args, kind, lora, prompts[0] if prompts else 'a picture')}```\n")
    parts.append(f"## Training\n\nThe command (`{script_name(kind, lora)}` of the Kandinsky 2.2 fine-tuning scripts "
                 "for PaddlePaddle):\n\n"
                 f"```bash\n{command_line(kind, lora, args.command_line)}\n```\n\n"
                 f"{hyperparameters(args, run, step)}")
    return "\n".join(parts)
