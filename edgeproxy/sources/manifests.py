"""Manifest source: Kubernetes objects from YAML/JSON files on disk, re-read when they change.

Polls file modification times (cheap, bounded: one stat per file per interval) instead of
inotify, so it works the same on every filesystem, including ConfigMap volumes whose files
are swapped through symlinks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import yaml

from edgeproxy.objects import ObjectStore

log = logging.getLogger("edgeproxy.manifests")

SOURCE_NAME = "manifests"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# libyaml's safe loader (in PyYAML's wheels) parses about 7x faster than the pure-Python one,
# which dominated the start at 50,000 Ingresses; the same safe tag set either way.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def manifest_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(p for p in path.rglob("*") if p.suffix in MANIFEST_SUFFIXES and p.is_file())
            )
        elif path.exists():
            files.append(path)
        else:
            log.error("manifest path %s does not exist", path)
    return files


def _documents(obj: Any) -> Iterator[dict[str, Any]]:
    """Yield objects, unpacking `kind: List` (what `kubectl get -o yaml` writes)."""
    if isinstance(obj, dict):
        if obj.get("kind") == "List" or (
            isinstance(obj.get("items"), list) and "kind" not in obj
        ):
            for item in obj.get("items") or []:
                yield from _documents(item)
        else:
            yield obj


def load_file(path: Path) -> list[dict[str, Any]]:
    """Objects of one file; an unparsable file logs one line and yields nothing."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".json":
            docs: list[Any] = [orjson.loads(raw)]
        else:
            docs = list(yaml.load_all(raw, Loader=SAFE_LOADER))
    except (OSError, yaml.YAMLError, orjson.JSONDecodeError) as exc:
        log.error("skipping manifest file %s: cannot parse it: %s", path, exc)
        return []
    return [obj for doc in docs for obj in _documents(doc)]


class ManifestSource:
    def __init__(self, paths: list[Path], store: ObjectStore, interval: float) -> None:
        self._paths = paths
        self._store = store
        self._interval = interval
        self._seen: dict[Path, tuple[int, int]] = {}

    def _stamp(self) -> dict[Path, tuple[int, int]]:
        stamps = {}
        for path in manifest_files(self._paths):
            try:
                st = path.stat()
            except OSError:
                continue
            stamps[path] = (st.st_mtime_ns, st.st_size)
        return stamps

    def load(self) -> None:
        """Read every file and replace this source's objects in the store."""
        stamps = self._stamp()
        objects = [obj for path in stamps for obj in load_file(path)]
        self._seen = stamps
        self._store.replace(SOURCE_NAME, objects)

    def changed_on_disk(self) -> bool:
        return self._stamp() != self._seen

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                if self.changed_on_disk():
                    log.info("manifests changed on disk; reloading")
                    self.load()
            except Exception:  # a bad reload must not stop the watcher
                log.exception("reloading manifests failed; the last good table keeps serving")
