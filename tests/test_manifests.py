"""Manifest files read as PyYAML's safe loader reads them, however they are read: the direct
node builder and the parallel parse of a large stream must give the same objects, and a
broken file the same error."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from edgeproxy.objects import pack_all
from edgeproxy.sources import manifests
from edgeproxy.sources.manifests import load_packed, load_yaml, load_yaml_parallel, split_documents

# Every scalar form the direct builder handles, and those it hands to the safe constructor.
TRICKY = textwrap.dedent("""\
    a: 80
    b: true
    c: null
    d: ~
    e: yes
    f: "80"
    g: '0777'
    h: 0777
    i: 1e3
    j: .inf
    k:
    l: |
      line1
      line2
    m: &anchor {x: 1, y: [1, 2]}
    n: *anchor
    merged:
      <<: *anchor
      z: 3
    o: [1, "two", three]
    p: "esc\\t\\"q\\u00e9"
    q: 0x1F
    r: 1_000
    s: True
    t: NULL
    u: -12
    v: 3.50
    w: "true"
    x: 2026-01-01T00:00:00Z
    y: on
    z: '  spaced  '
    aa: >-
      folded
      text
    bb: 'it''s'
    cc: 12:30
    dd: +5
    ee: 0o17
    ff: .5
    gg: -.inf
    bin: !!binary aGVsbG8=
    set: !!set {a, b}
    zero: 0
    zeros: 00
    big: 123456789012345678901234567890
    1: integer key
    ---
    second: doc
    ---
    - a list
    - document
    ...
    """).encode()


def safe_load_all(raw: bytes) -> list[object]:
    return list(yaml.load_all(raw, Loader=manifests.SAFE_LOADER))


def test_the_direct_builder_gives_what_the_safe_loader_gives() -> None:
    got, want = load_yaml(TRICKY), safe_load_all(TRICKY)
    assert got == want
    # Types too (1 == True and 80 == 80.0 in Python).
    for have, expected in zip(got[0].items(), want[0].items(), strict=True):  # type: ignore[union-attr]
        assert type(have[1]) is type(expected[1]), have


@pytest.mark.parametrize("broken", [b"a: [1, 2\n", b"a: b\n c: d\n", b"---\na: 1\n---\n- x\ny: 2\n",
                                    b"? [1, 2]\n: unhashable\n"])  # fmt: skip
def test_a_broken_stream_raises_what_the_safe_loader_raises(broken: bytes) -> None:
    with pytest.raises(yaml.YAMLError) as ours:
        load_yaml_parallel(broken * 1)
    with pytest.raises(yaml.YAMLError) as theirs:
        safe_load_all(broken)
    assert str(ours.value) == str(theirs.value)


def test_a_large_stream_parsed_in_parts_is_the_same_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}"},
             "spec": {"ports": [{"port": 80 + i % 3, "name": "http"}]}} for i in range(3000)]  # fmt: skip
    raw = yaml.safe_dump_all(docs).encode() + b"---\n" + TRICKY
    monkeypatch.setattr(manifests, "PARALLEL_BYTES", 1)  # parse this one in parts
    monkeypatch.setattr(manifests, "_usable_cpus", lambda: 3)
    parts = split_documents(raw, 3)
    assert len(parts) == 3 and b"".join(parts) == raw
    assert load_yaml_parallel(raw) == safe_load_all(raw)


def test_objects_packed_while_parsed_are_what_the_store_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    # The manifest source packs each document as it is built (and its children send packed
    # objects): the same keys and bytes as packing the parsed stream, odd scalars included.
    odd = yaml.safe_load(TRICKY.split(b"---")[0])
    docs = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}", "annotations": {"n": str(i)}},
             "spec": {"ports": [{"port": 80}]}} for i in range(2000)]  # fmt: skip
    raw = (yaml.safe_dump_all(docs).encode() + b"---\nkind: Ingress\nmetadata: {name: odd}\nspec:\n"
           + textwrap.indent(TRICKY.split(b"---")[0].decode(), "  ").encode()
           + b"---\nkind: List\nitems: [{kind: Secret, metadata: {name: listed}}]\n")  # fmt: skip
    want = pack_all(o for doc in safe_load_all(raw) for o in manifests._documents(doc))
    assert len(want) == 2002 and dict(want)[("Ingress", "default", "odd")]  # nothing dropped
    assert load_packed(raw) == want
    monkeypatch.setattr(manifests, "PARALLEL_BYTES", 1)
    monkeypatch.setattr(manifests, "_usable_cpus", lambda: 3)
    assert load_yaml_parallel(raw, packed=True) == want
    assert odd["big"] == 123456789012345678901234567890  # the case JSON cannot hold


def test_a_broken_part_falls_back_to_the_whole_stream_and_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = b"a: 1\n---\nb: 2\n---\nc: [3\n---\nd: 4\n"
    monkeypatch.setattr(manifests, "PARALLEL_BYTES", 1)
    monkeypatch.setattr(manifests, "_usable_cpus", lambda: 4)
    with pytest.raises(yaml.YAMLError) as ours:
        load_yaml_parallel(raw)
    with pytest.raises(yaml.YAMLError) as theirs:
        safe_load_all(raw)
    assert str(ours.value) == str(theirs.value)


def test_directives_keep_the_stream_whole() -> None:
    raw = b"%YAML 1.1\n---\na: 1\n---\nb: 2\n"
    assert split_documents(raw, 4) == [raw]
