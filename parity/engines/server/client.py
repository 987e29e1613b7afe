"""A running reference server (runcomfy-com/ai-toolkit-inference) as the reference side: submit each preview's
request (requests.py), poll until it is done, read the image it wrote (notes: shared/research/runcomfy-server.md).

The server answers `POST /v1/inference` at once with a request id and renders in the background; its status and
result come from `GET /v1/requests/{id}/status|result`, and the result names a JPEG (quality 95) on the server's
own disk, so the harness must share that disk (run beside it, or mount its OUTPUT_BASE_PATH). Nothing is sent
anywhere but the URL given. Every failure is a ServerError with the server's message, and it fails that preview
only: a refused connection is retried twice (a second apart), a render that takes longer than the timeout is
given up (the server has no cancel endpoint: its id is named so that a person can find it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..http import HttpClient

POLL_SECONDS = 0.5


class ServerError(Exception):
    """The server refused, failed, or did not answer: the message says which and what it said."""


@dataclass
class ServerImage:
    image: Image.Image
    request_id: str
    seconds: float
    path: str


def _message(response) -> str:
    """The server's error body ({"detail": {"error": {code, message}}}, or pydantic's 422 list), readable."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, dict) and isinstance(detail.get("error"), dict):
        error = detail["error"]
        return f"{error.get('code', '')}: {error.get('message', '')}".strip(": ")
    if isinstance(detail, list):  # request validation
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg', '')}" for d in detail)
    return str(detail)[:300]


class Client(HttpClient):
    def __init__(self, url: str, timeout: float = 600.0, transport=None):
        super().__init__(url, timeout, transport, ServerError, "server")

    def render(self, body: dict) -> ServerImage:
        """Submit one request (one prompt), wait for its image."""
        start = time.perf_counter()
        response = self._call("POST", "/v1/inference", json=body)
        if response.status_code != 200:
            raise ServerError(f"server {self.url} refused the request (HTTP {response.status_code}): "
                              f"{_message(response)}")
        request_id = response.json()["request_id"]
        deadline = start + self.timeout
        while True:
            status = self._call("GET", f"/v1/requests/{request_id}/status")
            if status.status_code != 200:
                raise ServerError(f"server {self.url}: status of request {request_id}: HTTP {status.status_code}: "
                                  f"{_message(status)}")
            state = status.json()
            if state.get("status") == "succeeded":
                break
            if state.get("status") in ("failed", "canceled"):
                raise ServerError(f"server {self.url}: request {request_id} {state['status']}: "
                                  f"{state.get('error') or 'no message'}")
            if time.perf_counter() > deadline:
                raise ServerError(f"server {self.url}: request {request_id} not done after {self.timeout:.0f} s "
                                  f"(status {state.get('status')}; the server has no cancel endpoint, it may still "
                                  f"render it)")
            time.sleep(POLL_SECONDS)
        result = self._call("GET", f"/v1/requests/{request_id}/result")
        if result.status_code != 200:
            raise ServerError(f"server {self.url}: result of request {request_id}: HTTP {result.status_code}: "
                              f"{_message(result)}")
        images = ((result.json().get("outputs") or {}).get("images")) or []
        if not images:
            raise ServerError(f"server {self.url}: request {request_id} succeeded with no image")
        path = images[0]["file_path"]
        if not Path(path).is_file():
            raise ServerError(f"server {self.url} wrote its image to {path}, which is not on this machine's disk "
                              f"(run the harness beside the server, or mount its OUTPUT_BASE_PATH at the same path)")
        with Image.open(path) as im:
            image = im.convert("RGB")
        return ServerImage(image, request_id, time.perf_counter() - start, path)


class ServerSide:
    """The runner's reference side in server mode: each preview's request sent to the server, the task's reference
    recipe replaced by what the server renders for it (so findings and attribution speak of that request)."""

    def __init__(self, url: str, timeout: float):
        self.client = Client(url, timeout)
        self.lines: dict[str, dict] = {}  # task id -> its `parity requests` line, made once in `task`

    def task(self, task):
        """The task with the server's recipe as its reference (unchanged when it has no recipes)."""
        import dataclasses

        from .requests import prepare

        if task.training is None or task.reference is None:
            return task
        line, recipe = prepare(task)
        self.lines[task.id] = line
        return dataclasses.replace(task, reference=recipe, notes=[*task.notes, *line["notes"]])

    def image(self, task) -> tuple[Image.Image, dict]:
        """The server's image of the preview's request, and the row fields that say which request it was."""
        line = self.lines.pop(task.id)
        if not line["request"]["loras"]:
            raise ServerError(f"{self.client.url}: no request sent for {task.id}: {line['notes'][0]}")
        got = self.client.render(line["request"])
        return got.image, {"server_request_id": got.request_id, "server_seconds": round(got.seconds, 3),
                           "server_image": got.path}
