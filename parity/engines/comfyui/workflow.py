"""A user's ComfyUI graph as the reference recipe (`--parity-workflow GRAPH.json`).

The graph (API format, or the UI format ComfyUI saves: converted here) is read along its sampler's path: the
model chain (UNETLoader, LoRA loaders, a shift node, CFGNorm), the conditioning chain (the text-encode nodes, the
reference method), the image chain (LoadImage, a scaling node) and the latent (an empty latent, or VAEEncode of
the first control image). Every node on that path that changes pixels becomes a recipe field; what belongs to a
preview (prompt, seed, control images, the LoRA of its step, size) comes from the training config. A node on the
path this reader does not know is an error naming its id and class: nothing is guessed.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from ...forms import (CROP_KONTEXT, CROP_NONE, CROP_TOTAL_PIXELS, LORA_MERGED_FP8, LORA_MERGED_FP32,
                      LORA_NONE)
from ...recipe import Recipe
from .sampling import flux_mu, flux_text, schedule_text

# Widget order of the UI format (a node's `widgets_values`), per class; "control_after_generate" and "upload"
# are UI-only values that come after the widget they belong to.
WIDGETS = {
    "UNETLoader": ("unet_name", "weight_dtype"),
    "CLIPLoader": ("clip_name", "type", "device"),
    "VAELoader": ("vae_name",),
    "LoraLoaderModelOnly": ("lora_name", "strength_model"),
    "LoraLoader": ("lora_name", "strength_model", "strength_clip"),
    "ModelSamplingAuraFlow": ("shift",),
    "ModelSamplingSD3": ("shift",),
    "ModelSamplingFlux": ("max_shift", "base_shift", "width", "height"),
    "CFGNorm": ("strength",),
    "KSampler": ("seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"),
    "EmptySD3LatentImage": ("width", "height", "batch_size"),
    "EmptyLatentImage": ("width", "height", "batch_size"),
    "TextEncodeQwenImageEditPlus": ("prompt",),
    "TextEncodeQwenImageEdit": ("prompt",),
    "CLIPTextEncode": ("text",),
    "LoadImage": ("image", "upload"),
    "FluxKontextImageScale": (),
    "ImageScaleToTotalPixels": ("upscale_method", "megapixels", "resolution_steps"),
    "FluxKontextMultiReferenceLatentMethod": ("reference_latents_method",),
    "ConditioningZeroOut": (),
    "VAEEncode": (),
    "VAEDecode": (),
    "SaveImage": ("filename_prefix",),
    "PreviewImage": (),
    "SamplerCustomAdvanced": (),
    "RandomNoise": ("noise_seed", "control_after_generate"),
    "CFGGuider": ("cfg",),
    "BasicGuider": (),
    "KSamplerSelect": ("sampler_name",),
    "BasicScheduler": ("scheduler", "steps", "denoise"),
}
UI_ONLY = {"control_after_generate", "upload"}
NOT_NODES = {"Note", "MarkdownNote"}  # UI annotations
SAMPLERS = ("KSampler", "SamplerCustomAdvanced")
# weight_dtype of UNETLoader -> the recipe's transformer precision (ComfyUI computes on the stored fp8 weights)
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": "fp8_e4m3fn", "fp8_e4m3fn_fast": "fp8_e4m3fn"}


class WorkflowError(ValueError):
    """The graph cannot be read as a reference: the message names the file, the node and what to do."""


@dataclass
class Graph:
    """What the sampler's path of a graph sets, in ComfyUI's terms."""

    path: Path
    unet: str = ""
    weight_dtype: str = "default"
    clip: str = ""
    loras: list[tuple[str, str, float]] = field(default_factory=list)  # (node id, lora_name, strength)
    sampling: tuple = ()  # ("aura", shift) | ("flux", max_shift, base_shift, width, height)
    cfg_norm: float | None = None
    sampler: str = "euler"
    scheduler: str = "simple"
    steps: int = 0
    cfg: float = 1.0
    denoise: float = 1.0
    encode: str = "CLIPTextEncode"
    image_scale: str = CROP_NONE
    reference_method: str | None = None
    latent: tuple = ()  # ("empty", width, height) | ("image",): the scaled first control image's size
    nodes: dict[str, str] = field(default_factory=dict)  # node id -> class, every node read on the path


def load(path: str | Path) -> dict:
    """The graph in API form (`{id: {"class_type", "inputs"}}`), from either format. WorkflowError: not JSON,
    or neither format."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WorkflowError(f"{path}: cannot be read as a ComfyUI workflow ({exc.__class__.__name__}: {exc}); "
                            f"export it from ComfyUI with Save (UI format) or Export (API)") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return from_ui(data, path)
    if isinstance(data, dict) and data and all(isinstance(n, dict) and "class_type" in n for n in data.values()):
        return data
    raise WorkflowError(f"{path}: neither a ComfyUI API graph (nodes with class_type) nor a UI workflow (nodes and "
                        f"links)")


