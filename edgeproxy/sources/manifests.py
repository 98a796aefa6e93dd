"""Manifest source: Kubernetes objects from YAML/JSON files on disk, re-read when they change.

Polls file modification times (cheap, bounded: one stat per file per interval) instead of
inotify, so it works the same on every filesystem, including ConfigMap volumes whose files
are swapped through symlinks. Only changed files are parsed again. A file that no longer
parses keeps its last good objects serving; its error is logged once, shown in /debug/routes
and explain, and counted in edgeproxy_manifest_files_unreadable until the file is mended.
A file rewritten in place (truncated, then written) can be read half-written, and half a YAML
stream may still parse; so a reload waits until a changed file has been still for SETTLE_S.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import yaml

from edgeproxy.objects import ObjectKey, ObjectStore, Packed, pack_all

log = logging.getLogger("edgeproxy.manifests")

SOURCE_NAME = "manifests"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# libyaml's safe loader (in PyYAML's wheels) parses about 7x faster than the pure-Python one,
# which dominated the start at 50,000 Ingresses; the same safe tag set either way.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR, _INT, _BOOL, _NULL = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "bool", "null"))
_MERGE = "tag:yaml.org,2002:merge"
_MAP, _SEQ = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"  # not !!set, !!omap, !!pairs
_BOOLS = yaml.constructor.SafeConstructor.bool_values


# How long a changed file must go unmodified before a reload reads it (the start reads at once).
SETTLE_S = 0.1


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


class UnreadableFile(Exception):
    """A manifest file that cannot be read or parsed (the message says where)."""


def load_yaml(raw: bytes) -> list[Any]:
    """yaml.load_all(raw, SAFE_LOADER), about 1.4x faster and with shared strings.

    libyaml parses and composes the nodes; PyYAML's constructor then turns them into Python
    objects one method call per node, which was two thirds of reading 50,000 Ingresses. Here
    the usual nodes (strings, plain decimal ints, bools, nulls, mappings, sequences) are
    built directly; anything else (floats, timestamps, other int forms, merge keys, binary,
    sets) goes to the safe constructor itself, so the result is the same.
    """
    return _load(raw, False)


def load_packed(raw: bytes) -> list[tuple[ObjectKey, Packed]]:
    """The objects of a YAML stream as the store keeps them (objects.pack_all), each packed
    as soon as its document is built: a large file's dicts never all exist at once."""
    return _load(raw, True)


def _load(raw: bytes, packed: bool) -> list[Any]:
    loader = SAFE_LOADER(raw)
    strings: dict[str, str] = {}
    try:
        out: list[Any] = []
        while loader.check_node():
            doc = _build(loader, strings, loader.get_node(), 0)
            if packed:
                out.extend(pack_all(_documents(doc)))
            else:
                out.append(doc)
        return out
    finally:
        loader.dispose()


def _build(loader: Any, strings: dict[str, str], node: Any, depth: int) -> Any:
    tag = node.tag
    if tag == _STR:
        # One object per distinct short string: keys and common values (apiVersion, "name",
        # "Prefix", namespaces) repeat in every object; 1.6 million strings at 50,000 Ingresses.
        value = node.value
        return strings.setdefault(value, value) if len(value) <= 64 else value
    kind = type(node)
    if tag == _MAP and kind is yaml.MappingNode and depth < 100:
        out = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:  # "<<": the constructor's merge rules, for this mapping
                return loader.construct_object(node, deep=True)
            key = _build(loader, strings, key_node, depth + 1)
            if isinstance(key, (dict, list)):  # unhashable: let the constructor say so
                return loader.construct_object(node, deep=True)
            out[key] = _build(loader, strings, value_node, depth + 1)
        return out
    if tag == _SEQ and kind is yaml.SequenceNode and depth < 100:
        return [_build(loader, strings, item, depth + 1) for item in node.value]
    if kind is yaml.ScalarNode:
        value = node.value
        if tag == _INT and value.isdigit() and (value[0] != "0" or value == "0"):
            return int(value)
        if tag == _BOOL:
            return _BOOLS[value.lower()]
        if tag == _NULL:
            return None
    return loader.construct_object(node, deep=True)


# A YAML stream this large is parsed in parts, one per CPU, in processes of their own
# (libyaml and the builder hold the GIL: a 20 MB file of 50,000 Ingresses took 6.7 s alone).
PARALLEL_BYTES = 4 << 20
_DOCUMENT_START = re.compile(rb"^---(?=[ \t\r\n]|$)", re.MULTILINE)


