"""A running ComfyUI as the reference side (`--parity-comfyui URL`): each preview's ComfyUI recipe written as an
API graph of stock nodes (export.api_graph), its control images uploaded, the graph queued, its SaveImage image
read back (docs/comfyui-live.md).

ComfyUI's HTTP API (server.py at a125cd84): `GET /object_info/<class>` lists the files a loader can load,
`POST /upload/image` (multipart, type input) puts a control image in ComfyUI's input folder, `POST /prompt`
validates a graph and queues it (400 with `error` and `node_errors` when it does not validate), `GET
/history/<prompt_id>` is empty until the graph has run and then holds its outputs and status messages (an
`execution_error` names the node and the exception), `GET /view` serves an output image. Nothing is sent anywhere
but the URL given. Every failure is a ComfyUIError with what ComfyUI said, and it fails that preview only: a
refused connection is retried twice (a second apart), a graph that takes longer than the timeout is taken off
ComfyUI's queue (or interrupted if it is running) and given up.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from PIL import Image

from ..http import HttpClient
from ..server.client import ServerError

POLL_SECONDS = 0.25
# loader class -> (its file input, the folder under ComfyUI's models/ it lists)
LOADERS = {"UNETLoader": ("unet_name", "diffusion_models"), "CLIPLoader": ("clip_name", "text_encoders"),
           "VAELoader": ("vae_name", "vae"), "LoraLoaderModelOnly": ("lora_name", "loras")}


class ComfyUIError(ServerError):
    """ComfyUI refused, failed, or did not answer: the message says which and what it said (a ServerError: the
    runner makes it that preview's error row, as in server mode)."""


@dataclass
class ComfyImage:
    image: Image.Image
    prompt_id: str
    seconds: float
    name: str  # the output file as ComfyUI names it (subfolder/filename, in its output folder)


def _message(response) -> str:
    """ComfyUI's error body ({"error": {type, message, details}, "node_errors": {id: {class_type, errors}}}),
    readable: the graph's error, then each node's."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or f"HTTP {response.status_code}"
    if not isinstance(body, dict):
        return str(body)[:300]
    error = body.get("error")
    parts = []
    if isinstance(error, dict):
        parts.append(": ".join(str(x) for x in (error.get("message"), error.get("details")) if x))
    elif error:
        parts.append(str(error))
    for node_id, node in (body.get("node_errors") or {}).items():
        for e in node.get("errors", []):
            text = ": ".join(str(x) for x in (e.get("message"), e.get("details")) if x)
            parts.append(f"node {node_id} ({node.get('class_type', '?')}): {text}")
    return "; ".join(p for p in parts if p) or json.dumps(body)[:300]


def _execution_error(messages: list) -> str:
    """The `execution_error` (or `execution_interrupted`) of a history entry's status messages, readable."""
    for event, data in messages or []:
        if event == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: {data.get('exception_type', '')}: "
                    f"{str(data.get('exception_message', '')).strip()}")
        if event == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return "no error message"


def _options(spec) -> list[str] | None:
    """The choices of a combo input in object_info: `[[...choices], {...}]` (a125cd84) or `["COMBO", {"options":
    [...]}]` (newer ComfyUI)."""
    if isinstance(spec, list) and spec:
        if isinstance(spec[0], list):
            return [str(x) for x in spec[0]]
        if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
            return [str(x) for x in spec[1].get("options", [])]
    return None


def _base(name: str) -> str:
    return PureWindowsPath(name).name  # splits on / and \ (ComfyUI on Windows lists sub\\name.safetensors)


