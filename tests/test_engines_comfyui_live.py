"""--parity-comfyui: a running ComfyUI as the reference side (parity/engines/comfyui/live.py, parity/comfyui_mode.py).

The client against answers written here (ComfyUI's validation and execution errors, a run that takes too long, a
ComfyUI that is down, one that lacks a model file), and the real thing: the pinned ComfyUI (scripts/get-comfyui)
started by scripts/run-comfyui offline on the CPU on the demo model, on a loopback port, running the bundled 2512
case's two previews (256x192) while the harness renders the same recipe here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import CASES, ROOT
from parity import options as opts
from parity.engines.comfyui.live import Client, ComfyUIError
from parity.plan import plan
from parity.runner import Options, run

pytestmark = pytest.mark.filterwarnings("ignore")
CASE = CASES / "workspace" / "aitk" / "output" / "demo_qwen_image_2512_lora"
RECORDED = CASES / "workspace" / "comfyui" / "demo_qwen_image_2512_lora"
COMFYUI = Path(os.environ.get("PARITY_COMFYUI_TREE", ROOT / ".comfyui" / "ComfyUI"))
PYTHON = Path(os.environ.get("PARITY_COMFYUI_PYTHON", ROOT / ".venv-comfyui" / "bin" / "python"))
UNET = "demo-qwen-image-2512.safetensors"  # the converted demo model's file (scripts/run-comfyui, export.default_names)
LORA = "demo_qwen_image_2512_lora.safetensors"


@pytest.fixture(scope="module")
def tasks():
    """The 2512 case's two previews, planned once with the ComfyUI reference (what --parity-comfyui plans)."""
    options = opts.build({"device": "cpu", "dtype": "float32", "comfyui": "http://127.0.0.1:1"}, ROOT, cases=(CASE,))
    found = plan(options)
    assert len(found) == 2 and all(t.error is None for t in found), [t.error for t in found]
    return found


def live_options(tmp_path, url: str, **kw) -> Options:
    return Options(cases=(CASE,), report_dir=tmp_path / "rep", cache_dir=tmp_path / "cache", dtype="float32",
                   metrics=(), reference="comfyui", comfyui=url, training="failed", explain="none", **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- without ComfyUI ---------------------------------------------------------------------------------------------

def test_the_option_implies_the_comfyui_reference_and_excludes_the_server(tmp_path):
    built = opts.build({"comfyui": "http://127.0.0.1:8188", "comfyui_local": True}, tmp_path)
    assert (built.reference, built.comfyui, built.comfyui_local, built.comfyui_timeout) == \
        ("comfyui", "http://127.0.0.1:8188", True, 600.0)
    with pytest.raises(opts.OptionError, match="--parity-comfyui: the reference comes from ComfyUI.*--parity-server"):
        opts.build({"comfyui": "http://127.0.0.1:8188", "server": "http://127.0.0.1:8000"}, tmp_path)
    with pytest.raises(opts.OptionError, match="--comfyui: '127.0.0.1:8188' is not an http"):
        opts.build({"comfyui": "127.0.0.1:8188"}, tmp_path, flag=lambda s: s.cli_flag)


def answering(*responses, seen: list | None = None):
    """A transport that answers each request with the next (status, json) pair."""
    queue = list(responses)

    def handler(request):
        if seen is not None:
            seen.append(f"{request.method} {request.url.path}")
        status, body = queue.pop(0)
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler)


GRAPH = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}}}
LISTED = (200, {"UNETLoader": {"input": {"required": {"unet_name": [[UNET]], "weight_dtype": [["default"]]}}}})


def test_comfyuis_validation_error_names_the_node_and_what_it_said():
    refused = (400, {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed "
                               "validation", "details": "", "extra_info": {}},
                     "node_errors": {"9": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                                       "details": "sampler_name: 'x' not in ['euler']"}],
                                           "class_type": "KSampler"}}})
    client = Client("http://comfy", transport=answering(LISTED, refused))
    with pytest.raises(ComfyUIError, match=r"refused the graph \(HTTP 400\): Prompt outputs failed validation; "
                                           r"node 9 \(KSampler\): Value not in list: sampler_name: 'x' not in"):
        client.render(GRAPH)


