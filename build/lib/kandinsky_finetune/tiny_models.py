"""Build random Kandinsky 2.2 repos (prior + decoder) in the hub layout: tiny ones for tests and the demo, and
ones with the true architectures (`--size real`) to measure memory, speed and disk at real size.

Nothing is downloaded: the tokenizer vocabulary is generated here and every model is randomly
initialised from its config. The folders load with the same `from_pretrained` calls as the
real `kandinsky-community/kandinsky-2-2-prior` / `-decoder` repos.

    python -m kandinsky_finetune.tiny_models OUT_DIR [--dataset DIR]   # OUT_DIR/prior, OUT_DIR/decoder
    python -m kandinsky_finetune.tiny_models OUT_DIR --size real       # about 19 GB, a few minutes
"""
import argparse
import itertools
import json
import os

# A byte-level BPE vocabulary: every byte symbol alone and with the end-of-word mark, then (for a larger vocabulary)
# merges of letters and digits. A valid CLIP vocabulary of any size that needs no download.
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's text positions


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


def _merges(count):
    """`count` BPE merges (left, right), each making a new token from two existing ones: letter and digit pairs,
    then triples, alone and at a word's end."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    merges, prefixes = [], list(alphabet)
    while len(merges) < count:
        longer = []
        for prefix, c in itertools.product(prefixes, alphabet):
            merges += [(prefix, c + "</w>"), (prefix, c)]
            longer.append(prefix + c)
        prefixes = longer
    return merges[:count]


def write_tokenizer(path, vocab_size, max_length=MAX_LENGTH):
    """A CLIP tokenizer with `vocab_size` tokens, the start and end tokens last (as in CLIP's own vocabulary)."""
    from ppdiffusers.transformers import CLIPTokenizer

    os.makedirs(path, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = _merges(vocab_size - len(tokens) - 2)
    tokens += [left + right for left, right in merges] + [_BOS, _EOS]
    vocab = {s: i for i, s in enumerate(tokens)}
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges))
    tokenizer = CLIPTokenizer(
        vocab_file=os.path.join(path, "vocab.json"),
        merges_file=os.path.join(path, "merges.txt"),
        model_max_length=max_length,
    )
    tokenizer.save_pretrained(path)


def tiny_spec(embed_dim=32, image_size=32, prior_layers=2, prior_heads=2, prior_head_dim=16, unet_channels=(8, 16, 32),
              movq_channels=(8, 8, 8, 8), text_layers=2, vision_layers=2, vision_hidden=None):
    """Configs of tiny Kandinsky 2.2 components, sized so that the pipelines' default call (512x512, 25 prior +
    100 decoder steps) takes seconds on a CPU: 4 MoVQ levels downscale by 8 like the real MoVQ (64x64 latents),
    the UNet attends only at its lowest level and in the middle block, and the tiny MoVQ decoder uses group norm
    (the real one's spatial norm needs 32 groups, 4x slower here; training only runs the MoVQ encoder, which is
    the same either way)."""
    vision_hidden = vision_hidden or embed_dim  # the text encoder's width is the prior's; the vision tower's is free
    return {
        "vocab_size": len(_byte_symbols()) * 2 + 2,
        "text_encoder": dict(hidden_size=embed_dim, intermediate_size=2 * embed_dim, projection_dim=embed_dim,
                             num_hidden_layers=text_layers, num_attention_heads=4),
        "image_encoder": dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, projection_dim=embed_dim,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size, patch_size=4),
        "image_processor": dict(crop_size=image_size, size=image_size),
        "prior": dict(num_attention_heads=prior_heads, attention_head_dim=prior_head_dim, num_layers=prior_layers,
                      embedding_dim=embed_dim, num_embeddings=77, additional_embeddings=4),
        "unet": dict(
            in_channels=4, out_channels=8, addition_embed_type="image",
            down_block_types=("ResnetDownsampleBlock2D",) * (len(unet_channels) - 1) + ("SimpleCrossAttnDownBlock2D",),
            up_block_types=("SimpleCrossAttnUpBlock2D",) + ("ResnetUpsampleBlock2D",) * (len(unet_channels) - 1),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=tuple(unet_channels), layers_per_block=1,
            encoder_hid_dim=embed_dim, encoder_hid_dim_type="image_proj", cross_attention_dim=embed_dim,
            attention_head_dim=8, resnet_time_scale_shift="scale_shift", class_embed_type=None, norm_num_groups=8),
        "movq": dict(
            block_out_channels=list(movq_channels),
            down_block_types=["DownEncoderBlock2D"] * (len(movq_channels) - 1) + ["AttnDownEncoderBlock2D"],
            up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (len(movq_channels) - 1),
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            num_vq_embeddings=12, vq_embed_dim=4, norm_type="group"),
        "prior_scheduler": dict(clip_sample=True, clip_sample_range=5.0, num_train_timesteps=1000,
                                prediction_type="sample", variance_type="fixed_small_log"),
        "decoder_scheduler": dict(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1),
    }


