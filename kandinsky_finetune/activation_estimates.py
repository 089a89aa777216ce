"""What a training step's activations hold, per sample, in elements: the prior's, the UNet's and the frozen CLIP
encoders' working memory, from the models' configs (memory_plan.py turns them into bytes).

Measured against these estimates: benchmarks/activations.py (docs/memory.md 11.4), the per-layer factors below from the
allocator's counts of what each kind of layer keeps for its backward pass (fp32, in tensors of its width).
"""


def prior_activations(prior, checkpointing):
    """Per transformer block: LayerNorm inputs, q, k, v, attention output and projection, the MLP's 4x hidden
    before and after GELU (16 x tokens x width), plus the attention probabilities. The blocks run at heads x head
    dim (2048 for the real prior), wider than the embeddings (1280) they take in and give out."""
    config = prior.config
    tokens = config["num_embeddings"] + config["additional_embeddings"]
    heads = config["num_attention_heads"]
    width = heads * config["attention_head_dim"]
    per_block = 16 * tokens * width + 2 * heads * tokens * tokens
    if checkpointing:  # each block's input kept, one block's activations recomputed at a time; its backward pass
        # frees them as it goes: the peak holds about 85% of them (measured: 79-95%)
        return config["num_layers"] * tokens * width + int(0.85 * per_block)
    # around the blocks: the projected inputs, the token sequence, the output's norm and projection (measured: ~5)
    return config["num_layers"] * per_block + 5 * tokens * width


def unet_activations(unet, side, checkpointing):
    """The Kandinsky UNet at latent side `side` (or (rows, columns)), per layer (in tensors of its channels x pixels):
    a resnet keeps 7 (norms, activations, convolutions, its output), 11 in the up path (its input is the skip
    concatenated to the path, 2x wide); an attention layer 6, plus the attention probabilities over the pixels and
    the image tokens; a downsampling resnet 4, an upsampling one 26 (it works at 4x the pixels). Gradient
    checkpointing in ppdiffusers 0.29 recomputes only the resnets of the down and up blocks: their input and output
    stay, one resnet comes back at a time (its forward pass peaks at 16 tensors, 23 with the skip); attention, the
    down/up samplers and the middle block keep theirs."""
    config = unet.config
    channels, layers = config["block_out_channels"], config["layers_per_block"]
    head_dim = config["attention_head_dim"]
    # the image embedding becomes this many context tokens (ImageProjection; its default when not built)
    context = getattr(getattr(unet, "encoder_hid_proj", None), "num_image_text_embeds", 32)

    def attention(c, hw):
        return 6 * c * hw + (c // head_dim) * hw * (hw + context)

    rows, cols = side if isinstance(side, tuple) else (side, side)
    units = []  # (elements kept, elements kept when recomputed (None: never recomputed), peak when recomputed)
    for level, kind in enumerate(config["down_block_types"]):
        c, hw = channels[level], (rows >> level) * (cols >> level)
        for _ in range(layers):
            units.append((7 * c * hw, c * hw, 16 * c * hw))
            if "CrossAttn" in kind:
                units.append((attention(c, hw), None, 0))
        if level < len(channels) - 1:
            units.append((4 * c * hw, None, 0))  # the downsampling resnet
    mid_c, mid_hw = channels[-1], (rows >> (len(channels) - 1)) * (cols >> (len(channels) - 1))
    units.append((2 * 7 * mid_c * mid_hw + attention(mid_c, mid_hw), None, 0))  # never recomputed
    for j, kind in enumerate(config["up_block_types"]):
        level = len(channels) - 1 - j
        c, hw = channels[level], (rows >> level) * (cols >> level)
        for _ in range(layers + 1):
            units.append((11 * c * hw, 3 * c * hw, 23 * c * hw))  # recomputed: the concatenated input, the output
            if "CrossAttn" in kind:
                units.append((attention(c, hw), None, 0))
        if level > 0:
            units.append((26 * c * hw, None, 0))  # the upsampling resnet, at this level's pixels
    ends = 4 * channels[0] * rows * cols  # conv_in, the output's norm, activation and convolution
    if not checkpointing:
        return sum(k for k, _, _ in units) + ends
    return sum(k if r is None else r for k, r, _ in units) + max(p - r for _, r, p in units if r is not None) + ends


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
