"""The per-device memory plan of a run, from the model configs alone (no weights loaded): what each phase of the
run holds (encoding, training, checkpoint, validation), its peak, and whether that fits the GPU.

Sizes are exact for weights, gradients, optimizer states and EMA (parameter counts of the models built without
memory, Paddle's LazyGuard); activations are an estimate from the architecture (tensors kept for the backward pass,
counted per layer at the batch size and resolution), and the runtime is the process's own memory (the CUDA context
on a GPU; Python and the libraries on a CPU, measured).
"""
from dataclasses import dataclass, field

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


# ---------------------------------------------------------------- activations (elements per sample)
def prior_activations(prior, checkpointing):
    """Per transformer block: LayerNorm inputs, q, k, v, attention output and projection, the MLP's 4x hidden
    before and after GELU (16 x tokens x width), plus the attention scores and probabilities."""
    config = prior.config
    tokens = config["num_embeddings"] + config["additional_embeddings"]
    width, heads = config["embedding_dim"], config["num_attention_heads"]
    per_block = 16 * tokens * width + 2 * heads * tokens * tokens
    if checkpointing:  # each block's input kept, one block's activations recomputed at a time
        return config["num_layers"] * tokens * width + per_block
    return config["num_layers"] * per_block


def unet_activations(unet, side, checkpointing):
    """The Kandinsky UNet at latent side `side`: per resnet about 8 tensors of its width (norms, activations, convs;
    11 in the up path, whose input is the concatenated skip), per attention layer q, k, v, output and projection
    (6) plus scores and probabilities over the pixels and the image tokens; the down, middle and up paths."""
    config = unet.config
    channels, layers = config["block_out_channels"], config["layers_per_block"]
    head_dim = config["attention_head_dim"]
    context = 10  # image-embedding tokens from encoder_hid_proj (ImageProjection)
    units = []  # (elements kept, elements of the unit's input), one per resnet / attention layer
    for level, kind in enumerate(config["down_block_types"]):
        c, hw = channels[level], (side >> level) ** 2
        attention = "CrossAttn" in kind
        for _ in range(layers):
            units.append((8 * c * hw, c * hw))
            if attention:
                units.append((6 * c * hw + 2 * (c // head_dim) * hw * (hw + context), c * hw))
        if level < len(channels) - 1:
            units.append((8 * c * hw // 2, c * hw))  # the downsampling resnet
    mid_c, mid_hw = channels[-1], (side >> (len(channels) - 1)) ** 2
    middle = 2 * 8 * mid_c * mid_hw + 6 * mid_c * mid_hw + 2 * (mid_c // head_dim) * mid_hw * (mid_hw + context)
    for j, kind in enumerate(config["up_block_types"]):
        level = len(channels) - 1 - j
        c, hw = channels[level], (side >> level) ** 2
        for _ in range(layers + 1):
            units.append((11 * c * hw, 2 * c * hw))
            if "CrossAttn" in kind:
                units.append((6 * c * hw + 2 * (c // head_dim) * hw * (hw + context), c * hw))
        if level > 0:
            units.append((8 * c * hw * 2, c * hw))  # the upsampling resnet
    ends = 2 * channels[0] * side * side  # conv_in and the output convolution
    if checkpointing:  # ppdiffusers recomputes each resnet and attention layer of the down and up blocks
        return sum(i for _, i in units) + max(k for k, _ in units) + middle + ends
    return sum(k for k, _ in units) + middle + ends


def encoding_activations(models, encoders):
    """The frozen CLIP encoders' working memory for one sample, no gradients kept (they run one at a time): a few
    live tensors of tokens x width, and the attention scores."""
    sizes = []
    for name in encoders:
        config = models[name].config
        tokens = ((config.image_size // config.patch_size) ** 2 + 1 if name == "image_encoder"
                  else config.max_position_embeddings)
        sizes.append(8 * tokens * config.hidden_size + 2 * config.num_attention_heads * tokens * tokens)
    return max(sizes)


# ---------------------------------------------------------------- the plan
def build(args, kind, lora, device=None, processes=1):
    """The plan of a run of the `kind` ("prior" or "decoder") script, full or LoRA, from the repos' configs, on
    `device` ("gpu" or "cpu"; default: this process's device), for one of `processes` (--sharding divides what its
    stage shards by their number)."""
    import paddle
    from ppdiffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from ppdiffusers.transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from .models import lazy_model
    from .validation import prompts

    prior_repo, decoder_repo = args.pretrained_prior_model_name_or_path, args.pretrained_decoder_model_name_or_path
    sources = {"prior": (PriorTransformer, prior_repo, "prior"),
               "image_encoder": (CLIPVisionModelWithProjection, prior_repo, "image_encoder"),
               "text_encoder": (CLIPTextModelWithProjection, prior_repo, "text_encoder"),
               "unet": (UNet2DConditionModel, decoder_repo, "unet"), "movq": (VQModel, decoder_repo, "movq")}
    trained_model = "prior" if kind == "prior" else "unet"
    encoders = ["image_encoder", "text_encoder"] if kind == "prior" else ["image_encoder", "movq"]
    validation_models = (["unet", "movq"] if kind == "prior" else ["prior", "text_encoder"]) if prompts(args) else []
    models = {name: lazy_model(*sources[name], args.cache_dir)
              for name in [trained_model, *encoders, *validation_models]}
    counts = {name: parameters(model) for name, model in models.items()}

    gpu = (device or paddle.get_device()).startswith("gpu")
    half = gpu and args.mixed_precision != "no"
    frozen_bytes = 2 if half else 4
    act_bytes = 2 if half else 4
    batch, cached = args.train_batch_size, args.cache_encoder_outputs

    if kind == "prior":
        activations = prior_activations(models["prior"], args.gradient_checkpointing)
    else:
        factor = 2 ** (len(models["movq"].config["block_out_channels"]) - 1)
        activations = unet_activations(models["unet"], args.resolution // factor, args.gradient_checkpointing)
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
    frozen = ("frozen encoders", 0 if cached else encoder_bytes,
              ("released after encoding (--cache_encoder_outputs); " if cached else "") + " + ".join(encoders))
    runtime = ("runtime", RUNTIME["gpu" if gpu else "cpu"], "CUDA context" if gpu else "the Python process")
    grads = share("gradients", 4 * trained, "fp32, freed between steps")
    acts = ("activations", activations, f"estimate, batch {batch}" +
            (", gradient checkpointing" if args.gradient_checkpointing else ""))
    # the prior scripts encode the next batch while the step runs (prefetch.py)
    ahead = kind == "prior" and not cached
    reading_ahead = ("next batch's encoding", batch * act_bytes * encoding_activations(models, encoders) if ahead else 0,
                     "estimate, encoded while the step runs" if ahead else "encoded before the step, not during it")

    plan = Plan(f"{'GPU' if gpu else 'CPU'}, {args.mixed_precision + ' autocast' if half else 'fp32'}, batch {batch}"
                + (f", {args.resolution} px" if kind == "decoder" else "")
                + (f", one of {processes} processes" if processes > 1 else "")
                + (f", --sharding {stage}" if stage else ""))
    if cached:
        plan.phases["encoding"] = weights + [("frozen encoders", encoder_bytes, " + ".join(encoders)), runtime]
    plan.phases["training"] = weights + [grads] + optimizer + [frozen, acts, reading_ahead, runtime]
    # a checkpoint: gradients freed, the trained weights copied to host arrays while they are written
    plan.phases["checkpoint"] = checkpoint_weights + optimizer + [frozen, runtime, ("weights being written",
                                                                                    4 * trained, "")]
    if stage and processes > 1 and not gpu:  # rank 0 receives every other rank's shard before it writes (sharding.py)
        whole = ADAMW_STATES * 4 * trained
        plan.phases["checkpoint"].append(("other ranks' optimizer states", whole - optimizer[0][1],
                                          "rank 0 holds them while it writes the checkpoint"))
    if validation_models:
        extra = validation_models + (encoders if cached else [])
        plan.phases["validation"] = weights + optimizer + [frozen, runtime, (
            "validation models", frozen_bytes * sum(counts[n] for n in extra), " + ".join(extra))]
    return plan


def report(args, kind, lora, log, device=None, processes=1):
    """Log the plan before any weights load; on a GPU, compare it with the device's memory and name the flags that
    would make it fit. A plan that cannot be computed, or a memory size that cannot be read, is one line."""
    try:
        plan = build(args, kind, lora, device, processes)
    except Exception as e:  # an unknown model class, a missing config: the run goes on without a plan
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
    return (f"even {' '.join(chosen.values())} needs {peak / GB:.1f} GB" +
            (f"; try LoRA ({script})" if script else "; try a GPU with more memory"))