def split_documents(raw: bytes, parts: int) -> list[bytes]:
    """The stream cut at document markers into at most `parts` pieces of similar size. A
    "---" at the start of a line always begins a document (YAML 1.2 6.9: no scalar may hold
    it there), so each piece is a stream of whole documents. Directives (%) are documents'
    own prologue: a stream with any is left whole."""
    if parts < 2 or re.search(rb"^%", raw, re.MULTILINE):
        return [raw]
    cuts = [0]
    step = len(raw) // parts
    for match in _DOCUMENT_START.finditer(raw):
        if match.start() >= cuts[-1] + step and len(cuts) < parts:
            cuts.append(match.start())
    cuts.append(len(raw))
    return [raw[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if raw[a:b].strip()]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# A part's parser: the part on stdin, its documents (or packed objects) pickled on stdout.
_PART_PARSER = ("import gc, pickle, sys; gc.disable(); "
                "from edgeproxy.sources.manifests import _load; "
                "sys.stdout.buffer.write(pickle.dumps(_load(sys.stdin.buffer.read(), {}), 5))")


def load_yaml_parallel(raw: bytes, packed: bool = False) -> list[Any]:
    """load_yaml(raw) (or load_packed) with the parts of a large stream parsed side by side:
    this process takes the first, child processes the others. Anything unusual (a part that
    does not parse alone, a child that cannot start) falls back to the whole stream here, so
    the result, and the error of a broken file, are exactly load_yaml's."""
    parts = split_documents(raw, min(_usable_cpus(), 8)) if len(raw) >= PARALLEL_BYTES else [raw]
    if len(parts) < 2:
        return _load(raw, packed)
    children = []
    try:
        for part in parts[1:]:
            # Files, not pipes, in and out: a thread feeding a pipe would wait for the GIL
            # this thread holds while it parses, and the child would wait for its input.
            given, taken = tempfile.TemporaryFile(), tempfile.TemporaryFile()
            given.write(part)
            given.seek(0)
            # A fresh interpreter (not a fork of the supervisor, which has threads).
            children.append((subprocess.Popen([sys.executable, "-c", _PART_PARSER.format(packed)],
                                              stdin=given, stdout=taken), given, taken))  # fmt: skip
        docs = _load(parts[0], packed)
        for child, _, taken in children:
            if child.wait(600) != 0:
                raise OSError(f"a manifest part's parser exited with {child.returncode}")
            taken.seek(0)
            docs.extend(pickle.load(taken))
        return docs
    except Exception:  # noqa: BLE001 - the serial parse is the answer (or raises the real error)
        return _load(raw, packed)
    finally:
        for child, given, taken in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            given.close()
            taken.close()


def parse_file(path: Path) -> list[dict[str, Any]]:
    """Objects of one file; raises UnreadableFile."""
    return _parse(path, False)


def parse_file_packed(path: Path) -> list[tuple[ObjectKey, Packed]]:
    """pack_all(parse_file(path)), with a YAML file's objects packed as they are built."""
    return _parse(path, True)


def _parse(path: Path, packed: bool) -> list[Any]:
    try:
        raw = path.read_bytes()
        if path.suffix == ".json":
            objects = list(_documents(orjson.loads(raw)))
            return pack_all(objects) if packed else objects
        if packed:  # _documents applied as each document is built
            return load_yaml_parallel(raw, packed=True)
        docs = load_yaml_parallel(raw)
    except (OSError, yaml.YAMLError, orjson.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnreadableFile(" ".join(str(exc).split())) from None
    return [obj for doc in docs for obj in _documents(doc)]


def load_file(path: Path) -> list[dict[str, Any]]:
    """Objects of one file; an unparsable one logs a line and yields nothing."""
    try:
        return parse_file(path)
    except UnreadableFile as exc:
        log.error("skipping manifest file %s: cannot parse it: %s", path, exc)
        return []


class ManifestSource:
    def __init__(self, paths: list[Path], store: ObjectStore, interval: float) -> None:
        self._paths = paths
        self._store = store
        self._interval = interval
        self._seen: dict[Path, tuple[int, int]] = {}
        # Each file's last good objects, packed as the store keeps them (one copy of each).
        self._objects: dict[Path, list[tuple[ObjectKey, Packed]]] = {}
        self.errors: dict[Path, str] = {}  # files whose last read failed, and why

    def _stamp(self) -> dict[Path, tuple[int, int]]:
        stamps = {}
        for path in manifest_files(self._paths):
            try:
                st = path.stat()
            except OSError:
                continue
            stamps[path] = (st.st_mtime_ns, st.st_size)
        return stamps

    def load(self, settle_s: float = 0.0) -> None:
        """Read the files that changed and replace this source's objects in the store.

        A changed file modified less than `settle_s` ago keeps its last objects and its old
        stamp, so the next poll reads it once its writer is done.
        """
        stamps = self._stamp()
        young = time.time_ns() - int(settle_s * 1e9)
        for path in list(self._objects):
            if path not in stamps:  # removed: its objects go
                del self._objects[path]
                self.errors.pop(path, None)
        for path, stamp in list(stamps.items()):
            if self._seen.get(path) == stamp and path in self._objects:
                continue
            if stamp[0] > young:  # maybe still being written: the next poll reads it
                if path in self._seen:
                    stamps[path] = self._seen[path]
                else:
                    del stamps[path]
                continue
            try:
                self._objects[path] = parse_file_packed(path)
            except UnreadableFile as exc:
                kept = len(self._objects.get(path, ()))
                if self.errors.get(path) != str(exc):
                    log.error("manifest file %s cannot be parsed: %s; its last good objects (%d) "
                              "keep serving", path, exc, kept)  # fmt: skip
                self.errors[path] = str(exc)
                continue
            if self.errors.pop(path, None) is not None:
                log.info("manifest file %s parses again", path)
        self._seen = stamps
        self._store.replace_packed(SOURCE_NAME,
                                  [o for path in stamps for o in self._objects.get(path, ())])  # fmt: skip

    def changed_on_disk(self) -> bool:
        return self._stamp() != self._seen

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                if self.changed_on_disk():
                    log.info("manifests changed on disk; reloading")
                    self.load(SETTLE_S)
            except Exception:  # a bad reload must not stop the watcher
                log.exception("reloading manifests failed; the last good table keeps serving")
