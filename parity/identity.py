"""What a cached value depends on besides its own inputs, for the cache keys of renders, control-image latents,
prompt embeddings and quantized weights.

- the model by content: a local folder by a digest of each of its files (memoised by path, size and mtime, in
  memory and in the cache folder, so 58 GB are read once), a hub id by the snapshot commit it resolves to;
- the code on the pixel path: every module the renderer imports, found by reading their imports (a new module
  joins by itself), less those that only build recipes or write reports (the recipe is in the key);
- the libraries, and the machine where it changes bits: on a CPU the thread count and the CPU kind (bf16
  reductions round differently), on a GPU its name.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path

PACKAGE = Path(__file__).parent
PIXEL_ROOTS = ("render.py", "pipeline.py")  # what renders and loads; the rest is found from their imports
# Imported on the way, but no pixel depends on them: they read configs, check inputs or store files.
NOT_PIXELS = {"aitk_config.py", "preflight.py", "errors.py", "cache.py", "store.py", "identity.py"}
HUB_SNAPSHOTS = "snapshots"  # huggingface_hub's cache layout: models--<org>--<name>/snapshots/<commit>/


def _imports(path: Path) -> set[Path]:
    """The package's own modules `path` imports (at the top or inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = path.parent
        for _ in range(node.level - 1):
            base = base.parent
        target = base.joinpath(*node.module.split(".")) if node.module else base
        candidates = [target.with_suffix(".py")]
        if target.is_dir():  # `from . import a, b` or `from .models import x`: the package and the submodules named
            candidates += [target / "__init__.py", *(target / f"{alias.name}.py" for alias in node.names),
                           *(target / alias.name / "__init__.py" for alias in node.names)]
        found.update(c for c in candidates if c.is_file())
    return found


def pixel_modules(package: Path = PACKAGE) -> list[Path]:
    """Every module of the package on the pixel path, sorted."""
    todo = [package / name for name in PIXEL_ROOTS]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path.name == "__init__.py" and path.parent == package:  # the package itself imports nothing that renders
            continue
        if path in seen or path.name in NOT_PIXELS:
            continue
        seen.add(path)
        todo.extend(_imports(path))
        if path.name == "__init__.py" and path.parent != package:  # a subpackage's modules are chosen by name at
            # run time (models.by_name)
            todo.extend(path.parent.glob("*.py"))
    return sorted(seen)


def code_digest(package: Path = PACKAGE) -> str:
    h = hashlib.sha256()
    for path in pixel_modules(package):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def pixel_code() -> str:
    """The code digest of this process's package (its files do not change under a running process)."""
    return code_digest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class FileDigests:
    """sha256 of files, memoised by (path, size, mtime): in memory, and in `memo` (a JSON file) when given."""

    def __init__(self, memo: Path | None = None):
        self.memo = memo
        self._known: dict[str, str] = {}
        if memo is not None and memo.is_file():
            try:
                self._known = json.loads(memo.read_text())
            except (OSError, ValueError):  # a damaged memo: the files are read again
                self._known = {}

    def __call__(self, path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self._known:
            self._known[key] = file_sha256(path)
            self._save()
        return self._known[key]

    def _save(self) -> None:
        if self.memo is None:
            return
        from .store import write_atomic

        write_atomic(self.memo, json.dumps(self._known, sort_keys=True).encode())


_DIGESTS: dict[str, FileDigests] = {}


def digests(cache_dir: Path | str | None) -> FileDigests:
    memo = str(Path(cache_dir) / "file-digests.json") if cache_dir else ""
    if memo not in _DIGESTS:
        _DIGESTS[memo] = FileDigests(Path(memo) if memo else None)
    return _DIGESTS[memo]


def model_identity(model: str, cache_dir: Path | str | None = None) -> dict:
    """The model by content. A hub id: the snapshot commit its local copy resolves to; a folder: every file in it
    (weights, configs, tokenizer), each by digest."""
    from .preflight import is_hub_id, locate_model

    source = Path(locate_model(model))
    if is_hub_id(model) and source.parent.name == HUB_SNAPSHOTS:
        return {"hub": model, "commit": source.name}
    if not source.is_dir():  # an uncached, reachable hub id: loading downloads it; key by what it resolves to then
        return {"hub": model, "commit": "unresolved"}
    digest = digests(cache_dir)
    files = sorted(p for p in source.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(source).parts))
    return {"files": {str(p.relative_to(source)): digest(p) for p in files}}


def model_digest(model: str, cache_dir: Path | str | None = None) -> str:
    return hashlib.sha256(json.dumps(model_identity(model, cache_dir), sort_keys=True).encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def cpu_kind() -> str:
    """The CPU's model name and the bf16 instructions it has (they decide how bf16 work rounds on a CPU)."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        import platform

        name = platform.processor() or platform.machine()
    extras = sorted(flags & {"avx512_bf16", "amx_bf16", "avx512f", "avx2"})
    return " ".join([name, *extras]).strip()


def libraries() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "diffusers", "transformers", "peft", "optimum-quanto", "pillow", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def machine(device: str, offload: str = "none") -> dict:
    """What changes bits besides the model and the inputs: libraries, device, offload mode; on a CPU the thread
    count and the CPU kind, on a GPU its name (the CPU only feeds it inputs that are bit-exact everywhere)."""
    import torch

    out = {"libraries": libraries(), "device": device, "offload": offload}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else ""
    else:
        out["threads"] = torch.get_num_threads()
        out["cpu"] = cpu_kind()
    return out


def render_key(model: str, device: str, offload: str, cache_dir: Path | str | None, **more) -> str:
    """Everything but the recipe that decides a render, as a short digest (`more`: e.g. deterministic kernels)."""
    parts = [model_digest(model, cache_dir), machine(device, offload), pixel_code(), more]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
