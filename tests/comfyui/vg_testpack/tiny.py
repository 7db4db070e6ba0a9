"""Tiny models made from ComfyUI's own classes, with seeded random but sane weights.

Used by the test-only node pack (this folder, copied into custom_nodes/) for the MODEL and CLIP
that no core loader can build at this size, and by tests/comfyui/make_models.py for the files
that core loaders read (ControlNet, LoRA, VAE, upscale model).  Run inside ComfyUI's Python
with ComfyUI on sys.path.
"""
import functools
import math

import torch

# An SD1-shaped UNet at 1/10 the width: 2 levels, attention and cross-attention on the second.
UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1],
    "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 1, 1], "context_dim": 32,
    "use_spatial_transformer": True, "legacy": False, "use_linear_in_transformer": False,
    "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
}
# CLIP-L's layout (same tokenizer and vocabulary) at hidden size 32, matching context_dim.
CLIP = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": 32, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": 32, "torch_dtype": "float32",
    "vocab_size": 49408,
}


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops skip weight initialisation (weights are loaded over them): fill every
    parameter deterministically, norms at 1, biases at 0, the rest N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim <= 1:
                p.fill_(1.0 if name.endswith("weight") and "norm" in name else 0.0)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def make_model(seed: int = 1):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.SD15(dict(UNET))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "model.diffusion_model.", device=mm.unet_offload_device())
    init_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def make_clip(seed: int = 2):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(
        comfy.sd1_clip.SD1Tokenizer,
        functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=functools.partial(
            comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(CLIP), return_projected_pooled=False)))
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    init_weights(clip.cond_stage_model, seed)
    return clip


def make_controlnet_state_dict(seed: int = 3) -> dict:
    """A cldm ControlNet matching UNET, in the original .pth layout (control_model.*)."""
    import comfy.cldm.cldm
    import comfy.ops

    kw = {k: v for k, v in UNET.items() if k not in ("out_channels",)}
    kw.update(num_heads=8, num_head_channels=-1, hint_channels=3, operations=comfy.ops.disable_weight_init)
    net = comfy.cldm.cldm.ControlNet(**kw)
    init_weights(net, seed)
    return {"control_model." + k: v.contiguous() for k, v in net.state_dict().items()}


def make_lora_state_dict(model_sd: dict, seed: int = 4, rank: int = 4) -> dict:
    """A rank-4 LoRA in the generic key format for every 2-D weight of the UNet's attention."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in model_sd.items():
        if k.startswith("diffusion_model.") and k.endswith(".weight") and w.ndim == 2 and ".attn" in k:
            base = k[:-len(".weight")]
            out[base + ".lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.01
            out[base + ".lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.01
            out[base + ".alpha"] = torch.tensor(float(rank))
    return out