class Client(HttpClient):
    def __init__(self, url: str, timeout: float = 600.0, transport=None):
        super().__init__(url, timeout, transport, ComfyUIError, "ComfyUI")
        self.client_id = uuid.uuid4().hex
        self._listed: dict[str, list[str]] = {}  # loader class -> the files ComfyUI lists for it (once per run)
        self._uploaded: dict[str, str] = {}  # control image digest -> its name in ComfyUI's input folder

    def _ok(self, response, what: str):
        if response.status_code != 200:
            raise ComfyUIError(f"ComfyUI {self.url}: {what}: HTTP {response.status_code}: {_message(response)}")
        return response

    # -- the files the graph names --------------------------------------------------------------------------

    def listed(self, kind: str) -> list[str]:
        """The files ComfyUI offers for loader `kind` (`GET /object_info/<kind>`)."""
        if kind not in self._listed:
            info = self._ok(self._call("GET", f"/object_info/{kind}"), f"object_info of {kind}").json()
            node = info.get(kind) if isinstance(info, dict) else None
            if not node:
                raise ComfyUIError(f"ComfyUI {self.url} has no {kind} node (it is a stock node: is this ComfyUI?)")
            field = LOADERS[kind][0]
            inputs = {**node.get("input", {}).get("required", {}), **node.get("input", {}).get("optional", {})}
            options = _options(inputs.get(field))
            if options is None:
                raise ComfyUIError(f"ComfyUI {self.url}: {kind}'s object_info lists no {field} choices")
            self._listed[kind] = options
        return self._listed[kind]

    def check_files(self, graph: dict) -> dict:
        """The graph with every loader's file as ComfyUI lists it: the same name, or the one file of that name in
        a subfolder of the model folder; a file ComfyUI does not have is a ComfyUIError naming it and its folder."""
        missing = []
        out = json.loads(json.dumps(graph))
        for node_id, node in out.items():
            kind = node["class_type"]
            if kind not in LOADERS:
                continue
            field, folder = LOADERS[kind]
            name, listed = node["inputs"][field], self.listed(kind)
            if name in listed:
                continue
            same = [x for x in listed if _base(x) == _base(name)]
            if len(same) == 1:
                node["inputs"][field] = same[0]
            else:
                where = f" ({len(same)} files of that name: {', '.join(same)})" if same else ""
                missing.append(f"{name!r} for {kind} (node {node_id}) is not in its models/{folder} folder{where}")
        if missing:
            raise ComfyUIError(f"ComfyUI {self.url} lacks {'; '.join(missing)}: put each file in that folder of "
                               f"ComfyUI (or in a folder its extra_model_paths.yaml gives that kind), or name the "
                               f"files it has with --parity-workflow (a graph whose loaders name them)")
        return out

    def upload(self, path: str | Path) -> str:
        """A control image in ComfyUI's input folder (`POST /upload/image`, overwrite), under a name made from
        its content: the name the graph's LoadImage gets."""
        data = Path(path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        if digest not in self._uploaded:
            name = f"parity_{digest}_{Path(path).name}"
            response = self._ok(self._call("POST", "/upload/image", files={"image": (name, data)},
                                           data={"type": "input", "overwrite": "true"}), f"upload of {path}")
            got = response.json()
            self._uploaded[digest] = f"{got['subfolder']}/{got['name']}" if got.get("subfolder") else got["name"]
        return self._uploaded[digest]

    # -- a graph, queued and waited for ---------------------------------------------------------------------

    def queue(self, graph: dict) -> str:
        response = self._call("POST", "/prompt", json={"prompt": graph, "client_id": self.client_id})
        if response.status_code != 200:
            raise ComfyUIError(f"ComfyUI {self.url} refused the graph (HTTP {response.status_code}): "
                               f"{_message(response)}")
        return response.json()["prompt_id"]

    def wait(self, prompt_id: str, started: float) -> dict:
        """The history entry of `prompt_id` once it has run; a run that failed, or that is not done by the
        timeout (it is then taken off the queue, or interrupted), is a ComfyUIError."""
        while True:
            history = self._ok(self._call("GET", f"/history/{prompt_id}"), f"history of {prompt_id}").json()
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or status.get("completed") is False:
                    raise ComfyUIError(f"ComfyUI {self.url}: graph {prompt_id}: "
                                       f"{_execution_error(status.get('messages'))}")
                return entry
            if time.perf_counter() - started > self.timeout:
                self._call("POST", "/queue", json={"delete": [prompt_id]})
                self._call("POST", "/interrupt", json={"prompt_id": prompt_id})
                raise ComfyUIError(f"ComfyUI {self.url}: graph {prompt_id} not done after {self.timeout:.0f} s "
                                   f"(taken off its queue, or interrupted if it was running)")
            time.sleep(POLL_SECONDS)

    def view(self, image: dict) -> Image.Image:
        params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                  "type": image.get("type", "output")}
        response = self._ok(self._call("GET", "/view", params=params), f"image {image['filename']}")
        with Image.open(io.BytesIO(response.content)) as im:
            return im.convert("RGB")

    def render(self, graph: dict, images: tuple[str, ...] = ()) -> ComfyImage:
        """One graph, run: its loaders' files checked, queued, waited for; the image of its SaveImage node.
        `images`: the control images to upload, in the order of the graph's LoadImage nodes."""
        started = time.perf_counter()
        graph = self.check_files(graph)
        loads = [node for node in graph.values() if node["class_type"] == "LoadImage"]
        for node, path in zip(loads, images):
            node["inputs"]["image"] = self.upload(path)
        save = [node_id for node_id, node in graph.items() if node["class_type"] == "SaveImage"]
        if len(save) != 1:
            raise ComfyUIError(f"the graph has {len(save)} SaveImage nodes (one is needed)")
        prompt_id = self.queue(graph)
        entry = self.wait(prompt_id, started)
        found = ((entry.get("outputs") or {}).get(save[0]) or {}).get("images") or []
        if not found:
            raise ComfyUIError(f"ComfyUI {self.url}: graph {prompt_id} ran, and its SaveImage node {save[0]} holds no "
                               f"image")
        image = self.view(found[0])
        name = f"{found[0]['subfolder']}/{found[0]['filename']}" if found[0].get("subfolder") else found[0]["filename"]
        return ComfyImage(image, prompt_id, time.perf_counter() - started, name)


