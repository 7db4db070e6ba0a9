"""Write the tiny model files the real-host tests load with ComfyUI's core loaders.

    python make_models.py COMFYUI_ROOT MODELS_DIR

Run with ComfyUI's Python: a 4x ESRGAN (spandrel), an SD-layout VAE, a cldm ControlNet and a
LoRA for tests/comfyui/vg_testpack/tiny.py's UNet.  Seeded: the same files every time.
"""
import os
import sys


def main(root: str, models: str) -> None:
    sys.path.insert(0, root)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "vg_testpack"))
    import torch
    from safetensors.torch import save_file

    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # model_management probes CUDA at import otherwise
    import tiny

    def save(sub, name, sd):
        os.makedirs(os.path.join(models, sub), exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(models, sub, name))

    from spandrel.architectures.ESRGAN import ESRGAN
    torch.manual_seed(0)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
    save("upscale_models", "vg_test_x4.safetensors", net.state_dict())

    # The SD VAE layout ComfyUI's VAELoader recognises (its encoder width is fixed at 128;
    # the decoder's width is read from the weights, so the decoder is 4x narrower).
    from comfy.ldm.models.autoencoder import AutoencoderKL
    dd = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
              ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    vae = AutoencoderKL(ddconfig=dd, embed_dim=4, decoder_ddconfig=dict(dd, ch=32))
    tiny.init_weights(vae, 5)
    save("vae", "vg_test_vae.safetensors", {k: v.half() for k, v in vae.state_dict().items()})

    save("controlnet", "vg_test_cn.safetensors", tiny.make_controlnet_state_dict())
    model = tiny.make_model()
    save("loras", "vg_test_lora.safetensors", tiny.make_lora_state_dict(model.model.state_dict()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
