"""Writing params.yaml: a preset's keys and `-S` overrides into the file people edit.

A job of its own beside reading the config (pipelines/config.py): the file must keep its comments,
nulls, quoting and indentation (ruamel's round trip), and be replaced atomically.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, load_yaml, parse_override, preset_overrides, resolve, with_implied


def write_params(path: Path, overrides: list[str], preset: str | None) -> None:
    """Write a preset's keys and the overrides into params.yaml, as `dvc exp run -S` does;
    `preset:` records the preset's name.

    The Prefect driver does this so that params.yaml holds exactly what the run used, dvc.lock
    records it, and `dvc status` stays clean afterwards. Only the keys set change: comments, nulls,
    quoting and indentation stay as written, and the file is replaced atomically, so an interrupted
    write leaves the old file whole.
    """
    yaml_rt = _round_trip_yaml()
    if path.exists():
        load_yaml(path.read_text(encoding="utf-8"), str(path))  # anchors and aliases refused before ruamel expands them
    doc = yaml_rt.load(path.read_text(encoding="utf-8")) if path.exists() else None
    if doc is None:
        doc = {}
    pairs = list(preset_overrides(preset).items()) if preset else []
    pairs += with_implied([parse_override(o) for o in overrides])
    if preset:
        doc["preset"] = preset
    for key, value in pairs:
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or node[part] is None:
                _set_keeping_comments(node, part, {})
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        if not _same(node.get(parts[-1], _MISSING), value):  # an unchanged value keeps its spelling
            _set_keeping_comments(node, parts[-1], value)
    resolve(_plain(doc))  # refuse to write something that would not load
    buffer = io.StringIO()
    yaml_rt.dump(doc, buffer)
    _replace_atomically(path, buffer.getvalue())


_MISSING = object()


def _same(old: Any, new: Any) -> bool:
    """The value in the file already is `new` (True is not 1 here)."""
    return old is not _MISSING and old == new and isinstance(old, bool) == isinstance(new, bool)


def _set_keeping_comments(mapping: Any, key: str, value: Any) -> None:
    """`mapping[key] = value` in a ruamel document, keeping the comments and blank lines that follow.

    ruamel hangs the lines after a value on the value's last leaf (the last item of a list, the last
    key of a section): replacing a list would drop them, and a key added at the end of a section
    would land after its trailing blank line. A replaced list or section also keeps its flow style.
    """
    from ruamel.yaml.comments import CommentedBase, CommentedMap

    if not isinstance(mapping, CommentedMap):
        mapping[key] = value
        return
    old = mapping.get(key, _MISSING)
    value = _node(value)
    # `[+, *]` and `[]` (an empty list can only be written in flow style) stay on one line.
    if isinstance(value, CommentedBase) and isinstance(old, CommentedBase) and (old.fa.flow_style() or not old):
        value.fa.set_flow_style()
    if old is not _MISSING:
        tail = _take_tail(mapping, key)
        mapping[key] = value
        _put_tail(mapping, key, tail)
        return
    previous = next(reversed(mapping), None) if len(mapping) else None
    tail = _take_tail(mapping, previous) if previous is not None else None
    mapping[key] = value
    if tail is None:
        return
    # The previous key keeps its own end-of-line comment; the lines after it move below the new key.
    own, _, rest = tail.value.partition("\n")
    if not rest:
        _put_tail(mapping, previous, tail)
        return
    if own:
        _put_tail(mapping, previous, _comment(f"{own}\n", tail))
    _put_tail(mapping, key, _comment(f"\n{rest}", None))


def _node(value: Any) -> Any:
    """Plain dicts and lists as ruamel's commented ones, all the way down, so comments can hang on them."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, dict):
        return CommentedMap((k, _node(v)) for k, v in value.items())
    if isinstance(value, list):
        return CommentedSeq(_node(v) for v in value)
    return value


def _tail_slot(node: Any, key: Any) -> tuple[Any, Any, int]:
    """Where ruamel keeps the comment after `node[key]`: (container, key or index, slot)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    value = node[key]
    if isinstance(value, (CommentedMap, CommentedSeq)) and len(value) and not value.fa.flow_style():
        return _tail_slot(value, next(reversed(value)) if isinstance(value, CommentedMap) else len(value) - 1)
    return node, key, 0 if isinstance(node, CommentedSeq) else 2


def _take_tail(node: Any, key: Any) -> Any:
    holder, where, slot = _tail_slot(node, key)
    entry = holder.ca.items.get(where)
    if not entry or entry[slot] is None:
        return None
    token, entry[slot] = entry[slot], None
    return token


def _put_tail(node: Any, key: Any, token: Any) -> None:
    if token is None:
        return
    holder, where, slot = _tail_slot(node, key)
    entry = holder.ca.items.setdefault(where, [None, None, None, None])
    entry[slot] = token


def _comment(text: str, like: Any) -> Any:
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    return CommentToken(text, like.start_mark if like is not None else CommentMark(0))


def _round_trip_yaml() -> Any:
    """ruamel.yaml (DVC's own YAML library) set up to write params.yaml back as it was written."""
    from ruamel.yaml import YAML

    yaml_rt = YAML()  # round-trip: comments, key order, flow lists ([+, *]) and blank lines kept
    yaml_rt.preserve_quotes = True
    yaml_rt.indent(mapping=2, sequence=4, offset=2)  # params.yaml's `  - name: ...` lists
    yaml_rt.width = 4096  # never re-wrap a long value
    yaml_rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )  # ruamel writes None as an empty value; the file says `null`
    return yaml_rt


def _replace_atomically(path: Path, text: str) -> None:
    """Write beside `path`, fsync, then rename over it: a reader sees the old file or the new, whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power cut once the folder is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node
