"""Build tiny random Kandinsky 2.2 repos (prior + decoder) in the hub layout, for tests and the demo.

Nothing is downloaded: the tokenizer vocabulary is generated here and every model is randomly
initialised from a small config. The folders load with the same `from_pretrained` calls as the
real `kandinsky-community/kandinsky-2-2-prior` / `-decoder` repos.

    python -m kandinsky_finetune.tiny_models OUT_DIR [--dataset DIR]   # OUT_DIR/prior, OUT_DIR/decoder
"""
import argparse
import json
import os

# Character-level byte BPE: every byte symbol alone and with the end-of-word mark, no merges.
# That is a valid CLIP vocabulary, small enough for tiny models, and needs no download.
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def write_tokenizer(path, max_length=77):
    from ppdiffusers.transformers import CLIPTokenizer

    os.makedirs(path, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + [_BOS, _EOS])}
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab_file=os.path.join(path, "vocab.json"),
        merges_file=os.path.join(path, "merges.txt"),
        model_max_length=max_length,
    )
    tokenizer.save_pretrained(path)
    return len(vocab)


def build_tiny_kandinsky(out_dir, seed=0, embed_dim=32, image_size=32, prior_layers=2, prior_heads=2, prior_head_dim=16,
                         unet_channels=(8, 16, 32), movq_channels=(8, 8, 8, 8), text_layers=2, vision_layers=2,
                         vision_hidden=None):
    """Write `out_dir/prior` and `out_dir/decoder`; return their paths.

    Sized so that the pipelines' default call (512x512, 25 prior + 100 decoder steps) takes seconds on a CPU:
    4 MoVQ levels downscale by 8 like the real MoVQ (64x64 latents), the UNet attends only at its lowest
    level and in the middle block, and the tiny MoVQ decoder uses group norm (the real one's spatial norm
    needs 32 groups, 4x slower here; training only runs the MoVQ encoder, which is the same either way).
    """
    import paddle
    from ppdiffusers import DDPMScheduler, PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, VQModel
    from ppdiffusers.transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    paddle.seed(seed)
    prior_dir, decoder_dir = os.path.join(out_dir, "prior"), os.path.join(out_dir, "decoder")
    max_length = 77
    vocab_size = write_tokenizer(os.path.join(prior_dir, "tokenizer"), max_length)

    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=embed_dim, intermediate_size=2 * embed_dim, projection_dim=embed_dim,
        num_hidden_layers=text_layers, num_attention_heads=4, max_position_embeddings=max_length,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    text_encoder.save_pretrained(os.path.join(prior_dir, "text_encoder"))

    vision_hidden = vision_hidden or embed_dim  # the text encoder's width is the prior's; the vision tower's is free
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, projection_dim=embed_dim,
        num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size, patch_size=4))
    image_encoder.save_pretrained(os.path.join(prior_dir, "image_encoder"))

    CLIPImageProcessor(crop_size=image_size, size=image_size).save_pretrained(os.path.join(prior_dir, "image_processor"))

    prior = PriorTransformer(num_attention_heads=prior_heads, attention_head_dim=prior_head_dim, num_layers=prior_layers,
                             embedding_dim=embed_dim, num_embeddings=max_length, additional_embeddings=4)
    # A fresh PriorTransformer has clip_std = 0, which would divide by zero: use the identity statistics.
    prior.clip_mean.set_value(paddle.zeros_like(prior.clip_mean))
    prior.clip_std.set_value(paddle.ones_like(prior.clip_std))
    prior.save_pretrained(os.path.join(prior_dir, "prior"))

    UnCLIPScheduler(clip_sample=True, clip_sample_range=5.0, num_train_timesteps=1000, prediction_type="sample",
                    variance_type="fixed_small_log").save_pretrained(os.path.join(prior_dir, "scheduler"))
    _write_model_index(prior_dir, "KandinskyV22PriorPipeline", {
        "prior": ["ppdiffusers", "PriorTransformer"],
        "image_encoder": ["ppdiffusers.transformers", "CLIPVisionModelWithProjection"],
        "text_encoder": ["ppdiffusers.transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["ppdiffusers.transformers", "CLIPTokenizer"],
        "scheduler": ["ppdiffusers", "UnCLIPScheduler"],
        "image_processor": ["ppdiffusers.transformers", "CLIPImageProcessor"],
    })

    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D",) * (len(unet_channels) - 1) + ("SimpleCrossAttnDownBlock2D",),
        up_block_types=("SimpleCrossAttnUpBlock2D",) + ("ResnetUpsampleBlock2D",) * (len(unet_channels) - 1),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=tuple(unet_channels), layers_per_block=1,
        encoder_hid_dim=embed_dim, encoder_hid_dim_type="image_proj", cross_attention_dim=embed_dim,
        attention_head_dim=8, resnet_time_scale_shift="scale_shift", class_embed_type=None, norm_num_groups=8)
    unet.save_pretrained(os.path.join(decoder_dir, "unet"))

    movq = VQModel(
        block_out_channels=list(movq_channels),
        down_block_types=["DownEncoderBlock2D"] * (len(movq_channels) - 1) + ["AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (len(movq_channels) - 1),
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        num_vq_embeddings=12, vq_embed_dim=4, norm_type="group")
    movq.save_pretrained(os.path.join(decoder_dir, "movq"))

    DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, num_train_timesteps=1000,
                  prediction_type="epsilon", steps_offset=1).save_pretrained(os.path.join(decoder_dir, "scheduler"))
    _write_model_index(decoder_dir, "KandinskyV22Pipeline", {
        "unet": ["ppdiffusers", "UNet2DConditionModel"],
        "scheduler": ["ppdiffusers", "DDPMScheduler"],
        "movq": ["ppdiffusers", "VQModel"],
    })
    return prior_dir, decoder_dir


def write_tiny_dataset(path, num_images=8, size=(64, 48), seed=0):
    """An imagefolder of simple coloured pictures with captions in metadata.jsonl: odd rows carry a list of
    captions (one is picked at random per step), even rows a list of one."""
    import numpy as np
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue"]
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        for i in range(num_images):
            array = np.zeros((size[1], size[0], 3), np.uint8)
            array[..., i % 3] = 200
            array[rng.integers(size[1]):, : rng.integers(size[0])] = 255  # a white block in a random place
            Image.fromarray(array).save(os.path.join(path, f"{i:03d}.png"))
            name = colours[i % 3]
            captions = [f"a {name} picture", f"{name} with a white block"] if i % 2 else [f"a {name} picture"]
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": captions}) + "\n")
    return path


def _write_model_index(path, class_name, components):
    import ppdiffusers

    index = {"_class_name": class_name, "_diffusers_version": ppdiffusers.__version__, **components}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default=None, help="Also write a tiny imagefolder dataset here.")
    args = parser.parse_args()
    prior_dir, decoder_dir = build_tiny_kandinsky(args.out_dir, seed=args.seed)
    print(f"tiny prior repo: {prior_dir}\ntiny decoder repo: {decoder_dir}")
    if args.dataset:
        print(f"tiny dataset: {write_tiny_dataset(args.dataset)}")


if __name__ == "__main__":
    main()
