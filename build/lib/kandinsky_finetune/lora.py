"""LoRA on a frozen UNet or PriorTransformer with ppdiffusers' own layers, saved in the file that
`model.load_attn_procs(folder)` reads.

Every `Attention` layer gets a `LoRALinearLayer` on its query, key, value and output projections, and
on the added key/value projections where it has them (the decoder's image-conditioned attention).
Sizes come from each projection's weight. Why not a peft library: ppdiffusers' and paddlenlp's peft ports
both fail on this stack without monkey-patches (ParameterDict.keys / a config attribute), and
`load_attn_procs` does not read their key format, so users could not load the result as documented.
"""
import os

import paddle

WEIGHTS_NAME = "paddle_lora_weights.safetensors"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")


def _projections(attention):
    for name in PROJECTIONS:
        layer = attention
        for part in name.split("."):
            layer = getattr(layer, part, None) if not part.isdigit() else layer[int(part)]
            if layer is None:
                break
        if layer is not None:
            yield name, layer


def add_lora(model, rank):
    """Freeze `model` and give each attention projection a trainable LoRA layer; return the LoRA parameters."""
    from ppdiffusers.models.attention_processor import Attention
    from ppdiffusers.models.lora import LoRACompatibleLinear, LoRALinearLayer

    for p in model.parameters():
        p.stop_gradient = True
    count = 0
    for _, module in model.named_sublayers():
        if isinstance(module, Attention):
            for name, linear in _projections(module):
                if not isinstance(linear, LoRACompatibleLinear):
                    raise TypeError(f"{name} of {type(module).__name__} is not LoRA-compatible ({type(linear).__name__});"
                                    " is USE_PEFT_BACKEND set?")
                in_features, out_features = linear.weight.shape  # paddle keeps Linear weights as [in, out]
                linear.set_lora_layer(LoRALinearLayer(in_features, out_features, rank=rank))
                count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} has no attention layers to put LoRA on")
    return lora_parameters(model)


def lora_parameters(model):
    return [p for name, p in model.named_parameters() if ".lora_layer." in name]


def state_dict(model):
    """{"<projection path>.lora.down.weight": tensor, ...}: the key format load_attn_procs reads."""
    return {name.replace(".lora_layer.", ".lora."): p for name, p in model.named_parameters()
            if ".lora_layer." in name}


def save(model, folder):
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().cast("float32").numpy() for k, v in state_dict(model).items()}
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pd"})


def load_into(model, folder):
    """Copy saved LoRA weights into the model's existing LoRA layers (resume keeps the optimizer's parameters)."""
    from safetensors.numpy import load_file

    saved = load_file(os.path.join(folder, WEIGHTS_NAME))
    live = state_dict(model)
    if saved.keys() != live.keys():
        raise ValueError(f"LoRA weights in {folder} do not match this model "
                         f"({len(saved)} saved tensors, {len(live)} expected; another --lora_rank or model?)")
    for key, param in live.items():
        if tuple(saved[key].shape) != tuple(param.shape):
            raise ValueError(f"{key}: saved shape {saved[key].shape} != {param.shape} (another --lora_rank?)")
        param.set_value(paddle.to_tensor(saved[key], dtype=param.dtype))


def file_size(folder):
    return os.path.getsize(os.path.join(folder, WEIGHTS_NAME))


def checkpoint_weights(model):
    """(save, load) for checkpoint.Checkpointer: a checkpoint holds the LoRA file, loadable like output_dir."""
    return (lambda folder: save(model, folder)), (lambda folder: load_into(model, folder))
