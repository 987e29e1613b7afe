"""Named values of recipe fields that more than one place needs (recipe.py, models/, engines/, the renderer and
the pipeline): how a LoRA is applied, how sigmas are made, how CFG is combined, how noise is drawn, how pixels
become 8-bit. A small leaf module, so that models/ and recipe.py never import each other.
"""

from __future__ import annotations

LORA_PEFT = "peft-adapter/base-dtype"  # load_lora_weights + adapter weight, math in the base dtype
LORA_RUNTIME_FP32 = "runtime/fp32"  # ai-toolkit LoRA modules added to the layer output at run time
LORA_MERGED_FP32 = "merged/fp32"  # ai-toolkit merges W + m*B@A in fp32, cast back to the base dtype
LORA_FUSED = "fused/base-dtype"  # the server's fuse_lora: W + m*B@A as PEFT's merge computes it, in the base dtype
LORA_NONE = "none"  # no LoRA (step 0: an untrained LoRA has a zero up-matrix)

# How sigmas are made, how CFG is combined, how the initial noise is drawn (issue 46): the Diffusers forms are the
# defaults, so every recipe from before these fields keeps its values, its cache key and its pixels.
SIGMAS_DIFFUSERS = "diffusers flowmatch: linspace(1, 1/N, N) through `scheduler` (dynamic: mu from the latent tokens)"
CFG_V = "v"  # CFG on the velocity (Diffusers); `cfg_norm` says whether it is rescaled to the conditional norm
CFG_X0 = "x0 (ComfyUI)"  # CFG on the denoised prediction x - sigma*v, k-diffusion Euler on an fp32 state
NOISE_DIFFUSERS = "diffusers prepare_latents, torch.Generator(generator_device), in the compute dtype"
PIXELS_ROUND = "round"  # Diffusers' postprocess: (x/2+0.5).clamp(0,1)*255, rounded

# How a control image is scaled before the edit-encode node (ComfyUI's templates; the Diffusers sides: none).
CROP_NONE = "none"
CROP_KONTEXT = "FluxKontextImageScale on image 1 (nearest of 17 preset sizes, centre crop, lanczos)"
CROP_TOTAL_PIXELS = "ImageScaleToTotalPixels on the image (lanczos, 1 MP)"
# How the prompt encoder takes the vision tokens (edit models).
VISION_DIFFUSERS = "raster order, 1-D positions (Diffusers' encode_prompt on transformers 5)"
VISION_COMFY = "window order, 3-D positions (ComfyUI Qwen25_7BVLI)"
# Where the reference latents sit in the transformer's rotary positions.
REFERENCES_DIFFUSERS = "frame index; odd sides from -(n+1)/2; text after the largest grid (Diffusers QwenEmbedRope)"
REFERENCES_COMFY = "index: frame index; sides centred at n//2; text after the target (ComfyUI)"

# ComfyUI's fp8 weight dtypes as `precision` qtypes (parity/fp8.py, issue 46 point 4), and how ComfyUI merges a LoRA
# into an fp8 model: the fp8 weight plus m*B@A in fp32, rounded back to fp8 stochastically (model_patcher, seeded by
# the weight's key).
QTYPE_FP8 = "fp8_e4m3fn"  # transformer: the official *_fp8_e4m3fn files, or UNETLoader weight_dtype fp8_e4m3fn
QTYPE_FP8_SCALED = "fp8_scaled"  # text_encoder: qwen_2.5_vl_7b_fp8_scaled (fp8 weights, per-tensor float32 scale)
PRECISION_COMFY_FP8 = f"transformer:{QTYPE_FP8} text_encoder:{QTYPE_FP8_SCALED}"  # ComfyUI's default Qwen graphs
LORA_MERGED_FP8 = "merged/fp32, stochastic rounding to fp8 (ComfyUI)"
