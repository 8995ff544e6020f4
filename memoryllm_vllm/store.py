"""
The store of published memories, on local disk (the connector's storage backend at scale).

    <root>/<name>/manifest.json         the current version: rows, fingerprint, cache salt, file
    <root>/<name>/kv-<version>.safetensors   its prefix keys/values (`modeling_memoryllm.export.save_prefix`)
    <root>/<name>/kv-<version>.json     that version's manifest
    <root>/<name>/state.safetensors     the package's `MemoryState` (the service injects into it)

A publish writes the new version's file, then replaces the manifest atomically; the last `keep` versions stay on
disk so that requests already admitted for an older version still find it. The manifest is the only thing a
reader needs to build a request (`request_fields`).
"""

import dataclasses
import json
import os
import pathlib
import re
import tempfile

from modeling_memoryllm.export import PrefixExport, load_prefix, save_prefix


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MANIFEST = "manifest.json"
STATE = "state.safetensors"
# The keys of `kv_transfer_params` that name a memory and its version.
MEMORY_KEY = "memoryllm_memory"
VERSION_KEY = "memoryllm_version"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"memory names are 1-64 characters of letters, digits, '_', '.', '-': got {name!r}")
    return name


def cache_salt(name: str, version: int, fingerprint: str) -> str:
    """The prefix-cache salt of one memory version: blocks computed for it are never reused for another."""
    return f"memoryllm:{name}:v{version}:{fingerprint[:16]}"


@dataclasses.dataclass(frozen=True)
class Manifest:
    """One published memory version."""

    name: str
    version: int
    rows: int  # placeholder tokens a request opens with (the readable prefix rows)
    prefix_length: int  # the package's prefix length P (rows + never-written rows left out)
    fingerprint: str  # the reading model the keys/values were computed for
    file: str  # relative to the memory's folder
    nbytes: int
    injections: int

    @property
    def salt(self) -> str:
        return cache_salt(self.name, self.version, self.fingerprint)

    def request_fields(self) -> dict:
        """What a chat or completion request adds to read this memory version (e.g. as `extra_body`)."""
        return {
            "cache_salt": self.salt,
            "kv_transfer_params": {MEMORY_KEY: self.name, VERSION_KEY: self.version},
            "chat_template_kwargs": {"memory_rows": self.rows},
        }


def _write_json(path: pathlib.Path, data: dict) -> None:
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.chmod(staging, 0o644)
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staging, path)


class MemoryStore:
    """Published memories under `root` (created on first publish)."""

    def __init__(self, root: str | os.PathLike, keep: int = 2):
        self.root = pathlib.Path(root)
        self.keep = max(1, int(keep))

    def folder(self, name: str) -> pathlib.Path:
        return self.root / check_name(name)

    def state_path(self, name: str) -> pathlib.Path:
        return self.folder(name) / STATE

    def names(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).exists())

    def manifest(self, name: str, version: int | None = None) -> Manifest | None:
        """The current version of `name` (or version `version` while it is kept), or `None` when there is none."""
        path = self.folder(name) / (MANIFEST if version is None else f"kv-{int(version)}.json")
        if not path.exists():
            return None
        return Manifest(**json.loads(path.read_text(encoding="utf-8")))

    def publish(self, name: str, export: PrefixExport) -> Manifest:
        """Write `export` as the next version of `name` and make it current; older versions beyond `keep` go."""
        folder = self.folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        current = self.manifest(name)
        version = current.version + 1 if current is not None else 1
        file = f"kv-{version}.safetensors"
        save_prefix(export, folder / file)
        manifest = Manifest(
            name, version, export.rows, export.prefix_length, export.fingerprint, file, export.nbytes, export.injections
        )
        _write_json(folder / f"kv-{version}.json", dataclasses.asdict(manifest))
        _write_json(folder / MANIFEST, dataclasses.asdict(manifest))
        for old in [*folder.glob("kv-*.safetensors"), *folder.glob("kv-*.json")]:
            number = old.stem.removeprefix("kv-")
            if number.isdigit() and int(number) <= version - self.keep:
                old.unlink(missing_ok=True)
        return manifest

    def load(self, name: str, version: int | None = None, fingerprint: str | None = None) -> PrefixExport:
        """The keys/values of `name` at `version` (default: the current one), checked (`load_prefix`)."""
        manifest = self.manifest(name, version)
        if manifest is None:
            what = "no memory named" if version is None else f"no version {version} of"
            raise ValueError(f"{what} {name!r} in {self.root}")
        return load_prefix(self.folder(name) / manifest.file, fingerprint)


__all__ = ["MEMORY_KEY", "VERSION_KEY", "Manifest", "MemoryStore", "cache_salt", "check_name"]
