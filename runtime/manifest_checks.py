"""Small typed readers for the manifest's JSON, each failing with one ArtifactError that
names the key path (`manifest.json: program.buffers[3].offset: ...`).

JSON gives bools where ints are expected (`True` is an int in Python), floats, huge
numbers and arbitrary nesting; every reader here accepts exactly one JSON type and a sane
range, so nothing downstream meets a type it did not expect.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, TypeVar

from ..errors import ArtifactError

T = TypeVar("T")

MAX_COUNT = 1 << 40  # elements / bytes / symbol bounds: far above any real model, far below overflow
MAX_LIST = 1 << 20  # entries in one manifest list (buffers, calls, ...)
MAX_STR = 4096


class At:
    """A position in the manifest (file + key path) that can raise errors about itself."""

    def __init__(self, where: str, path: str = ""):
        self.where = where
        self.path = path

    def __getitem__(self, key: str | int) -> "At":
        if isinstance(key, int):
            return At(self.where, f"{self.path}[{key}]")
        return At(self.where, f"{self.path}.{key}" if self.path else key)

    def error(self, problem: str) -> ArtifactError:
        return ArtifactError(f"{self.where}: {self.path or '(top level)'}: {problem}")


def _kind(v: Any) -> str:
    return {bool: "a bool", int: "an int", float: "a float", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def obj(v: Any, at: At, required: Sequence[str] = (), optional: Sequence[str] = (), extra: bool = False) -> dict:
    """A JSON object with these keys (unknown keys refused unless `extra`)."""
    if not isinstance(v, dict):
        raise at.error(f"expected an object, got {_kind(v)}")
    for k in required:
        if k not in v:
            raise at.error(f"missing key {k!r}")
    if not extra:
        unknown = sorted(set(v) - set(required) - set(optional))
        if unknown:
            raise at.error(f"unknown keys {unknown[:5]}")
    return v


def integer(v: Any, at: At, lo: int = 0, hi: int = MAX_COUNT) -> int:
    if type(v) is not int:  # bool is an int subclass: refused here on purpose
        raise at.error(f"expected an integer, got {_kind(v)}")
    if not lo <= v <= hi:
        raise at.error(f"{v} is outside [{lo}, {hi}]")
    return v


def number(v: Any, at: At) -> int | float:
    if type(v) is int and abs(v) <= MAX_COUNT:
        return v
    if type(v) is float and v == v and abs(v) != float("inf"):
        return v
    raise at.error(f"expected a finite number, got {_kind(v)}" + (f" {v}" if type(v) in (int, float) else ""))


def string(v: Any, at: At, choices: Sequence[str] | None = None, empty: bool = False) -> str:
    if not isinstance(v, str):
        raise at.error(f"expected a string, got {_kind(v)}")
    if (not v and not empty) or len(v) > MAX_STR:
        raise at.error(f"string of length {len(v)} (expected 1 to {MAX_STR} characters)")
    if choices is not None and v not in choices:
        raise at.error(f"{v!r} is not one of {sorted(choices)}")
    return v


def boolean(v: Any, at: At) -> bool:
    if type(v) is not bool:
        raise at.error(f"expected true or false, got {_kind(v)}")
    return v


def array(v: Any, at: At, item: Callable[[Any, At], T], max_len: int = MAX_LIST) -> tuple[T, ...]:
    if not isinstance(v, list):
        raise at.error(f"expected a list, got {_kind(v)}")
    if len(v) > max_len:
        raise at.error(f"{len(v)} entries (at most {max_len})")
    return tuple(item(x, at[i]) for i, x in enumerate(v))


def mapping(v: Any, at: At, item: Callable[[Any, At], T], max_len: int = MAX_LIST) -> dict[str, T]:
    if not isinstance(v, dict):
        raise at.error(f"expected an object, got {_kind(v)}")
    if len(v) > max_len:
        raise at.error(f"{len(v)} entries (at most {max_len})")
    out = {}
    for k, x in v.items():
        string(k, at[k])
        out[k] = item(x, at[k])
    return out


def flat_scalars(v: Any, at: At) -> dict[str, Any]:
    """An object of plain scalars (free-form notes): no nesting to walk."""
    def scalar(x: Any, a: At):
        if x is None or type(x) in (bool, str) or (type(x) in (int, float) and number(x, a) is not None):
            return x
        raise a.error(f"expected a plain value, got {_kind(x)}")
    return mapping(v, at, scalar, max_len=4096)


def plain_file_name(v: Any, at: At) -> str:
    """A file name inside the artifact folder: no separators, no '..', nothing hidden."""
    name = string(v, at)
    if "/" in name or "\\" in name or "\0" in name or name in (".", "..") or name.startswith("."):
        raise at.error(f"{name!r} is not a plain file name inside the artifact folder")
    return name


def unique(names: Sequence[str], at: At, what: str) -> None:
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            raise at[i].error(f"duplicate {what} {n!r}")
        seen.add(n)


def lookup(table: Mapping[str, T], key: str, at: At, what: str) -> T:
    if key not in table:
        raise at.error(f"unknown {what} {key!r}")
    return table[key]
