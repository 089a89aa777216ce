"""The per-device memory plan of a run, from the model configs alone (no weights loaded): what each phase of the
run holds (encoding, training, checkpoint, validation), its peak, and whether that fits the GPU.

Sizes are exact for weights, gradients, optimizer states and EMA (parameter counts of the models built without
memory, Paddle's LazyGuard); activations are an estimate from the architecture (tensors kept for the backward pass,
counted per layer at the batch size and resolution), and the runtime is the process's own memory (the CUDA context
on a GPU; Python and the libraries on a CPU, measured).
"""
from dataclasses import dataclass, field

from .activation_estimates import encoding_activations, prior_activations, unet_activations
from .buckets import largest as largest_bucket

GB = 1e9
# What the process holds before any model: CUDA context and kernels' workspace on a GPU (about 1 GB on current
# cards); on a CPU the Python process with paddle, ppdiffusers and datasets imported (0.57 GB measured here).
RUNTIME = {"gpu": 1.0 * GB, "cpu": 0.6 * GB}
ADAMW_STATES = 2  # first and second moment per trained parameter, fp32
# what each --sharding stage divides by the number of processes (sharding.py runs them)
SHARDED = {"stage1": ("optimizer states",), "stage2": ("optimizer states", "gradients"),
           "stage3": ("optimizer states", "gradients", "trained weights", "frozen base model")}
SLICED_ABOVE = 2 ** 20  # elements: stage 3 slices parameters larger than this (Paddle's segment_size), keeps the rest


def sliced_fraction(model):
    """The fraction of `model`'s parameters that stage 3 slices (those of more than SLICED_ABOVE elements)."""
    sizes = [p.size for p in model.parameters()]
    return sum(s for s in sizes if s > SLICED_ABOVE) / max(1, sum(sizes))


def largest_layer(model):
    """Parameters of the sublayer with the most parameters of its own: what stage 3 gathers whole at a time."""
    return max([sum(p.size for p in layer.parameters(include_sublayers=False))
                for _, layer in model.named_sublayers()] or [0])


@dataclass
class Plan:
    """Bytes per item of each phase; `phases[name]` lists (label, bytes, note)."""
    title: str
    phases: dict = field(default_factory=dict)

    def total(self, phase):
        return sum(b for _, b, _ in self.phases[phase])

    @property
    def peak_phase(self):
        return max(self.phases, key=self.total)

    @property
    def peak(self):
        return self.total(self.peak_phase)

    def lines(self):
        training = self.phases["training"]
        out = [f"memory plan per device ({self.title}): {self.peak / GB:.1f} GB at the peak ({self.peak_phase})"]
        out += [f"  {label:<26}{b / GB:7.2f} GB  {note}".rstrip() for label, b, note in training]
        out.append("  phases: " + ", ".join(f"{name} {self.total(name) / GB:.1f} GB" for name in self.phases))
        return out


def parameters(model):
    return sum(p.size for p in model.parameters())


def lora_parameters(model, rank):
    """Parameters `lora.add_lora` adds: rank x (in + out) per attention projection."""
    from ppdiffusers.models.attention_processor import Attention

    from .lora import _projections

    return sum(rank * sum(linear.weight.shape) for _, m in model.named_sublayers() if isinstance(m, Attention)
               for _, linear in _projections(m))