def test_an_execution_error_and_a_slow_run_are_errors_that_name_the_graph():
    queued = (200, {"prompt_id": "p1", "number": 0, "node_errors": {}})
    failed = (200, {"p1": {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {"prompt_id": "p1"}],
        ["execution_error", {"prompt_id": "p1", "node_id": "1", "node_type": "UNETLoader",
                             "exception_type": "RuntimeError", "exception_message": "out of memory\n"}]]}}})
    client = Client("http://comfy", transport=answering(LISTED, queued, failed))
    with pytest.raises(ComfyUIError, match=r"graph p1: node 1 \(UNETLoader\) failed: RuntimeError: out of memory$"):
        client.render(GRAPH)
    seen: list[str] = []
    slow = Client("http://comfy", timeout=0.0, transport=answering(LISTED, queued, (200, {}), (200, {}), (200, {}),
                                                                   seen=seen))
    with pytest.raises(ComfyUIError, match=r"graph p1 not done after 0 s \(taken off its queue"):
        slow.render(GRAPH)
    assert seen[-2:] == ["POST /queue", "POST /interrupt"]  # given up: its own prompt only, by id
    empty = (200, {"p1": {"outputs": {}, "status": {"status_str": "success", "completed": True, "messages": []}}})
    with pytest.raises(ComfyUIError, match="SaveImage node 2 holds no image"):
        Client("http://comfy", transport=answering(LISTED, queued, empty)).render(GRAPH)