def from_ui(ui: dict, path: Path) -> dict:
    """The API form of a UI workflow: active nodes with their widget values named, links as [node, slot];
    bypassed nodes (mode 4) pass their first input of the output's type through; muted ones (mode 2) drop out."""
    if ui.get("definitions", {}).get("subgraphs"):
        raise WorkflowError(f"{path}: the workflow holds subgraphs, which this reader does not unpack; in ComfyUI "
                            f"select the subgraph node and Unpack Subgraph, save, and give that file")
    links = {link[0]: link for link in ui.get("links", [])}  # id -> [id, from node, from slot, to node, to slot, type]
    nodes = {str(n["id"]): n for n in ui["nodes"] if n.get("type") not in NOT_NODES}

    def source(link_id):
        """[node id, slot] feeding this link, through Reroute and bypassed nodes."""
        _, node_id, slot, *_rest = links[link_id]
        node = nodes.get(str(node_id))
        if node is None:
            return None
        if node["type"] == "Reroute" or node.get("mode") == 4:
            kind = links[link_id][5]
            upstream = [i for i in node.get("inputs", []) if i.get("link") is not None and
                        (node["type"] == "Reroute" or i.get("type") == kind)]
            return source(upstream[0]["link"]) if upstream else None
        return [str(node_id), slot]

    graph = {}
    for node_id, node in nodes.items():
        if node["type"] == "Reroute" or node.get("mode") in (2, 4):
            continue
        inputs = {}
        widgets = [i["widget"]["name"] for i in node.get("inputs", []) if i.get("widget")]
        names = list(WIDGETS.get(node["type"], widgets))
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            inputs.update(node["widgets_values"])
        else:
            for name, value in zip(names, values):
                if name not in UI_ONLY:
                    inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                linked = source(slot["link"])
                if linked is not None:
                    inputs[slot["name"]] = linked
        graph[node_id] = {"class_type": node["type"], "inputs": inputs}
    return graph


def read(api: dict, path: str | Path) -> Graph:
    """What the graph's sampler path sets. WorkflowError: no sampler, several, or a node this reader does not
    model on the path (named by id and class)."""
    path = Path(path)
    samplers = [i for i, n in api.items() if n["class_type"] in SAMPLERS]
    if len(samplers) != 1:
        known = ", ".join(SAMPLERS)
        raise WorkflowError(f"{path}: {len(samplers)} sampler nodes ({known}) where one is needed")
    graph = Graph(path)
    inputs = api[samplers[0]]["inputs"]
    if api[samplers[0]]["class_type"] == "SamplerCustomAdvanced":
        inputs = _custom_sampler(graph, api, samplers[0], inputs)
    _read_sampler(graph, samplers[0], inputs)
    _walk_model(graph, api, inputs["model"])
    for name in ("positive", "negative"):
        if name in inputs:
            _walk_conditioning(graph, api, inputs[name])
    _walk_latent(graph, api, inputs["latent_image"])
    return graph


def _custom_sampler(graph: Graph, api: dict, node_id: str, inputs: dict) -> dict:
    """SamplerCustomAdvanced's inputs as KSampler's: RandomNoise (the seed comes from the preview), CFGGuider or
    BasicGuider (model, conditioning, cfg; BasicGuider is cfg 1 without a negative), KSamplerSelect, BasicScheduler
    (its model, scheduler, steps, denoise)."""
    parts = {}
    for name in ("noise", "guider", "sampler", "sigmas"):
        part_id, part = _node(graph, api, inputs[name])
        wanted = {"noise": ("RandomNoise",), "guider": ("CFGGuider", "BasicGuider"), "sampler": ("KSamplerSelect",),
                  "sigmas": ("BasicScheduler",)}[name]
        if part["class_type"] not in wanted:
            _unknown(graph, part_id, part, name)
        parts[name] = part["inputs"]
    guider, schedule = parts["guider"], parts["sigmas"]
    if schedule["model"] != guider["model"]:
        raise WorkflowError(f"{graph.path}: BasicScheduler and the guider of SamplerCustomAdvanced {node_id} take "
                            f"different models: the sigmas would not be the sampled model's")
    out = {"model": guider["model"], "latent_image": inputs["latent_image"], "sampler_name":
           parts["sampler"]["sampler_name"], "scheduler": schedule["scheduler"], "steps": schedule["steps"],
           "denoise": schedule["denoise"], "cfg": guider.get("cfg", 1.0)}
    if "conditioning" in guider:
        out["positive"] = guider["conditioning"]
    else:
        out.update(positive=guider["positive"], negative=guider["negative"])
    return out


