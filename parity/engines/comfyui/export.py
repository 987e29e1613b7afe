"""ComfyUI graphs written from a ComfyUI recipe, with nodes that ship with ComfyUI only (`parity workflow`).

`api_graph` writes a recipe as the API form ComfyUI queues (`POST /prompt`), `ui_graph` as the UI form it loads
and saves; `candidates` are the recipes a stock graph can reach from the template's (the shift node, CFGNorm or
none, the Kontext scale or none), among which `parity workflow` keeps the one whose render comes closest to the
preview; `unmatched` says which of the training recipe's values no stock node can set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ... import models
from ...forms import CROP_KONTEXT, CROP_NONE, CROP_TOTAL_PIXELS
from ...recipe import Recipe, differing_fields
from .sampling import flux_text

OUTPUTS = {"UNETLoader": ["MODEL"], "CLIPLoader": ["CLIP"], "VAELoader": ["VAE"], "LoraLoaderModelOnly": ["MODEL"],
           "ModelSamplingAuraFlow": ["MODEL"], "ModelSamplingFlux": ["MODEL"], "CFGNorm": ["MODEL"],
           "TextEncodeQwenImageEditPlus": ["CONDITIONING"], "TextEncodeQwenImageEdit": ["CONDITIONING"],
           "CLIPTextEncode": ["CONDITIONING"], "LoadImage": ["IMAGE", "MASK"], "FluxKontextImageScale": ["IMAGE"],
           "ImageScaleToTotalPixels": ["IMAGE"], "EmptySD3LatentImage": ["LATENT"], "KSampler": ["LATENT"],
           "VAEDecode": ["IMAGE"], "SaveImage": []}
INPUT_TYPES = {"model": "MODEL", "clip": "CLIP", "vae": "VAE", "image": "IMAGE", "image1": "IMAGE",
               "image2": "IMAGE", "image3": "IMAGE", "images": "IMAGE", "positive": "CONDITIONING",
               "negative": "CONDITIONING", "latent_image": "LATENT", "samples": "LATENT"}
UI_EXTRA = {"KSampler": {"control_after_generate": "fixed"}, "LoadImage": {"upload": "image"}}


@dataclass(frozen=True)
class Names:
    """The file names the graph's loaders use (as ComfyUI lists them in its model folders)."""

    unet: str
    clip: str
    vae: str
    images: tuple[str, ...] = ()  # the control images, in the recipe's order (ComfyUI's input folder)


