"""server: a running reference server as the reference side. The client against answers written here (error
bodies, a server that is down), and the real server (runcomfy-com/ai-toolkit-inference at af4aec1, started offline
on the CPU on the bundled demo checkpoint on a loopback port) replaying a bundled case."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from conftest import CASES, DEMO_MODEL, ROOT
from parity.runner import Options, run
from parity.engines.server.client import Client, ServerError

pytestmark = pytest.mark.filterwarnings("ignore")
V1 = CASES / "workspace" / "aitk" / "output" / "demo_qwen_image_edit_plus_lora_v1"
SOURCE = Path(os.environ.get("PARITY_SERVER_SOURCE", ROOT / ".server" / "ai-toolkit-inference"))
PYTHON = Path(os.environ.get("PARITY_SERVER_PYTHON", ROOT / ".venv-server" / "bin" / "python"))
BUNDLE = "../shared/oracles/ai-toolkit-inference-af4aec18.bundle"  # the server at af4aec1, beside the repo (and in CI)


def answering(*responses):
    """A transport that answers each request with the next (status, json) pair."""
    queue = list(responses)

    def handler(request):
        status, body = queue.pop(0)
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler)


def test_a_refused_request_names_the_servers_code_and_message():
    client = Client("http://server", transport=answering(
        (400, {"detail": {"error": {"code": "LORA_NOT_FOUND", "message": "LoRA file not found: x.safetensors"}}})))
    with pytest.raises(ServerError, match=r"refused the request \(HTTP 400\): LORA_NOT_FOUND: LoRA file not found"):
        client.render({"model": "qwen_image_edit_plus"})


def test_a_failed_render_and_a_slow_one_are_errors_that_name_the_request(tmp_path):
    queued = (200, {"request_id": "r1", "status": "queued"})
    client = Client("http://server", transport=answering(queued, (200, {"status": "failed", "error": "CUDA OOM"})))
    with pytest.raises(ServerError, match="request r1 failed: CUDA OOM"):
        client.render({})
    slow = Client("http://server", timeout=0.0, transport=answering(queued, (200, {"status": "in_progress"})))
    with pytest.raises(ServerError, match=r"request r1 not done after 0 s .*no cancel endpoint"):
        slow.render({})
    gone = Client("http://server", transport=answering(queued, (200, {"status": "succeeded"}), (200, {
        "status": "succeeded", "outputs": {"images": [{"file_path": str(tmp_path / "elsewhere.jpg")}]}})))
    with pytest.raises(ServerError, match="not on this machine's disk"):
        gone.render({})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_down_gives_error_rows_not_a_crashed_run(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.perf_counter()
    from parity.plan import plan

    options = Options(cases=(V1,), report_dir=tmp_path / "rep", cache_dir=tmp_path / "cache", dtype="float32",
                      metrics=(), server=url, training="failed")
    records = run(options, plan(options)[:3])
    assert len(records) == 3 and {r["verdict"] for r in records} == {"error"}
    assert all(r["reason"].startswith(f"server {url} cannot be reached") for r in records)
    assert time.perf_counter() - start < 3 * 2 + 30  # two retries a second apart per preview, nothing hangs
    assert len(pd.read_csv(tmp_path / "rep" / "parity.csv")) == 3


@pytest.fixture(scope="module")
def reference_server(tmp_path_factory):
    """The real server, started offline on the CPU on the bundled demo checkpoint (a Hugging Face cache entry for
    Qwen/Qwen-Image-Edit-2509 that holds it), on a loopback port; stopped afterwards."""
    # CI (.ci/run) sets PARITY_SERVER_REQUIRED when it has set the server up from the bundle: a missing piece fails
    missing = pytest.fail if os.environ.get("PARITY_SERVER_REQUIRED") else pytest.skip
    if not (SOURCE / "src" / "server.py").is_file():
        missing(f"no reference server source at {SOURCE}: run scripts/get-reference-server (it takes the pinned "
                f"bundle {BUNDLE} when it is there, else needs GitHub; README, 'A running reference server')")
    check = subprocess.run([str(PYTHON), "-c", "import fastapi, uvicorn, dependency_injector, pydantic_settings"],
                           capture_output=True) if PYTHON.exists() else None
    if check is None or check.returncode:
        missing(f"the server's dependencies are not importable by {PYTHON}: run scripts/get-reference-server "
                f"(with the bundle {BUNDLE})")
    tmp = tmp_path_factory.mktemp("server")
    revision = "0123456789abcdef0123456789abcdef01234567"
    entry = tmp / "hub" / "models--Qwen--Qwen-Image-Edit-2509"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(revision)  # no newline: the hub reads it unstripped
    shutil.copytree(DEMO_MODEL, entry / "snapshots" / revision)
    port, out = free_port(), tmp / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(DEVICE="cpu", ENABLE_CPU_OFFLOAD="false", OFFLOAD_MODE="none", HF_HUB_OFFLINE="1",
               HF_HUB_CACHE=str(tmp / "hub"), TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ENABLE_HF_TRANSFER="0", WORKFLOWS_BASE_PATH=str(out), OUTPUT_BASE_PATH=str(out),
               LORA_DOWNLOAD_CACHE_DIR=str(out / "lora_cache"), INFERENCE_TIMEOUT="1800", HOST="127.0.0.1",
               PORT=str(port), BASE_URL=f"http://127.0.0.1:{port}", DEBUG="false", AI_TOOLKIT_PATH="/nonexistent",
               OMP_NUM_THREADS="1")
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([str(PYTHON), "-m", "uvicorn", "src.server:app", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1"], cwd=SOURCE, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("the server did not start in 300 s:\n" + (tmp / "server.log").read_text()[-3000:])
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_the_real_server_replays_a_case_and_equals_the_harness_render(reference_server, tmp_path):
    """Two previews of the v1 case (prompt 1, 1024x1024: step 0 with the final LoRA at multiplier 0, step 4 with it
    at 1) sent to the server: its JPEG q95 images equal the harness' fp32 render of the same requests saved the same
    way, the first bit for bit; the second within JPEG q95 rounding (bit for bit too on a 2-core Intel Xeon,
    2026-12-07: the same LoRA file at a new scale; with the previous recording's step-2 preview, after the server
    hot-swapped its LoRA with load_lora_weights(hotswap=True): max 2 levels, mean 0.00025). Prompt 1's previews
    `match` the server's images, so nothing else renders: four renders in all, kept few for CI (prompt 0's are
    `explained` by the accepted cfg_norm, which costs a third render each). The rows and the case page carry the
    request ids."""
    from parity.plan import plan

    options = Options(cases=(V1,), report_dir=tmp_path / "rep", cache_dir=tmp_path / "cache", dtype="float32",
                      metrics=(), server=reference_server, server_local=True, training="failed", explain="none")
    tasks = [t for t in plan(options) if t.id in ("demo_qwen_image_edit_plus_lora_v1/0/1",
                                                   "demo_qwen_image_edit_plus_lora_v1/4/1")]
    records = run(options, tasks)
    assert [r["id"] for r in records] == [t.id for t in tasks] and len(records) == 2
    assert (records[0]["server_vs_local_mean_abs"], records[0]["server_vs_local_max_abs"]) == (0.0, 0)
    assert records[1]["server_vs_local_mean_abs"] < 0.01 and records[1]["server_vs_local_max_abs"] <= 3
    for r in records:
        assert r["server_request_id"] and Path(r["server_image"]).is_file() and r["server_seconds"] > 0
        assert r["verdict"] == "match" and "cfg_norm" in r["findings"]
    page = next((tmp_path / "rep" / "cases").glob("*.html")).read_text()
    assert records[0]["server_request_id"] in page and "server vs local render, mean abs" in page
    assert "step 0: ai-toolkit rendered it without a LoRA" in records[0]["notes"]


def test_the_real_server_refuses_what_its_schema_refuses(reference_server):
    client = Client(reference_server)
    with pytest.raises(ServerError, match=r"HTTP 422.*neg"):  # ai-toolkit's default `neg: false`
        client.render({"model": "qwen_image_edit_plus", "loras": [{"path": "x.safetensors"}],
                       "prompts": [{"prompt": "p", "neg": False}]})
    with pytest.raises(ServerError, match="HTTP 400"):
        client.render({"model": "qwen_image_edit_plus", "loras": [{"path": "/nonexistent.safetensors"}],
                       "prompts": [{"prompt": "p", "ctrl_img_1": "aGVsbG8="}]})