# ---------------------------------------------------------------- the plan
def build(args, kind, lora, device=None, processes=1):
    """The plan of a run of the `kind` ("prior" or "decoder") script, full or LoRA, from the repos' configs, on
    `device` ("gpu" or "cpu"; default: this process's device), for one of `processes` (--sharding divides what its
    stage shards by their number)."""
    import paddle
    from ppdiffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from ppdiffusers.transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from . import models as loading
    from .validation import prompts

    prior_repo, decoder_repo = args.pretrained_prior_model_name_or_path, args.pretrained_decoder_model_name_or_path
    sources = {"prior": (PriorTransformer, prior_repo, "prior"),
               "image_encoder": (CLIPVisionModelWithProjection, prior_repo, "image_encoder"),
               "text_encoder": (CLIPTextModelWithProjection, prior_repo, "text_encoder"),
               "unet": (UNet2DConditionModel, decoder_repo, "unet"), "movq": (VQModel, decoder_repo, "movq")}
    trained_model = "prior" if kind == "prior" else "unet"
    encoders = ["image_encoder", "text_encoder"] if kind == "prior" else ["image_encoder", "movq"]
    validation_models = (["unet", "movq"] if kind == "prior" else ["prior", "text_encoder"]) if prompts(args) else []
    flags = {prior_repo: loading.PRIOR_FLAG, decoder_repo: loading.DECODER_FLAG}
    for repo in {sources[name][1] for name in [trained_model, *encoders, *validation_models]}:  # (the models' only)
        loading.check_repo(repo, loading.PRIOR_SUBFOLDERS if repo == prior_repo else loading.DECODER_SUBFOLDERS,
                           flags[repo], needed=[sources[n][2] for n in [trained_model, *encoders, *validation_models]
                                                if sources[n][1] == repo])
    # a config that cannot be read is a model that cannot be loaded: the error loading would give, now
    models = {name: loading.lazy_model(*sources[name], args.cache_dir, flag=flags[sources[name][1]])
              for name in [trained_model, *encoders, *validation_models]}
    counts = {name: parameters(model) for name, model in models.items()}

    gpu = (device or paddle.get_device()).startswith("gpu")
    half = gpu and args.mixed_precision != "no"
    frozen_bytes = 2 if half else 4
    act_bytes = 2 if half else 4
    batch, cached = args.train_batch_size, args.cache_encoder_outputs
    # the decoder trains without its cache on non-square images with --random_crop (decoder.cached_dataset), which
    # the plan cannot see: it keeps the encoders then, as the run will
    uncacheable = cached and kind == "decoder" and getattr(args, "random_crop", False)
    # the decoder's training size: the largest bucket with --enable_bucket (the prior scripts have no such flag)
    bucket = largest_bucket(args) if getattr(args, "enable_bucket", False) else None

    if kind == "prior":
        activations = prior_activations(models["prior"], args.gradient_checkpointing)
    else:
        factor = 2 ** (len(models["movq"].config["block_out_channels"]) - 1)
        width, height = bucket or (args.resolution,) * 2
        activations = unet_activations(models["unet"], (height // factor, width // factor), args.gradient_checkpointing)
    activations *= batch * act_bytes

    trained = lora_parameters(models[trained_model], args.lora_rank) if lora else counts[trained_model]
    what = f"LoRA rank {args.lora_rank} on the {trained_model}" if lora else f"the {trained_model}"
    weights = [("trained weights", 4 * trained, f"{what}, {trained:,} parameters, fp32")]
    if lora:
        weights.append(("frozen base model", frozen_bytes * counts[trained_model],
                        f"the {trained_model}, {counts[trained_model]:,} parameters"))
    stage = getattr(args, "sharding", None) if processes > 1 else None
    sharded = SHARDED.get(stage, ())

    # stage 3 slices the large parameters only (a LoRA layer's matrices are small); the other stages divide all
    fractions = {}
    if stage == "stage3":
        base = sliced_fraction(models[trained_model])
        trained_part = 0.0 if lora else base
        fractions = {"frozen base model": base, "trained weights": trained_part, "gradients": trained_part,
                     "optimizer states": trained_part}

    def share(label, size, note):  # this process's part of what --sharding divides
        if label not in sharded:
            return label, size, note
        divided = int(size * fractions.get(label, 1.0))
        of = f"{divided / GB:.2f} GB" + (f" (the parameters of over {SLICED_ABOVE:,} elements)" if divided < size else "")
        return label, size - divided + divided // processes, f"{note}; 1/{processes} of {of} (--sharding {stage})"

    weights = [share(*item) for item in weights]
    checkpoint_weights = list(weights)  # (stage 3 gathers them to host memory, a parameter at a time)
    if stage == "stage3":  # a layer computes with its weights gathered whole, the next layer's on their way
        gathered = 2 * (frozen_bytes if lora else 4) * largest_layer(models[trained_model])
        weights.append(("gathered layers", gathered, "the layer computing and the next, whole (--sharding stage3)"))

    optimizer = [share("optimizer states", ADAMW_STATES * 4 * trained, "AdamW: two moments, fp32")]
    if getattr(args, "use_ema", False):
        optimizer.append(("EMA", 4 * trained, "a copy of the trained weights"))
    encoder_bytes = frozen_bytes * sum(counts[n] for n in encoders)
    released = cached and not uncacheable
    frozen = ("frozen encoders", 0 if released else encoder_bytes,
              ("released after encoding (--cache_encoder_outputs); " if released else
               "kept: non-square images are not cached with --random_crop; " if uncacheable else "")
              + " + ".join(encoders))
    runtime = ("runtime", RUNTIME["gpu" if gpu else "cpu"], "CUDA context" if gpu else "the Python process")
    grads = share("gradients", 4 * trained, "fp32, freed between steps")
    acts = ("activations", activations, f"estimate, batch {batch}" +
            (", gradient checkpointing" if args.gradient_checkpointing else ""))
    # the prior scripts encode the next batch while the step runs (prefetch.py), unless worker processes load it
    ahead = kind == "prior" and not cached and not getattr(args, "dataloader_num_workers", 0)
    reading_ahead = ("next batch's encoding", batch * act_bytes * encoding_activations(models, encoders) if ahead else 0,
                     "estimate, encoded while the step runs" if ahead else
                     "none: cached" if cached and not uncacheable else "encoded before the step, not during it")

    plan = Plan(f"{'GPU' if gpu else 'CPU'}, {args.mixed_precision + ' autocast' if half else 'fp32'}, batch {batch}"
                + ("" if kind != "decoder" else ", largest bucket {}x{} px".format(*bucket) if bucket else
                   f", {args.resolution} px")
                + (f", one of {processes} processes" if processes > 1 else "")
                + (f", --sharding {stage}" if stage else ""))
    if cached:  # the scripts load the trained model once the encoders are released
        plan.phases["encoding"] = [("frozen encoders", encoder_bytes, " + ".join(encoders)), runtime]
    plan.phases["training"] = weights + [grads] + optimizer + [frozen, acts, reading_ahead, runtime]
    # a checkpoint: gradients freed, the weights written a tensor at a time (from a GPU through host memory)
    largest = 0 if gpu or lora else 4 * max(p.size for p in models[trained_model].parameters())  # (LoRA's: small)
    plan.phases["checkpoint"] = checkpoint_weights + optimizer + [frozen, runtime, (
        "tensor being written", largest, "in host memory, a tensor at a time" if gpu else "the largest")]
    if stage and processes > 1 and not gpu:  # rank 0 receives every other rank's shard before it writes (sharding.py)
        whole = ADAMW_STATES * 4 * trained
        plan.phases["checkpoint"].append(("other ranks' optimizer states", whole - optimizer[0][1],
                                          "rank 0 holds them while it writes the checkpoint"))
    if validation_models:
        extra = validation_models + (encoders if released else [])
        plan.phases["validation"] = weights + optimizer + [frozen, runtime, (
            "validation models", frozen_bytes * sum(counts[n] for n in extra), " + ".join(extra))]
    return plan


def report(args, kind, lora, log, device=None, processes=1):
    """Log the plan before any weights load; on a GPU, compare it with the device's memory and name the flags that
    would make it fit. A plan that cannot be computed, or a memory size that cannot be read, is one line. A repo or
    config that cannot be read is the run's error (UsageError): loading would fail on it right after."""
    from .params import UsageError

    try:
        plan = build(args, kind, lora, device, processes)
    except UsageError:
        raise
    except Exception as e:  # e.g. a model class the plan does not know: the run goes on without a plan
        log.warn(f"no memory plan: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        return None
    for line in plan.lines():
        log(line)
    import paddle

    if "gpu" not in paddle.get_device():  # (a plan for a GPU made elsewhere has no device to compare with)
        return plan
    try:
        capacity = paddle.device.cuda.get_device_properties().total_memory
    except Exception as e:
        log.warn(f"cannot read the GPU's memory size ({type(e).__name__}); the plan is not compared with it")
        return plan
    if plan.peak > capacity:
        log.warn(f"the plan needs {plan.peak / GB:.1f} GB, this GPU has {capacity / GB:.1f} GB: "
                 + fitting_flags(args, kind, lora, capacity, processes))
    return plan


def fitting_flags(args, kind, lora, capacity, processes=1):
    """The smallest set of memory-saving flags (in the order they cost least) whose plan fits `capacity`."""
    import copy

    # with several processes, sharding costs communication, not compute: tried right after the cache
    stages = [(f"--sharding {stage}", "sharding", stage) for stage in SHARDED] if processes > 1 else []
    options = [("--cache_encoder_outputs", "cache_encoder_outputs", True), *stages,
               ("--gradient_checkpointing", "gradient_checkpointing", True),
               ("--mixed_precision fp16", "mixed_precision", "fp16"),
               ("--train_batch_size 1", "train_batch_size", 1)]
    trial, chosen = copy.copy(args), {}  # {setting: flag}; a later stage replaces an earlier one in place
    peak = build(trial, kind, lora, processes=processes).peak  # (if every flag is set already, this is the answer)
    for flag, name, value in options:
        current = getattr(trial, name, None)
        if current == value or name == "sharding" and current and list(SHARDED).index(current) > list(
                SHARDED).index(value):
            continue
        setattr(trial, name, value)
        chosen[name] = flag
        peak = build(trial, kind, lora, processes=processes).peak
        if peak <= capacity:
            return f"it would fit with {' '.join(chosen.values())} ({peak / GB:.1f} GB)"
    script = f"train_text_to_image_{kind}_lora.py" if not lora else None
    return ((f"even {' '.join(chosen.values())} needs {peak / GB:.1f} GB" if chosen else
             f"every memory-saving flag is already set ({peak / GB:.1f} GB)") +
            (f"; try LoRA ({script})" if script else "; try a GPU with more memory"))
