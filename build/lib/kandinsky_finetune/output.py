"""The pipeline folders the full fine-tuning scripts write: the trained model saved anew, each frozen component
taken from the repo it came from, and the model_index.json that makes the folder load as a pipeline.

A frozen component of a local repo is hard-linked (copied byte for byte where a link cannot be made, e.g. across
file systems): the output costs no disk for it, holds the original files whatever precision training ran in,
and needs no memory to write. A component of a hub repo (not a local folder) is loaded and saved, one at a time.
"""
import gc
import importlib
import json
import os
import shutil

PRIOR_COMPONENTS = {
    "prior": ["ppdiffusers", "PriorTransformer"],
    "image_encoder": ["ppdiffusers.transformers", "CLIPVisionModelWithProjection"],
    "text_encoder": ["ppdiffusers.transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["ppdiffusers.transformers", "CLIPTokenizer"],
    "scheduler": ["ppdiffusers", "UnCLIPScheduler"],
    "image_processor": ["ppdiffusers.transformers", "CLIPImageProcessor"],
}
DECODER_COMPONENTS = {
    "unet": ["ppdiffusers", "UNet2DConditionModel"],
    "scheduler": ["ppdiffusers", "DDPMScheduler"],
    "movq": ["ppdiffusers", "VQModel"],
}
COMBINED_COMPONENTS = {**DECODER_COMPONENTS, **{"prior_" + k: v for k, v in PRIOR_COMPONENTS.items()}}


def write_index(folder, class_name, components):
    import ppdiffusers

    index = {"_class_name": class_name, "_ppdiffusers_version": ppdiffusers.__version__, **components}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


class PipelineWriter:
    """Fills `folder` component by component and counts the bytes written and linked, for the log."""

    def __init__(self, folder):
        self.folder, self.written, self.linked = folder, 0, 0

    def save(self, name, model):
        """A model written anew (the trained one), a tensor at a time."""
        from .models import save_model

        save_model(model, os.path.join(self.folder, name))
        self.written += _size(os.path.join(self.folder, name))

    def take(self, name, repo, subfolder, library_class, flag, cache_dir=None):
        """Component `name` from `repo`/`subfolder`: linked or copied when that is a local folder, otherwise
        loaded (as the [library, class] of its index entry) and saved, then freed."""
        source, target = os.path.join(repo, subfolder), os.path.join(self.folder, name)
        if not os.path.isdir(source):
            from .models import load

            cls = getattr(importlib.import_module(library_class[0]), library_class[1])
            component = load(cls, repo, subfolder, flag, cache_dir)
            component.save_pretrained(target)
            del component
            gc.collect()
            self.written += _size(target)
            return
        for root, _, files in os.walk(source):
            here = os.path.join(target, os.path.relpath(root, source))
            os.makedirs(here, exist_ok=True)
            for name_ in files:
                src, dst = os.path.join(root, name_), os.path.join(here, name_)
                try:
                    os.link(src, dst)
                    self.linked += os.path.getsize(dst)
                except OSError:  # another file system, or links not allowed: the same bytes
                    shutil.copyfile(src, dst)
                    self.written += os.path.getsize(dst)

    def summary(self):
        return f"{_human(self.written)} written, {_human(self.linked)} hard-linked from the source repos"


def _human(size):
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def _size(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def save_pipeline(folder, class_name, components, trained, sources, cache_dir=None):
    """A pipeline folder of `components` (an index such as PRIOR_COMPONENTS): `trained` {name: model} saved anew,
    `sources` {name: (repo, subfolder, flag)} taken from their repos, then model_index.json. Returns what was
    written and linked, for the log."""
    writer = PipelineWriter(folder)
    for name, model in trained.items():
        writer.save(name, model)
    for name, (repo, subfolder, flag) in sources.items():
        writer.take(name, repo, subfolder, components[name], flag, cache_dir)
    write_index(folder, class_name, {name: components[name] for name in [*trained, *sources]})
    return writer.summary()
