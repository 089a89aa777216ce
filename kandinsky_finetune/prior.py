"""The prior's training task, shared by the full and the LoRA prior scripts: its components, how a sample
is prepared, the loss, and the pipelines built around the prior being trained.

Math: the CLIP image embedding of the image, normalised with the prior's fixed clip_mean / clip_std, is
noised with the squaredcos_cap_v2 DDPM schedule; the prior predicts the clean normalised embedding
(prediction_type "sample") from the noisy one, the timestep, the text embedding, the text encoder's last
hidden state and the text mask.
"""
import contextlib
from types import SimpleNamespace

import numpy as np
import paddle

from . import data, diffusion, models
from .loader import as_tensor
from .models import DECODER_FLAG, PRIOR_FLAG


ENCODERS = ("image_encoder", "text_encoder")
DECODER_PARTS = ("decoder_unet", "decoder_movq", "decoder_scheduler")


def load_components(args, precision, needs_decoder):
    """The prior's components in a namespace. The CLIP encoders are frozen (in half precision under
    --mixed_precision); `c.loaders` can load them again once `cached_dataset` has released them. The decoder's
    models, which only turn validation embeddings into images, are loaded (frozen too) for each validation. The
    prior itself is loaded by `load_trained`, once the data is ready."""
    from ppdiffusers import DDPMScheduler, PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, VQModel
    from ppdiffusers.transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                                          CLIPVisionModelWithProjection)

    repo, decoder_repo = args.pretrained_prior_model_name_or_path, args.pretrained_decoder_model_name_or_path
    models.check_repo(repo, models.PRIOR_SUBFOLDERS, PRIOR_FLAG)
    if needs_decoder:  # the decoder only turns validation embeddings into images
        models.check_repo(decoder_repo, models.DECODER_SUBFOLDERS, DECODER_FLAG)
        models.check_pair(repo, decoder_repo, args.cache_dir)
        models.check_resolution(args.resolution, models.movq_downscale_factor_of_repo(
            decoder_repo, DECODER_FLAG, args.cache_dir), "validation images")
    load = lambda cls, sub: models.load(cls, repo, sub, PRIOR_FLAG, args.cache_dir)  # noqa: E731
    load_decoder = lambda cls, sub: models.load(cls, decoder_repo, sub, DECODER_FLAG, args.cache_dir)  # noqa: E731

    c = SimpleNamespace(
        # Training uses the DDPM form of the prior's noise schedule; saved pipelines keep the repo's
        # UnCLIPScheduler, which the prior pipeline needs at inference.
        noise_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
        inference_scheduler=load(UnCLIPScheduler, "scheduler"),
        image_processor=load(CLIPImageProcessor, "image_processor"),
        tokenizer=load(CLIPTokenizer, "tokenizer"),
        loaders={"image_encoder": lambda: models.frozen(load(CLIPVisionModelWithProjection, "image_encoder"), precision),
                 "text_encoder": lambda: models.frozen(load(CLIPTextModelWithProjection, "text_encoder"), precision),
                 "decoder_unet": lambda: models.frozen(load_decoder(UNet2DConditionModel, "unet"), precision),
                 "decoder_movq": lambda: models.frozen(load_decoder(VQModel, "movq"), precision),
                 "prior": lambda: load(PriorTransformer, "prior"),
                 "decoder_scheduler": lambda: load_decoder(DDPMScheduler, "scheduler")},
        **dict.fromkeys(DECODER_PARTS))
    c.image_encoder, c.text_encoder = c.loaders["image_encoder"](), c.loaders["text_encoder"]()
    return c


def load_trained(c, precision):
    """The prior to train, into `c.prior`: loaded after `cached_dataset` has released the encoders, so with
    --cache_encoder_outputs the two never share memory (the run peaks at the larger of encoding and training)."""
    c.prior = c.loaders.pop("prior")()
    # clip_mean / clip_std are the fixed statistics of the CLIP image embeddings, not weights to learn
    c.prior.clip_mean.stop_gradient = c.prior.clip_std.stop_gradient = True
    c.clip_mean, c.clip_std = c.prior.clip_mean.detach(), c.prior.clip_std.detach()
    models.skip_fp32_upcasts(precision, c.prior)
    return c.prior