def _node(graph: Graph, api: dict, link) -> tuple[str, dict]:
    if not isinstance(link, list) or str(link[0]) not in api:
        raise WorkflowError(f"{graph.path}: a sampler input is not linked to a node ({link!r})")
    node_id = str(link[0])
    graph.nodes[node_id] = api[node_id]["class_type"]
    return node_id, api[node_id]


def _unknown(graph: Graph, node_id: str, node: dict, chain: str):
    raise WorkflowError(f"{graph.path}: node {node_id} ({node['class_type']}) on the sampler's {chain} path is "
                        f"not modelled: its effect on the pixels would be a guess; remove or bypass it, or compare "
                        f"without --parity-workflow")


def _read_sampler(graph: Graph, node_id: str, inputs: dict) -> None:
    graph.sampler, graph.scheduler = inputs["sampler_name"], inputs["scheduler"]
    graph.steps, graph.cfg, graph.denoise = int(inputs["steps"]), float(inputs["cfg"]), float(inputs["denoise"])
    if (graph.sampler, graph.scheduler) != ("euler", "simple") or graph.denoise != 1.0:
        raise WorkflowError(f"{graph.path}: KSampler {node_id} runs {graph.sampler}/{graph.scheduler} at denoise "
                            f"{graph.denoise:g}; only euler/simple at denoise 1 is modelled (the Qwen templates' "
                            f"choice): set those, or compare without --parity-workflow")


def _walk_model(graph: Graph, api: dict, link) -> None:
    while True:
        node_id, node = _node(graph, api, link)
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            graph.unet, graph.weight_dtype = inputs["unet_name"], inputs.get("weight_dtype", "default")
            if graph.weight_dtype not in WEIGHT_DTYPES:
                raise WorkflowError(f"{graph.path}: UNETLoader {node_id} weight_dtype {graph.weight_dtype!r} is not "
                                    f"modelled (modelled: {', '.join(WEIGHT_DTYPES)})")
            return
        if kind in ("LoraLoaderModelOnly", "LoraLoader"):
            graph.loras.insert(0, (node_id, inputs["lora_name"], float(inputs["strength_model"])))
        elif kind in ("ModelSamplingAuraFlow", "ModelSamplingSD3"):
            graph.sampling = graph.sampling or ("aura", float(inputs["shift"]))
        elif kind == "ModelSamplingFlux":
            graph.sampling = graph.sampling or ("flux", float(inputs["max_shift"]), float(inputs["base_shift"]),
                                                int(inputs["width"]), int(inputs["height"]))
        elif kind == "CFGNorm":
            graph.cfg_norm = float(inputs["strength"])
            if graph.cfg_norm != 1.0:
                raise WorkflowError(f"{graph.path}: CFGNorm {node_id} at strength {graph.cfg_norm:g}: only strength 1 "
                                    f"(the templates') is modelled")
        else:
            _unknown(graph, node_id, node, "model")
        link = inputs["model"]


def _walk_conditioning(graph: Graph, api: dict, link) -> None:
    while True:
        node_id, node = _node(graph, api, link)
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "FluxKontextMultiReferenceLatentMethod":
            graph.reference_method = inputs["reference_latents_method"]
            link = inputs["conditioning"]
            continue
        if kind in ("TextEncodeQwenImageEditPlus", "TextEncodeQwenImageEdit", "CLIPTextEncode"):
            graph.encode = kind
            _, clip = _node(graph, api, inputs["clip"])
            if clip["class_type"] != "CLIPLoader":
                _unknown(graph, str(inputs["clip"][0]), clip, "text-encoder")
            graph.clip = clip["inputs"]["clip_name"]
            for name in ("image1", "image"):
                if isinstance(inputs.get(name), list):
                    _walk_image(graph, api, inputs[name])
            return
        if kind == "ConditioningZeroOut":
            link = inputs["conditioning"]
            continue
        _unknown(graph, node_id, node, "conditioning")


