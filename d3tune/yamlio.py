"""Safe YAML in and out: plain data only, duplicate keys refused, errors as one line.

Specs come from users and colleagues; a YAML tag must never build an object, a key written
twice must not silently win, and an alias bomb must not eat the machine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from d3tune.errors import UsageError

MAX_BYTES = 1 << 20  # a spec is a page of text; refuse anything larger before parsing
MAX_NODES = 100_000  # after alias expansion


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        if isinstance(key, str) and not key.isprintable():  # no field has one; it would break
            raise yaml.constructor.ConstructorError(  # the one-line error naming that key
                None, None, f"control character or line break in key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _count_nodes(value: Any, limit: int) -> int:
    """Count values, following aliases (an alias bomb is small text but a huge tree)."""
    stack, count = [value], 0
    while stack:
        v = stack.pop()
        count += 1
        if count > limit:
            return count
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return count


def parse_yaml(text: str, source: str) -> Any:
    try:
        loader = _StrictLoader(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = exc.problem or exc.context or "invalid YAML"
        raise UsageError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise UsageError(f"{source}: invalid YAML: nested too deeply") from None
    if _count_nodes(data, MAX_NODES) > MAX_NODES:
        raise UsageError(f"{source}: refusing a YAML document with more than {MAX_NODES} values "
                         "(an alias bomb?)")
    return data


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file")
    if not p.is_file():
        raise UsageError(f"{p}: expected a YAML file, found a directory or special file")
    if p.stat().st_size > MAX_BYTES:
        raise UsageError(f"{p}: larger than {MAX_BYTES} bytes; a spec should be a page of text")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise UsageError(f"{p}: binary data, expected YAML text")
    return parse_yaml(text, str(p))


def dump_yaml(data: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