def tokenize(c, captions):
    tokens = c.tokenizer(captions, max_length=c.tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_attention_mask=True)
    return np.asarray(tokens["input_ids"], dtype="int64"), np.asarray(tokens["attention_mask"], dtype="bool")


def encode(c, precision, text_input_ids, clip_pixel_values):
    """The frozen encoders' outputs: (text_embeds, text last_hidden_state, CLIP image_embeds), in float32."""
    with paddle.no_grad(), precision.autocast():
        text = c.text_encoder(as_tensor(text_input_ids))
        image_embeds = c.image_encoder(as_tensor(clip_pixel_values)).image_embeds
    return text.text_embeds.cast("float32"), text.last_hidden_state.cast("float32"), image_embeds.cast("float32")


def cached_dataset(ds, args, c, run):
    """--cache_encoder_outputs: ds's images and captions replaced by the encoders' outputs, for every caption of
    a row (so the random pick among a list still happens per step). The text encoder's hidden states are kept
    up to each caption's length only: the prior never attends to padding (its mask), so zeros restore it exactly.
    Training needs the encoders no more: they are released (validation and the final save load them again)."""
    import datasets

    from . import cache

    def encode_batch(batch):
        cells = [data.captions_of(cell, row) for row, cell in enumerate(batch[args.caption_column])]
        flat = [caption for captions, _ in cells for caption in captions]
        ids, mask = tokenize(c, flat)
        pixels = np.stack([data.clip_input(c.image_processor, image.convert("RGB")) for image in batch[args.image_column]])
        text_embeds, hidden, image_embeds = (t.numpy() for t in encode(c, run.precision, ids, pixels))
        lengths = mask.sum(axis=1)
        out = {"image_embeds": list(image_embeds), "caption_is_list": [], "text_embeds": [], "text_hidden": [],
               "text_length": []}
        start = 0
        for captions, is_list in cells:
            rows = range(start, start + len(captions))
            start += len(captions)
            out["caption_is_list"].append(is_list)
            out["text_embeds"].append(text_embeds[rows.start:rows.stop].reshape(-1))
            out["text_hidden"].append(np.concatenate([hidden[i, :lengths[i]].reshape(-1) for i in rows]))
            out["text_length"].append(lengths[rows.start:rows.stop].astype("int32"))
        return out

    floats = datasets.Sequence(datasets.Value("float32"))
    features = datasets.Features({"image_embeds": floats, "caption_is_list": datasets.Value("bool"),
                                  "text_embeds": floats, "text_hidden": floats,
                                  "text_length": datasets.Sequence(datasets.Value("int32"))})
    key = ["prior", args.image_column, args.caption_column, cache.model_fingerprint(c.image_encoder),
           cache.model_fingerprint(c.text_encoder), c.image_processor.to_dict(),
           cache.fingerprint(sorted(c.tokenizer.get_vocab().items()), c.tokenizer.model_max_length),
           run.precision.dtype, paddle.get_device().split(":")[0]]
    encoded = cache.encode_dataset(ds, encode_batch, features, key, args.train_batch_size, run.ctx, run.log, run.clock)
    models.release(c, *ENCODERS)
    return encoded


def sample_maker(args, c):
    """make_sample(example, rng, row) for loader.TrainSet: a caption pick, the encoders' inputs (or their cached
    outputs), noise, timestep. Both paths draw the same random numbers in the same order."""
    embed_dim = c.prior.config.embedding_dim
    num_timesteps = c.noise_scheduler.config.num_train_timesteps
    max_length = c.tokenizer.model_max_length

    def make_sample(example, rng, row):
        if "text_hidden" in example:  # cached
            lengths = example["text_length"]
            k = data.caption_index(len(lengths), bool(example["caption_is_list"]), rng)
            start = int(lengths[:k].sum()) * embed_dim
            hidden = np.zeros((max_length, embed_dim), dtype="float32")
            hidden[:lengths[k]] = example["text_hidden"][start:start + lengths[k] * embed_dim].reshape(-1, embed_dim)
            inputs = {"text_embeds": example["text_embeds"][k * embed_dim:(k + 1) * embed_dim], "text_hidden": hidden,
                      "text_mask": np.arange(max_length) < lengths[k], "image_embeds": example["image_embeds"]}
        else:
            ids, mask = tokenize(c, data.pick_caption(example[args.caption_column], rng, row))
            inputs = {"text_input_ids": ids, "text_mask": mask,
                      "clip_pixel_values": data.clip_input(c.image_processor, example[args.image_column].convert("RGB"))}
        return {**inputs, "noise": rng.standard_normal(embed_dim, dtype="float32"), "timestep": rng.integers(num_timesteps)}

    return make_sample