def names_for(task, workflow: Path | None):
    """The loaders' file names of the task's graph: those of the user's graph (`--parity-workflow`), else the
    names scripts/run-comfyui (and record-comfyui) give the converted model (export.default_names)."""
    from . import export

    images = tuple(task.reference.control_images_vae)
    default = export.default_names(task.model or task.reference.model, images)
    if workflow is None:
        return default
    from . import workflow as graphs

    read = graphs.read_file(workflow)
    vae = [node["inputs"].get("vae_name") for node in graphs.load(workflow).values()
           if node.get("class_type") == "VAELoader"]
    return export.Names(read.unet or default.unet, read.clip or default.clip, vae[0] if vae else default.vae,
                        default.images)


class ComfyUISide:
    """The runner's reference side in ComfyUI mode: each preview's ComfyUI recipe as a graph, run by ComfyUI."""

    def __init__(self, url: str, timeout: float, workflow: Path | None = None):
        self.client = Client(url, timeout)
        self.workflow = workflow

    def graph(self, task) -> dict:
        from . import export

        try:
            names = names_for(task, self.workflow)
            return export.api_graph(task.reference, names, prefix=f"parity_{task.preview.stem}")
        except ValueError as exc:  # a recipe no stock node sets (e.g. a sigma schedule)
            raise ComfyUIError(f"no ComfyUI graph for {task.id}: {exc}") from None

    def image(self, task) -> tuple[Image.Image, dict, dict]:
        """ComfyUI's image of the preview's graph, the row fields that say which run it was, and the graph."""
        graph = self.graph(task)
        got = self.client.render(graph, tuple(task.reference.control_images_vae))
        return got.image, {"comfyui_prompt_id": got.prompt_id, "comfyui_seconds": round(got.seconds, 3),
                           "comfyui_image": got.name}, graph
