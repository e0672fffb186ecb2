"""Typed reads of a JSON document (a manifest): each value checked as it is read, errors naming the
document and the key path in one line."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from ple_export.errors import UserError

T = TypeVar("T")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and v == v and abs(v) < 1e18


_KINDS: dict[str, Any] = {
    "int": lambda v: is_int(v) and abs(v) < 1 << 62,
    "count": lambda v: is_int(v) and 0 <= v < 1 << 62,
    "positive": lambda v: is_int(v) and 0 < v < 1 << 62,
    "number": _is_number,
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
}
_ABSENT: Any = object()


class Doc:
    """Typed reads of one JSON object of the manifest; errors name the manifest and the key path."""

    def __init__(self, node: Mapping[str, Any], where: str, prefix: str = ""):
        self.node, self.where, self.prefix = node, where, prefix

    def fail(self, key: str, message: str) -> UserError:
        return UserError(f"{self.where}: malformed manifest, {self.prefix + key!r} {message}")

    def get(self, key: str, kind: str, default: Any = _ABSENT, nullable: bool = False) -> Any:
        if key not in self.node:
            if default is _ABSENT:
                raise UserError(f"{self.where}: malformed manifest, missing {self.prefix + key!r}")
            return default
        value = self.node[key]
        if value is None and nullable:
            return None
        if not _KINDS[kind](value):
            raise self.fail(key, f"must be a {kind}, got {value!r:.60}")
        return value

    def obj(self, key: str) -> Doc:
        return Doc(self.get(key, "dict"), self.where, f"{self.prefix}{key}.")

    def optional(self, key: str) -> Doc | None:
        value = self.get(key, "dict", None, nullable=True)
        return None if value is None else Doc(value, self.where, f"{self.prefix}{key}.")

    def items(self, key: str, default: Any = _ABSENT) -> Iterator[Doc]:
        """The entries of a list of objects."""
        for i, entry in enumerate(self.get(key, "list", default) or []):
            if not isinstance(entry, dict):
                raise self.fail(f"{key}[{i}]", f"must be an object, got {entry!r:.60}")
            yield Doc(entry, self.where, f"{self.prefix}{key}[{i}].")

    def enum(self, key: str, kind: type[T]) -> T:
        value = self.get(key, "str")
        try:
            return kind(value)  # type: ignore[call-arg]
        except ValueError:
            allowed = ", ".join(str(v) for v in kind)  # type: ignore[attr-defined]
            raise self.fail(key, f"{value!r:.60} is not one of {allowed}") from None