def batch_inputs(c, precision):
    """prepare(batch) for the loader: what the prior's step needs before the prior runs (the frozen encoders'
    outputs, unless cached; the normalised, noised image embedding and the loss target), computed ahead of the step
    (prefetch.py)."""

    def prepare(batch):
        if "image_embeds" in batch:
            text_embeds, text_hidden, image_embeds = batch["text_embeds"], batch["text_hidden"], batch["image_embeds"]
        else:
            text_embeds, text_hidden, image_embeds = encode(c, precision, batch["text_input_ids"],
                                                            batch["clip_pixel_values"])
        image_embeds = (image_embeds - c.clip_mean) / c.clip_std
        noise, timesteps = batch["noise"], batch["timestep"]
        return {"noisy_embeds": c.noise_scheduler.add_noise(image_embeds, noise, timesteps), "timesteps": timesteps,
                "target": diffusion.diffusion_target(c.noise_scheduler, image_embeds, noise, timesteps),
                "text_embeds": text_embeds, "text_hidden": text_hidden, "text_mask": batch["text_mask"]}

    return prepare


def loss(c, model, batch, snr_gamma, precision):
    """The training loss of `model` (the prior, possibly wrapped) on one prepared micro-batch (batch_inputs)."""
    with precision.autocast():
        pred = model(batch["noisy_embeds"], timestep=batch["timesteps"], proj_embedding=batch["text_embeds"],
                     encoder_hidden_states=batch["text_hidden"], attention_mask=batch["text_mask"]
                     ).predicted_image_embedding
    return diffusion.diffusion_loss(pred, batch["target"], batch["timesteps"], c.noise_scheduler, snr_gamma)


def prior_pipeline(c):
    from ppdiffusers import KandinskyV22PriorPipeline

    return KandinskyV22PriorPipeline(prior=c.prior, image_encoder=c.image_encoder, text_encoder=c.text_encoder,
                                     tokenizer=c.tokenizer, scheduler=c.inference_scheduler,
                                     image_processor=c.image_processor)


def save_pipeline(args, c, folder):
    """The full prior script's output: a KandinskyV22PriorPipeline folder, the trained prior with the prior repo's
    other components (linked, see output.py)."""
    from . import output

    repo = args.pretrained_prior_model_name_or_path
    return output.save_pipeline(folder, "KandinskyV22PriorPipeline", output.PRIOR_COMPONENTS, {"prior": c.prior},
                                {name: (repo, name, PRIOR_FLAG) for name in output.PRIOR_COMPONENTS if name != "prior"},
                                args.cache_dir)


@contextlib.contextmanager
def combined_pipeline(args, c):
    """A KandinskyV22CombinedPipeline around the live prior, with the models it needs beyond training's loaded for
    it and released after (the decoder's always; the encoders with --cache_encoder_outputs, which trains without
    them), as the references free their validation pipeline."""
    from ppdiffusers import KandinskyV22CombinedPipeline

    with models.loaded(c, ENCODERS, keep=not args.cache_encoder_outputs), models.loaded(c, DECODER_PARTS, keep=False):
        yield KandinskyV22CombinedPipeline(unet=c.decoder_unet, movq=c.decoder_movq, scheduler=c.decoder_scheduler,
                                           **{"prior_" + k: v for k, v in prior_pipeline(c).components.items()})
