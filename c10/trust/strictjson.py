"""JSON as a verifier must read it: no duplicate keys, no NaN or Infinity, bounded depth."""
from __future__ import annotations

import json


class StrictJSONError(ValueError):
    """Bytes that are not strict JSON; the message says what is wrong with them."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise StrictJSONError(f"duplicate key {dup!r}")
    return out


def _no_constant(name: str):
    raise StrictJSONError(f"{name} is not JSON")


def strict_loads(data: bytes | str, *, max_depth: int | None,
                 max_bytes: int | None = None) -> object:
    """Parse `data`, refusing what lenient parsers accept: duplicate keys (RFC 8259 sec. 4 leaves
    them undefined, so two readers may disagree), NaN/Infinity, nesting deeper than `max_depth`,
    more than `max_bytes`, and bytes that are not UTF-8. StrictJSONError otherwise.

    max_depth=None: no walk of the parsed value (a large document whose every level the caller
    checks anyway); nesting that would exhaust the stack is still refused."""
    if max_bytes is not None and len(data) > max_bytes:
        raise StrictJSONError(f"{len(data)} bytes, more than the {max_bytes} allowed")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise StrictJSONError(f"nested deeper than {max_depth}") from None
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"not UTF-8 ({exc.reason})") from None
    except StrictJSONError:
        raise
    except ValueError as exc:
        raise StrictJSONError(str(exc)) from None
    if max_depth is not None:
        _check_depth(value, max_depth)
    return value


def _check_depth(value: object, max_depth: int) -> None:
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > max_depth:
            raise StrictJSONError(f"nested deeper than {max_depth}")
        nxt = []
        for item in level:
            if isinstance(item, dict):
                nxt.extend(v for v in item.values() if isinstance(v, (dict, list)))
            elif isinstance(item, list):
                nxt.extend(v for v in item if isinstance(v, (dict, list)))
        level = nxt