def test_a_comfyui_that_is_down_gives_error_rows_not_a_crashed_run(tasks, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.perf_counter()
    records = run(live_options(tmp_path, url), tasks)
    assert len(records) == 2 and {r["verdict"] for r in records} == {"error"}
    assert all(r["reason"].startswith(f"ComfyUI {url} cannot be reached") for r in records), records[0]["reason"]
    assert time.perf_counter() - start < 2 * 2 + 30  # two retries a second apart per preview, nothing hangs
    assert len(pd.read_csv(tmp_path / "rep" / "parity.csv")) == 2


class StandIn(BaseHTTPRequestHandler):
    """A ComfyUI that answers /object_info only: its models folders hold other files than the graph names."""

    listed = {"UNETLoader": ("unet_name", ["qwen_image_fp8_e4m3fn.safetensors"]),
              "CLIPLoader": ("clip_name", ["demo-qwen-image-2512_text_encoder.safetensors"]),
              "VAELoader": ("vae_name", ["demo-qwen-image-2512_vae.safetensors"]),
              "LoraLoaderModelOnly": ("lora_name", ["lightning/Qwen-Image-Lightning-4steps.safetensors"])}
    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        self.seen.append(f"GET {self.path}")
        kind = self.path.removeprefix("/object_info/")
        if kind in self.listed:
            field, files = self.listed[kind]
            body = json.dumps({kind: {"input": {"required": {field: [files, {}]}}}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def do_POST(self):  # noqa: N802
        self.seen.append(f"POST {self.path}")
        self.send_error(500)

    def log_message(self, *args):
        pass


def test_a_model_file_comfyui_lacks_is_named_with_its_folder(tasks, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        records = run(live_options(tmp_path, url), tasks)
    finally:
        server.shutdown()
    assert [r["verdict"] for r in records] == ["error", "error"]
    step0, step2 = (r["reason"] for r in records)
    assert step0.startswith(f"ComfyUI {url} lacks '{UNET}' for UNETLoader (node 1) is not in its "
                            f"models/diffusion_models folder: put each file in that folder"), step0
    assert LORA not in step0  # step 0 runs without a LoRA
    assert f"'{LORA}' for LoraLoaderModelOnly (node 4) is not in its models/loras folder" in step2, step2
    assert not [s for s in StandIn.seen if s.startswith("POST")]  # nothing uploaded or queued


# -- the real ComfyUI --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    """The pinned ComfyUI's server (scripts/run-comfyui) on the demo model, CPU, offline, on a loopback port;
    stopped afterwards."""
    missing = pytest.fail if os.environ.get("PARITY_COMFYUI_REQUIRED") else pytest.skip
    if not (COMFYUI / "main.py").is_file():
        missing(f"no ComfyUI tree at {COMFYUI}: run scripts/get-comfyui (it takes the pinned tarball "
                f"../shared/oracles/comfyui-a125cd84.tar.gz; docs/comfyui-live.md)")
    check = subprocess.run([str(PYTHON), "-c", "import aiohttp, einops, torchsde, sqlalchemy"],
                           capture_output=True) if PYTHON.exists() else None
    if check is None or check.returncode:
        missing(f"ComfyUI's dependencies are not importable by {PYTHON}: run scripts/get-comfyui")
    tmp = tmp_path_factory.mktemp("comfyui")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "comfyui.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    proc = subprocess.Popen([str(PYTHON), str(ROOT / "scripts" / "run-comfyui"), "--port", str(port), "--case",
                             str(CASE), "--comfyui", str(COMFYUI), "--work", str(tmp / "models"), "--scratch",
                             str(tmp / "scratch")], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while f"ComfyUI ready: {url}" not in (tmp / "comfyui.log").read_text():
            assert proc.poll() is None, (tmp / "comfyui.log").read_text()[-3000:]
            if time.monotonic() - started > 240:
                pytest.fail("ComfyUI did not start in 240 s:\n" + (tmp / "comfyui.log").read_text()[-3000:])
            time.sleep(0.5)
        print(f"ComfyUI started in {time.monotonic() - started:.1f} s")
        yield url
    finally:
        proc.terminate()  # run-comfyui turns SIGTERM into main.py's Ctrl-C
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def test_comfyui_renders_each_preview_and_the_harness_models_it_within_a_level(comfyui, tasks, tmp_path):
    """Both previews of the 2512 case queued on ComfyUI: the rows carry ComfyUI's image (the report's reference
    image is the one ComfyUI serves, and it is the recorded ComfyUI render of the preview within a level), and the
    harness' own render of the same recipe is within a level of it (tests/test_engines_comfyui.py measures the
    recipe against the recordings: max 1)."""
    start = time.perf_counter()
    records = run(live_options(tmp_path, comfyui, comfyui_local=True, report_images="lossless"), tasks)
    assert [r["id"] for r in records] == [t.id for t in tasks]
    client = Client(comfyui)
    for task, r in zip(tasks, records):
        assert r["verdict"] in ("match", "mismatch"), r["reason"]
        assert r["comfyui_prompt_id"] and r["comfyui_seconds"] > 0 and r["comfyui_image"].endswith(".png")
        served = pixels(client.view({"filename": r["comfyui_image"], "subfolder": "", "type": "output"}))
        reported = pixels(Image.open(tmp_path / "rep" / "images" / task.case / f"{task.preview.stem}.reference.png"))
        assert np.array_equal(served, reported), task.id
        recorded = pixels(Image.open(RECORDED / f"{task.preview.stem}.png"))
        assert np.abs(served - recorded).max() <= 1, task.id
        assert r["comfyui_vs_local_max_abs"] <= 1 and r["comfyui_vs_local_mean_abs"] < 0.01, task.id
        graph = json.loads(Path(r["comfyui_graph"]).read_text())
        loras = [n["inputs"]["lora_name"] for n in graph.values() if n["class_type"] == "LoraLoaderModelOnly"]
        assert loras == ([LORA] if task.step else []), task.id
    client.close()
    print(f"live run: {time.perf_counter() - start:.1f} s; ComfyUI "
          f"{', '.join(str(r['comfyui_seconds']) for r in records)} s")


def test_the_real_comfyui_names_a_missing_file_and_refuses_a_bad_value(comfyui, tasks):
    from parity.engines.comfyui.live import ComfyUISide

    graph = ComfyUISide(comfyui, 60).graph(tasks[1])
    client = Client(comfyui)
    try:
        bad = json.loads(json.dumps(graph))
        vae = next(n for n in bad.values() if n["class_type"] == "VAELoader")
        vae["inputs"]["vae_name"] = "missing_vae.safetensors"
        with pytest.raises(ComfyUIError, match=r"lacks 'missing_vae.safetensors' for VAELoader \(node 3\) is not in "
                                               r"its models/vae folder"):
            client.render(bad)
        bad = json.loads(json.dumps(graph))
        next(n for n in bad.values() if n["class_type"] == "KSampler")["inputs"]["sampler_name"] = "nope"
        with pytest.raises(ComfyUIError, match=r"refused the graph \(HTTP 400\): .*\(KSampler\): Value not in list: "
                                               r"sampler_name: 'nope' not in"):
            client.queue(bad)
    finally:
        client.close()
