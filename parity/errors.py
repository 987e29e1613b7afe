"""The one error type a broken case raises: it names the file and the fix."""

from __future__ import annotations

from pathlib import Path


class CaseError(Exception):
    """A problem with one case's inputs. It fails that case (or one preview), never the run."""

    def __init__(self, path: Path | str | None, problem: str, fix: str = ""):
        self.path = str(path) if path is not None else ""
        self.problem = problem
        self.fix = fix
        text = f"{self.path}: {problem}" if self.path else problem
        if fix:
            text += f" -- fix: {fix}"
        super().__init__(text)


class NotRenderable(Exception):
    """A recipe value this machine cannot reproduce (e.g. a quantization type nobody has modelled yet)."""
