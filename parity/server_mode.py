"""Server mode (`--parity-server`): each preview's reference image comes from a running reference server
(engines/server/client.py sends the request); with `--parity-server-local` the harness also renders the same
request itself, and the record says how far the two are apart: how closely the harness models the server."""

from __future__ import annotations

from PIL import Image

from . import compare as cmp


class ServerMode:
    """The reference side of a check in server mode."""

    def __init__(self, options, render, images):
        from .engines.server.client import ServerSide

        self.side = ServerSide(options.server, options.server_timeout)
        self.local = options.server_local  # also render the request here and compare
        self.render, self.images = render, images  # Checker.render, report_images.ReportImages

    def task(self, task):
        """The task with the server's recipe as its reference (what the server renders for the request)."""
        return self.side.task(task)

    def reference(self, task, row: dict) -> Image.Image:
        """The server's image of the preview's request; the row gets which request it was (`server_*`)."""
        served, fields = self.side.image(task)
        row.update(fields)
        if self.local:
            self.vs_local(task, served, row)
        return served

    def vs_local(self, task, served: Image.Image, row: dict) -> None:
        """The server's image against the harness' render of the same request, saved as the server saves (JPEG
        q95)."""
        local, seconds = self.render(task.reference, task.model)
        row["render_seconds"] = round(seconds, 3)
        self.images.save(task, "local", local)
        same = cmp.compare(served, cmp.encode_like(local, "jpeg-q95"), ssim=False)
        row["server_vs_local_mean_abs"], row["server_vs_local_max_abs"] = same.mean_abs, same.max_abs