def api_graph(recipe: Recipe, names: Names, prefix: str = "parity") -> dict:
    """The recipe as a ComfyUI API graph of stock nodes (the fields `unmatched` lists are not in it)."""
    template = models.rules(models.by_name(recipe.model)).COMFYUI[models.by_name(recipe.model).id]
    fp8 = "transformer:fp8_e4m3fn" in recipe.precision
    g: dict[str, dict] = {}

    def add(kind: str, **inputs) -> list:
        node_id = str(len(g) + 1)
        g[node_id] = {"class_type": kind, "inputs": inputs}
        return [node_id, 0]

    model = add("UNETLoader", unet_name=names.unet, weight_dtype="fp8_e4m3fn" if fp8 else "default")
    clip = add("CLIPLoader", clip_name=names.clip, type="qwen_image", device="default")
    vae = add("VAELoader", vae_name=names.vae)
    loras = ([(Path(recipe.lora).name, recipe.multiplier)] if recipe.lora else []) + \
        [(Path(path).name, strength) for path, strength in recipe.extra_loras]
    for name, strength in loras:
        model = add("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=float(strength))
    model = _add_sampling(add, recipe, model)
    if recipe.cfg_norm:
        model = add("CFGNorm", model=model, strength=1.0)
    images = _image_inputs(add, recipe, names)
    encode = template.encode if images else "CLIPTextEncode"
    conds = []
    for text in (recipe.prompt, recipe.negative_prompt):
        if encode == "CLIPTextEncode":
            conds.append(add(encode, clip=clip, text=text))
        elif encode == "TextEncodeQwenImageEdit":
            conds.append(add(encode, clip=clip, prompt=text, vae=vae, image=images["image1"]))
        else:
            conds.append(add(encode, clip=clip, prompt=text, vae=vae, **images))
    latent = add("EmptySD3LatentImage", width=recipe.width, height=recipe.height, batch_size=1)
    sampled = add("KSampler", model=model, positive=conds[0], negative=conds[1], latent_image=latent,
                  seed=int(recipe.seed), steps=int(recipe.steps), cfg=float(recipe.guidance), sampler_name="euler",
                  scheduler="simple", denoise=1.0)
    decoded = add("VAEDecode", samples=sampled, vae=vae)
    add("SaveImage", images=decoded, filename_prefix=prefix)
    return g


def _add_sampling(add, recipe: Recipe, model: list) -> list:
    """The shift node that makes `sigma_schedule`: ModelSamplingAuraFlow for a static shift, ModelSamplingFlux
    (base_shift 0.5, max_shift chosen so that the node's mu at the recipe's size is the recipe's) for a flux mu."""
    text = recipe.sigma_schedule
    found = re.fullmatch(r"static shift ([0-9.]+), simple", text)
    if found:
        return add("ModelSamplingAuraFlow", model=model, shift=float(found.group(1)))
    found = re.fullmatch(r"flux shift mu (-?[0-9.e+-]+), simple", text)
    if not found:
        raise ValueError(f"no stock node makes the sigma schedule {text!r}")
    mu, base = float(found.group(1)), 0.5
    tokens = recipe.width * recipe.height / 256
    top = base + (mu - base) * (4096 - 256) / (tokens - 256) if tokens != 256 else mu
    return add("ModelSamplingFlux", model=model, max_shift=round(top, 6), base_shift=base, width=recipe.width,
               height=recipe.height)


def _image_inputs(add, recipe: Recipe, names: Names) -> dict:
    images = {}
    for index, name in enumerate(names.images[:3], start=1):
        image = add("LoadImage", image=name)
        if index == 1 and recipe.control_crop == CROP_KONTEXT:
            image = add("FluxKontextImageScale", image=image)
        elif index == 1 and recipe.control_crop == CROP_TOTAL_PIXELS:
            image = add("ImageScaleToTotalPixels", image=image, upscale_method="lanczos", megapixels=1.0)
        images[f"image{index}"] = image
    return images


def ui_graph(api: dict) -> dict:
    """The API graph in the UI form ComfyUI saves (nodes laid out left to right, links, widget values)."""
    from .workflow import WIDGETS

    nodes, links = [], []
    outgoing: dict[tuple[str, int], list[int]] = {}
    for node_id, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(node_id), name,
                              INPUT_TYPES.get(name, "*")])
                outgoing.setdefault((value[0], value[1]), []).append(len(links))
    for order, (node_id, node) in enumerate(api.items()):
        kind = node["class_type"]
        inputs = [{"name": link[4], "type": link[5], "link": link[0]} for link in links if link[3] == int(node_id)]
        widgets = [UI_EXTRA.get(kind, {}).get(name, node["inputs"].get(name)) for name in WIDGETS[kind]
                   if name in node["inputs"] or name in UI_EXTRA.get(kind, {})]
        nodes.append({
            "id": int(node_id), "type": kind, "pos": [40 + 320 * (order % 6), 40 + 260 * (order // 6)],
            "size": [300, 120], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": out, "type": out, "links": outgoing.get((node_id, slot), []), "slot_index": slot}
                        for slot, out in enumerate(OUTPUTS[kind])],
            "properties": {"Node name for S&R": kind}, "widgets_values": widgets})
    for link in links:
        link[4] = next(i for i, x in enumerate(nodes[[n["id"] for n in nodes].index(link[3])]["inputs"])
                       if x["link"] == link[0])
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def candidates(template: Recipe, training: Recipe) -> list[Recipe]:
    """The recipes stock nodes reach from the template's: its shift or a ModelSamplingFlux at the training
    schedule's mu (ai-toolkit's dynamic shift at this size), CFGNorm on or off, the Kontext scale on or off."""
    schedules = [template.sigma_schedule, flux_text(_aitk_mu(training))]
    crops = [template.control_crop] + ([CROP_NONE] if template.control_crop != CROP_NONE else [])
    return [template.with_fields(sigma_schedule=s, cfg_norm=norm, control_crop=crop)
            for s in schedules for norm in (template.cfg_norm, not template.cfg_norm) for crop in crops]


def _aitk_mu(training: Recipe) -> float:
    """Diffusers' dynamic-shift mu for the training recipe's size (its calculate_shift on the recipe's scheduler)."""
    import json

    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    config = json.loads(training.scheduler)
    tokens = (training.width // 16) * (training.height // 16)
    return calculate_shift(tokens, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                           config["max_shift"])


def unmatched(graph_recipe: Recipe, training: Recipe) -> list[str]:
    """The fields on which the exported graph's recipe still differs from the training recipe: those no stock
    node sets (ComfyUI's own sampler loop, noise, encode details, pixel conversion), and those the graph sets as
    closely as its nodes allow (a sigma schedule without ai-toolkit's shift_terminal)."""
    return list(differing_fields(graph_recipe, training))


@dataclass
class Choice:
    """The stock graph kept for a preview: its recipe, its distance to the preview, the template's."""

    recipe: Recipe
    distance: float
    template_distance: float
    tried: list[tuple[str, float]]  # (what the candidate sets, its distance)


def describe(recipe: Recipe) -> str:
    return f"{recipe.sigma_schedule}; CFGNorm {'on' if recipe.cfg_norm else 'off'}; scale: {recipe.control_crop}"


def choose(template: Recipe, training: Recipe, distance_of) -> Choice:
    """Render every candidate (`distance_of(recipe)`: its render's distance to the preview) and keep the closest;
    the template's own recipe is the first candidate, so the choice is never further than the template."""
    tried = [(candidate, distance_of(candidate)) for candidate in candidates(template, training)]
    best, best_distance = min(tried, key=lambda pair: pair[1])
    return Choice(best, best_distance, tried[0][1], [(describe(r), d) for r, d in tried])


def default_names(model_folder: str, images: tuple[str, ...]) -> Names:
    """The loaders' file names as scripts/record-comfyui writes the model's files for ComfyUI: `<name>.safetensors`,
    `<name>_text_encoder.safetensors`, `<name>_vae.safetensors` after the model's folder (or hub id)."""
    name = Path(model_folder).name
    return Names(f"{name}.safetensors", f"{name}_text_encoder.safetensors", f"{name}_vae.safetensors",
                 tuple(Path(p).name for p in images))


def write(choice: Choice, training: Recipe, names: Names, folder: Path, stem: str) -> dict:
    """`<stem>.api.json`, `<stem>.ui.json` and `<stem>.note.json` (what was chosen, the distances, what stock
    nodes cannot match) in `folder`; returns the note."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    api = api_graph(choice.recipe, names, prefix=stem)
    (folder / f"{stem}.api.json").write_text(json.dumps(api, indent=1))
    (folder / f"{stem}.ui.json").write_text(json.dumps(ui_graph(api), indent=1))
    note = {"chosen": describe(choice.recipe), "distance": choice.distance,
            "template_distance": choice.template_distance,
            "candidates": [{"graph": what, "distance": d} for what, d in choice.tried],
            "not_matched_by_stock_nodes": unmatched(choice.recipe, training),
            "files": {"unet": names.unet, "clip": names.clip, "vae": names.vae, "images": list(names.images),
                      "lora": Path(choice.recipe.lora).name if choice.recipe.lora else None}}
    (folder / f"{stem}.note.json").write_text(json.dumps(note, indent=1))
    return note
