"""Checks of single values in a YAML file, each failing with a ConfigError that
names the file and the key path (`gpus[0].services[1].kv_cache.budget`).

The deployment schema (colocate/config.py) is built from these; they know nothing
of services or devices, only of mappings, strings, numbers, sizes and files.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from colocate.sizes import parse_size


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class ConfigError(ValueError):
    """A deployment file that cannot be used; the message says where and why."""


class ValueReader:
    def __init__(self, file: Path, check_paths: bool) -> None:
        """file: the YAML file, for messages and relative paths. check_paths: files
        named in it must exist (off for `colocate plan`, which may run elsewhere)."""
        self.file = file
        self.check_paths = check_paths

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: {key or '(top level)'}: {problem}")

    def mapping(self, value: Any, key: str, required: tuple[str, ...],
                optional: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, got {kind(value)}")
        allowed = required + optional
        for k in value:
            if k not in allowed:
                hint = difflib.get_close_matches(str(k), allowed, n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else f"; expected one of {', '.join(allowed)}"
                raise self.error(join(key, k), f"unknown key{extra}")
        for k in required:
            if k not in value:
                raise self.error(join(key, k), "missing required key")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {kind(value)}")
        return value

    def choice(self, value: Any, key: str, choices: tuple) -> Any:
        if value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise self.error(key, f"{value!r} is not one of {shown}")
        return value

    def integer(self, value: Any, key: str, minimum: int = 1, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {kind(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise self.error(key, f"{value} is out of range; must be {bound}")
        return value

    def positive_number(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise self.error(key, f"expected a number > 0, got {value!r}")
        return float(value)

    def duration(self, value: Any, key: str) -> float:
        """Seconds > 0, from a number of seconds or a string like 500ms, 2s, 10m, 1h."""
        if isinstance(value, str):
            match = _DURATION_RE.fullmatch(value.strip())
            if match is None:
                raise self.error(key, f"bad duration {value!r}: expected a number with a "
                                      "unit (ms, s, m, h), like 30s or 10m")
            value = float(match[1]) * _DURATION_UNITS[match[2]]
        return self.positive_number(value, key)

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {kind(value)}")
        return value

    def size(self, value: Any, key: str, allow_zero: bool = False,
             maximum: int | None = None) -> int:
        try:
            n = parse_size(value)
        except ValueError as e:
            raise self.error(key, f"bad size: {e}") from None
        if n == 0 and not allow_zero:
            raise self.error(key, "size must be greater than zero")
        if maximum is not None and n > maximum:
            raise self.error(key, f"{n} bytes is too large; at most {maximum}")
        return n

    def resolve(self, path: str) -> Path:
        """An absolute path; a relative one is taken from the YAML file's folder, not
        the working directory, so a deployment folder can be moved as a whole."""
        resolved = Path(path).expanduser()
        return resolved if resolved.is_absolute() else self.file.resolve().parent / resolved

    def existing_file(self, value: Any, key: str) -> str:
        path = self.resolve(self.string(value, key))
        if self.check_paths and not path.is_file():
            raise self.error(key, f"file {path} does not exist")
        return str(path)


def join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def kind(value: Any) -> str:
    """How a wrong value reads in a message: its YAML-ish type and the value itself."""
    names = {dict: "mapping", list: "list", str: "string", bool: "boolean",
             int: "integer", float: "number", type(None): "null"}
    return f"{names.get(type(value), type(value).__name__)} {value!r}"
