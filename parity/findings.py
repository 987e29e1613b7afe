"""Findings: every recipe field on which the training side and the reference side differ, with its known effect."""

from __future__ import annotations

from dataclasses import dataclass

from .recipe import Recipe, differing_fields

# What a difference in each field is known to do to the image (DESIGN section 4).
EFFECTS = {
    "model": "another checkpoint or pipeline of the Qwen family: a different image altogether",
    "width": "different output size: the whole image changes (Qwen-Image/2512: ai-toolkit floors to 32, the server "
             "to 16, so a request 16 mod 32 renders 16 px wider on the server)",
    "height": "different output size: the whole image changes (Qwen-Image/2512: ai-toolkit floors to 32, the "
              "server to 16)",
    "steps": "different sampling schedule: detail and sharpness change",
    "scheduler": "different sigmas/shift: the whole trajectory changes",
    "sigma_schedule": "another sigma schedule: ai-toolkit and Diffusers shift dynamically from the image size (mu "
                      "from the latent tokens, shift_terminal 0.02), ComfyUI's ModelSamplingAuraFlow by a static "
                      "shift (3.1 in the Qwen-Image and 2511 templates, 3 in the 2509 and Edit ones) picked by the simple scheduler: the whole trajectory "
                      "changes (on the demo 2512 case, 4 steps: 1, .744, .426, .02 vs 1, .903, .756, .508)",
    "guidance": "different CFG strength: contrast, saturation and prompt adherence change",
    "cfg_norm": "the CFG result rescaled to the conditional prediction's norm on one side only (stock Diffusers "
                "always, on the velocity per token; ai-toolkit only with do_cfg_norm except on Qwen-Image/2512; "
                "ComfyUI's edit templates by their CFGNorm node, on x0 per latent pixel and only ever down; its "
                "text-to-image templates never): lower contrast/saturation at guidance > 1",
    "cfg_form": "CFG combined on another prediction: on the velocity (Diffusers, ai-toolkit) or on the denoised "
                "x0 with an fp32 Euler state (ComfyUI's KSampler); equal in exact arithmetic, so only rounding "
                "differs in fp32 (a level here and there), more in bf16 where Diffusers keeps the latents in bf16",
    "negative_prompt": "different unconditional branch: changes whatever CFG pushes away from",
    "seed": "different initial noise: a different image altogether",
    "noise": "initial noise drawn another way: Diffusers' prepare_latents (a CPU torch.Generator, in the compute "
             "dtype) or ComfyUI's prepare_noise (torch.manual_seed, fp32 on the CPU, [B,16,1,H/8,W/8]); the same "
             "numbers in fp32 for the same seed, rounded differently in bf16",
    "prompt": "different text conditioning (trigger word or [name] replacement)",
    "control_images": "different conditioning images, or the same image given twice in the prompt (which key "
                      "each side reads: ctrl_img first in ai-toolkit, ctrl_img_1 first on the server)",
    "control_prompt_resize": "the prompt encoder sees the control image at another size/orientation, or "
                             "otherwise prepared (ai-toolkit and Diffusers hand the processor 0-1 tensors that it "
                             "rescales by 1/255 again, a near-black image; ComfyUI area-resizes to 384x384 in area "
                             "and normalises once, the image itself): different edit conditioning",
    "control_crop": "a scaling node before the edit encode on one side only (ComfyUI's templates: "
                    "FluxKontextImageScale crops image 1 to the nearest of 17 preset aspects, or "
                    "ImageScaleToTotalPixels): a wide or tall control image loses its edges",
    "vision_tokens": "the control image's vision tokens reach the language model in another order or at other "
                     "positions (ComfyUI: the vision transformer's window order, 3-D rotary positions; Diffusers on "
                     "transformers 5: raster order, plain 1-D positions): different edit conditioning",
    "reference_method": "the reference latents at other rotary positions (ComfyUI's `index` centres odd-sided "
                        "grids one row/column further and starts the text after the target alone; Diffusers after "
                        "the largest grid): visible only where a reference grid has an odd side or exceeds the "
                        "target",
    "control_vae_resize": "the conditioning latents come from a differently resized control image (Qwen-Image-Edit:"
                          " bilinear to the request in ai-toolkit, Lanczos on the server; on the demo model 0.09-0.19"
                          " levels mean, up to ~130 at edges)",
    "lora": "different LoRA weights (another step, or none)",
    "multiplier": "different LoRA strength",
    "extra_loras": "other LoRAs applied beside the trained one (a Lightning/distillation LoRA in a ComfyUI graph, "
                   "usually with 4-8 steps at cfg 1): a different model altogether",
    "lora_application": "LoRA added in another precision/way (a bf16 adapter, fused into bf16 weights as the "
                        "server does for 2511 and 2512, an fp32 delta): small numeric drift in bf16, larger on "
                        "strong LoRAs; none in fp32",
    "precision": "the previews ran on quantized base weights (and an accuracy recovery adapter): broad drift",
    "text_encoder_rope": "rotary frequencies of the text encoder rounded to bf16: prompt embeddings drift by "
                         "an ulp here and there, the image by a few levels",
    "vae_tiling": "tiled VAE: seams and per-tile drift up to tens of levels",
    "device": "another device's kernels: numeric drift (large in bf16 on this random tiny model)",
    "dtype": "another compute dtype: numeric drift",
    "pixels": "8-bit conversion of the decoded image: Diffusers rounds, ComfyUI's SaveImage truncates (about half "
              "a level darker on average, 1 level at most)",
    "output_format": "lossy preview file: compression error on top of any real difference",
}


@dataclass(frozen=True)
class Finding:
    field: str
    training: str
    reference: str
    effect: str

    def text(self) -> str:
        return f"{self.field}: training={self.training!r} reference={self.reference!r} ({self.effect})"


def find(training: Recipe, reference: Recipe) -> list[Finding]:
    t_row, r_row = training.as_row(), reference.as_row()
    return [Finding(name, str(t_row[name]), str(r_row[name]), EFFECTS[name])
            for name in differing_fields(training, reference)]