def _walk_image(graph: Graph, api: dict, link) -> None:
    node_id, node = _node(graph, api, link)
    kind = node["class_type"]
    if kind == "FluxKontextImageScale":
        graph.image_scale = CROP_KONTEXT
    elif kind == "ImageScaleToTotalPixels":
        if node["inputs"].get("upscale_method") != "lanczos" or float(node["inputs"].get("megapixels", 1)) != 1.0:
            raise WorkflowError(f"{graph.path}: ImageScaleToTotalPixels {node_id} other than lanczos to 1 MP is "
                                f"not modelled")
        graph.image_scale = CROP_TOTAL_PIXELS
    elif kind != "LoadImage":
        _unknown(graph, node_id, node, "image")
    if kind != "LoadImage":
        upstream_id, upstream = _node(graph, api, node["inputs"]["image"])
        if upstream["class_type"] != "LoadImage":
            _unknown(graph, upstream_id, upstream, "image")


def _walk_latent(graph: Graph, api: dict, link) -> None:
    node_id, node = _node(graph, api, link)
    kind, inputs = node["class_type"], node["inputs"]
    if kind in ("EmptySD3LatentImage", "EmptyLatentImage"):
        graph.latent = ("empty", int(inputs["width"]), int(inputs["height"]))
    elif kind == "VAEEncode":
        graph.latent = ("image",)  # at denoise 1 only its size counts: the scaled first control image's
    else:
        _unknown(graph, node_id, node, "latent")


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, mtime: float) -> Graph:
    return read(load(path), path)


def read_file(path: str | Path) -> Graph:
    """`read(load(path))`, once per file version."""
    path = Path(path)
    if not path.is_file():
        raise WorkflowError(f"{path}: no such workflow file")
    return _read_cached(str(path), path.stat().st_mtime)


def recipe(graph: Graph, base: Recipe, trained_name: str, resolve_lora) -> Recipe:
    """`base` (the ComfyUI template's recipe for this preview) with what the graph sets. `trained_name`: the
    run's LoRA file stem (a loader whose file starts with it loads the trained LoRA, replaced by the preview's
    step); `resolve_lora(name)`: the local file of any other LoRA the graph names."""
    trained = [entry for entry in graph.loras if Path(entry[1]).stem.startswith(trained_name)]
    extras = tuple((str(resolve_lora(name)), strength) for entry in graph.loras if entry not in trained
                   for _, name, strength in (entry,))
    lora = base.lora if trained else None  # no loader of the trained LoRA: the graph runs without it
    multiplier = trained[0][2] if trained else base.multiplier  # the graph's strength is what the user runs
    fp8 = WEIGHT_DTYPES[graph.weight_dtype] or ("fp8_e4m3fn" if "fp8_e4m3fn" in graph.unet else None)
    parts = ([f"transformer:{fp8}"] if fp8 else []) + (["text_encoder:fp8_scaled"] if "fp8_scaled" in graph.clip
                                                         else [])
    merged = LORA_MERGED_FP8 if fp8 else LORA_MERGED_FP32
    values = dict(
        steps=graph.steps, guidance=graph.cfg, cfg_norm=graph.cfg_norm is not None,
        sigma_schedule=_schedule(graph), lora=lora, multiplier=multiplier, extra_loras=extras,
        lora_application=merged if (lora or extras) else LORA_NONE, precision=" ".join(parts) or "none")
    if base.control_images_vae and graph.encode == "CLIPTextEncode":
        values.update(control_images_prompt=(), control_images_vae=())  # a text-only graph on an edit model
    elif base.control_images_vae:
        values["control_crop"] = graph.image_scale
    if graph.latent[0] == "empty":
        values.update(width=graph.latent[1] // 16 * 16, height=graph.latent[2] // 16 * 16)
    elif base.control_images_vae:  # VAEEncode of the (scaled) first control image sets the size
        from ...preprocess import image_size
        from .conditioning import scaled_size

        width, height = scaled_size(*image_size(base.control_images_vae[0]), values.get("control_crop", CROP_NONE))
        values.update(width=width // 16 * 16, height=height // 16 * 16)
    if graph.reference_method not in (None, "index", "index_timestep_zero"):
        raise WorkflowError(f"{graph.path}: reference method {graph.reference_method!r} is not modelled (index, "
                            f"index_timestep_zero are)")
    return base.with_fields(**values)


def _schedule(graph: Graph) -> str:
    if not graph.sampling:  # the model's own sampling: ModelSamplingFlux at Qwen's shift 1.15 (as mu)
        return flux_text(1.15)
    if graph.sampling[0] == "aura":
        return schedule_text(graph.sampling[1])
    _, max_shift, base_shift, width, height = graph.sampling
    return flux_text(flux_mu(max_shift, base_shift, width, height))