# The architectures of kandinsky-community/kandinsky-2-2-prior and -2-2-decoder: the prior, OpenCLIP ViT-bigG/14's
# image and text towers with projections, the image-conditioned UNet and MoVQ. The UNet, MoVQ, text encoder and
# decoder scheduler configs as the hub repos' config files have them (copies of those files are public); the
# prior's and the image encoder's from their parameter counts (1,026,225,920 and about 1.845B) and ViT-bigG/14.
REAL_SPEC = {
    "vocab_size": 49408,
    "text_encoder": dict(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                         num_attention_heads=20, hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),
    "image_encoder": dict(hidden_size=1664, intermediate_size=8192, projection_dim=1280, num_hidden_layers=48,
                          num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5),
    "image_processor": dict(crop_size=224, size=224),
    "prior": dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=1280, num_embeddings=77,
                  additional_embeddings=4, dropout=0.0),
    "unet": dict(
        in_channels=4, out_channels=8, addition_embed_type="image", addition_embed_type_num_heads=64,
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(384, 768, 1152, 1536), layers_per_block=3,
        encoder_hid_dim=1280, encoder_hid_dim_type="image_proj", cross_attention_dim=768, attention_head_dim=64,
        resnet_time_scale_shift="scale_shift", class_embed_type=None, norm_num_groups=32, sample_size=64),
    "movq": dict(
        block_out_channels=[128, 256, 256, 512],
        down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        num_vq_embeddings=16384, vq_embed_dim=4, norm_type="spatial", sample_size=32),
    "prior_scheduler": dict(clip_sample=True, clip_sample_range=10.0, num_train_timesteps=1000, prediction_type="sample",
                            variance_type="fixed_small_log"),
    "decoder_scheduler": dict(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=True,
                              num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1),
}


def model_classes():
    """{component: (class, config class or None)} for the models of a spec."""
    from ppdiffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from ppdiffusers.transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                                          CLIPVisionModelWithProjection)

    return {"text_encoder": (CLIPTextModelWithProjection, CLIPTextConfig),
            "image_encoder": (CLIPVisionModelWithProjection, CLIPVisionConfig),
            "prior": (PriorTransformer, None), "unet": (UNet2DConditionModel, None), "movq": (VQModel, None)}


def model_config(spec, name):
    """The constructor arguments of component `name` (the text encoder's token ids follow the vocabulary)."""
    if name != "text_encoder":
        return dict(spec[name])
    vocab = spec["vocab_size"]
    return {"vocab_size": vocab, "max_position_embeddings": MAX_LENGTH, "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1, "pad_token_id": vocab - 1, **spec[name]}


def build_model(spec, name):
    cls, config_cls = model_classes()[name]
    config = model_config(spec, name)
    return cls(config_cls(**config)) if config_cls else cls(**config)


def build_tiny_kandinsky(out_dir, seed=0, **sizes):
    """Write `out_dir/prior` and `out_dir/decoder` with tiny models (`tiny_spec(**sizes)`); return their paths."""
    return write_repos(out_dir, tiny_spec(**sizes), seed)


def build_real_kandinsky(out_dir, seed=0):
    """The same at the true Kandinsky 2.2 sizes (about 19 GB on disk in fp32), randomly initialised."""
    return write_repos(out_dir, REAL_SPEC, seed, log=lambda message: print(message, flush=True))


def write_repos(out_dir, spec, seed=0, log=lambda message: None):
    """Write `out_dir/prior` and `out_dir/decoder` in the hub layout; return their paths. One model is in memory
    at a time, so building peaks at the largest model (and its copy while it is written)."""
    import gc
    import time

    import paddle
    from ppdiffusers import DDPMScheduler, UnCLIPScheduler
    from ppdiffusers.transformers import CLIPImageProcessor

    from . import output

    paddle.seed(seed)
    prior_dir, decoder_dir = os.path.join(out_dir, "prior"), os.path.join(out_dir, "decoder")
    write_tokenizer(os.path.join(prior_dir, "tokenizer"), spec["vocab_size"])

    def write_model(name, repo_dir, prepare=lambda model: None):
        start = time.time()
        model = build_model(spec, name)
        prepare(model)
        model.save_pretrained(os.path.join(repo_dir, name))
        log(f"{name}: {sum(p.size for p in model.parameters()) / 1e9:.3f}B parameters, {time.time() - start:.0f} s")
        del model
        gc.collect()

    def identity_statistics(prior):
        # A fresh PriorTransformer has clip_std = 0, which would divide by zero: use the identity statistics.
        prior.clip_mean.set_value(paddle.zeros_like(prior.clip_mean))
        prior.clip_std.set_value(paddle.ones_like(prior.clip_std))

    write_model("text_encoder", prior_dir)
    write_model("image_encoder", prior_dir)
    CLIPImageProcessor(**spec["image_processor"]).save_pretrained(os.path.join(prior_dir, "image_processor"))
    write_model("prior", prior_dir, identity_statistics)
    UnCLIPScheduler(**spec["prior_scheduler"]).save_pretrained(os.path.join(prior_dir, "scheduler"))
    output.write_index(prior_dir, "KandinskyV22PriorPipeline", output.PRIOR_COMPONENTS)

    write_model("unet", decoder_dir)
    write_model("movq", decoder_dir)
    DDPMScheduler(**spec["decoder_scheduler"]).save_pretrained(os.path.join(decoder_dir, "scheduler"))
    output.write_index(decoder_dir, "KandinskyV22Pipeline", output.DECODER_COMPONENTS)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny",
                        help="tiny: seconds to build, for tests and the demo; real: the true Kandinsky 2.2 "
                             "architectures (about 19 GB on disk, a few minutes, peaks at about 15 GB of RAM).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default=None, help="Also write a tiny imagefolder dataset here.")
    args = parser.parse_args()
    build = build_real_kandinsky if args.size == "real" else build_tiny_kandinsky
    prior_dir, decoder_dir = build(args.out_dir, seed=args.seed)
    print(f"{args.size} prior repo: {prior_dir}\n{args.size} decoder repo: {decoder_dir}")
    if args.dataset:
        print(f"tiny dataset: {write_tiny_dataset(args.dataset)}")


if __name__ == "__main__":
    main()
