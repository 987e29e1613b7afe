"""Find cases (ai-toolkit output folders), read their parity.yaml, and resolve training-machine paths.

A case is a folder holding an ai-toolkit trainer config and a `samples/` folder. Nothing here writes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath

from .aitk_config import TrainingJob, load_job, read_yaml, trainer_process
from .errors import CaseError
from .expectations import Expectation, parse as parse_expect

PARITY_FILE = "parity.yaml"
PARITY_KEYS = {"model", "paths", "thresholds", "notes", "accept", "allow_roots", "ara", "expect"}
THRESHOLD_KEYS = {"ssim_min", "psnr_min", "mean_abs_max", "max_abs_max"}
WINDOWS_PATH = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")  # C:\..., C:/... or \\server\share\...


@dataclass(frozen=True)
class CaseSettings:
    """parity.yaml beside the config, every path already made absolute."""

    path: Path | None = None
    model: str | None = None  # hub id, or an absolute folder
    paths: tuple[tuple[str, Path], ...] = ()  # training-machine prefix -> local folder
    thresholds: dict[str, float] = field(default_factory=dict)
    notes: str = ""
    accept: tuple[str, ...] = ()
    allow_roots: tuple[Path, ...] = ()
    ara: Path | None = None  # the accuracy recovery adapter file, where the config's reference is not found
    expect: tuple[Expectation, ...] = ()  # known gaps (expectations.py)


@dataclass(frozen=True)
class Case:
    """One ai-toolkit output folder."""

    folder: Path
    config_path: Path
    root: Path  # the cases root it was found under: the limit of file-name searches
    settings: CaseSettings

    @property
    def name(self) -> str:
        return self.folder.name

    def job(self) -> TrainingJob:
        return load_job(self.config_path)

    def allowed_roots(self) -> tuple[Path, ...]:
        return (self.folder, self.root, *(p for _, p in self.settings.paths), *self.settings.allow_roots)

    def find(self, training_path: str, what: str) -> Path | None:
        """`resolve`, or None where the file is not there."""
        try:
            return self.resolve(training_path, what)
        except CaseError:
            return None

    def resolve(self, training_path: str, what: str) -> Path:
        """A path written on the training machine, as a local file: mapped by `paths:`, else the file itself where
        it exists here (a run checked where it trained), else found inside the allowed roots."""
        local = map_path(training_path, self.settings.paths)
        if local is None and Path(training_path).is_absolute() and Path(training_path).is_file():
            return Path(training_path).resolve()
        real = (local if local is not None else self._unmapped(training_path, what)).resolve()
        if not any(_inside(real, root.resolve()) for root in self.allowed_roots()):
            raise CaseError(self.config_path, f"{what} {training_path!r} resolves to {real}, outside the case "
                            f"folder and the allowed roots",
                            f"copy the file into {self.folder} or list its folder under `allow_roots:` in "
                            f"{self.folder / PARITY_FILE}")
        if not real.is_file():
            raise CaseError(self.config_path, f"{what} {training_path!r} resolves to {real}, which does not exist",
                            f"copy the file there, or fix the `paths:` entry in {self.folder / PARITY_FILE}")
        return real

    def _unmapped(self, training_path: str, what: str) -> Path:
        pure = pure_path(training_path)
        if not pure.is_absolute():
            return self.folder / Path(*pure.parts)
        # No mapping: find the file by its name under the case folder and its parents up to the root.
        hits = self._find_by_name(pure.name)
        if len(hits) == 1:
            return hits[0]
        prefix = str(pure.parent)
        prefix = f"'{prefix}'" if isinstance(pure, PureWindowsPath) else prefix  # YAML keeps backslashes quoted
        hint = f"add `paths: {{{prefix}: <local folder>}}` to {self.folder / PARITY_FILE}"
        if not hits:
            raise CaseError(self.config_path, f"{what} {training_path!r} is a training-machine path and no file "
                            f"named {pure.name!r} is under {self.root}", hint)
        listed = ", ".join(str(h) for h in hits[:5])
        raise CaseError(self.config_path, f"{what} {training_path!r}: several files named {pure.name!r} "
                        f"({listed})", hint)

    def _find_by_name(self, name: str) -> list[Path]:
        folder = self.folder.resolve()
        root = self.root.resolve()
        searched: list[Path] = []
        while True:
            searched.append(folder)
            if folder == root or not _inside(folder, root) or folder.parent == folder:
                break
            folder = folder.parent
        top = searched[-1]
        hits = sorted({Path(dirpath) / name for dirpath, _, files in os.walk(top) if name in files
                       and not _hidden(Path(dirpath), top)})
        return hits


def pure_path(text: str) -> PurePath:
    """A path as the training machine wrote it: Windows (a drive letter or UNC, compared case-insensitively as
    Windows does) or POSIX."""
    return PureWindowsPath(text) if WINDOWS_PATH.match(text) else PurePosixPath(text)


def map_path(text: str, paths: tuple[tuple[str, Path], ...]) -> Path | None:
    """The local path the first matching `paths:` prefix maps a training-machine path to; None where none does."""
    pure = pure_path(text)
    for prefix, target in paths:
        try:
            rest = pure.relative_to(pure_path(prefix))
        except ValueError:
            continue
        return target.joinpath(*rest.parts)
    return None


def _hidden(path: Path, top: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(top).parts)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def read_settings(folder: Path) -> CaseSettings:
    path = folder / PARITY_FILE
    if not path.is_file():
        return CaseSettings()
    doc = read_yaml(path)
    if doc is None:
        return CaseSettings(path=path)
    if not isinstance(doc, dict):
        raise CaseError(path, "must be a mapping of settings", f"use keys from: {', '.join(sorted(PARITY_KEYS))}")
    unknown = sorted(set(doc) - PARITY_KEYS)
    if unknown:
        raise CaseError(path, f"unknown key(s) {', '.join(unknown)}",
                        f"use keys from: {', '.join(sorted(PARITY_KEYS))}")
    model = doc.get("model")
    if model is not None:
        model = str(model)
        local = (folder / model)
        if model.startswith((".", "/")) or local.exists():
            model = str(local.resolve())
    paths = doc.get("paths") or {}
    if not isinstance(paths, dict):
        raise CaseError(path, "`paths:` must map training-machine prefixes to local folders",
                        "write e.g. `paths: {/workspace: ../..}`")
    mapped = tuple(sorted(((str(k), (folder / str(v)).resolve()) for k, v in paths.items()),
                          key=lambda kv: -len(kv[0])))  # longest prefix first
    thresholds = doc.get("thresholds") or {}
    if not isinstance(thresholds, dict) or set(thresholds) - THRESHOLD_KEYS:
        raise CaseError(path, f"`thresholds:` takes only {', '.join(sorted(THRESHOLD_KEYS))}",
                        "remove or rename the other keys")
    try:
        thresholds = {k: float(v) for k, v in thresholds.items()}
    except (TypeError, ValueError):
        raise CaseError(path, "a threshold is not a number", "write numbers under `thresholds:`") from None
    accept = doc.get("accept") or []
    roots = doc.get("allow_roots") or []
    return CaseSettings(path=path, model=model, paths=mapped, thresholds=thresholds,
                        notes=str(doc.get("notes") or ""), accept=tuple(str(a) for a in accept),
                        allow_roots=tuple((folder / str(r)).resolve() for r in roots),
                        ara=(folder / str(doc["ara"])).resolve() if doc.get("ara") else None,
                        expect=parse_expect(doc.get("expect"), path))


def find_config(folder: Path) -> Path | None:
    """`config.yaml`, else the one `*.yaml` whose config.process[0] is a trainer."""
    if (folder / "config.yaml").is_file():
        return folder / "config.yaml"
    for path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")):
        if path.name == PARITY_FILE:
            continue
        try:
            if trainer_process(read_yaml(path)) is not None:
                return path
        except CaseError:
            continue
    return None


@dataclass(frozen=True)
class BrokenCase:
    """A folder that looks like a case but cannot be read; reported, never fatal for the run."""

    folder: Path
    error: CaseError

    @property
    def name(self) -> str:
        return self.folder.name


def discover(roots: list[Path]) -> list[Case | BrokenCase]:
    """Every case under the roots (searched recursively), sorted by folder."""
    found: dict[Path, Case | BrokenCase] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise CaseError(root, "does not exist", "pass a folder that holds ai-toolkit output folders")
        for dirpath, dirnames, _ in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            folder = Path(dirpath)
            if not (folder / "samples").is_dir():
                continue
            dirnames[:] = [d for d in dirnames if d != "samples"]
            config = find_config(folder)
            if config is None:
                if (folder / "config.yaml").exists() or list(folder.glob("*.yaml")):
                    found[folder] = BrokenCase(folder, CaseError(
                        folder / "config.yaml", "no readable ai-toolkit trainer config here",
                        "fix the YAML (see the error it gives) or restore the config ai-toolkit wrote"))
                continue
            try:
                found[folder] = Case(folder=folder, config_path=config, root=root, settings=read_settings(folder))
            except CaseError as err:
                found[folder] = BrokenCase(folder, err)
    return [found[k] for k in sorted(found)]
