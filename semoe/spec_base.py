"""Base class for the frozen, keyword-only, self-validating specs of the testbed.

Every spec is a ``@dataclass(frozen=True, kw_only=True)`` deriving from :class:`Spec`. On construction
it checks the type of every field (ints are not bools, floats accept ints, ``Literal`` choices,
``Optional``, tuples, nested specs), then calls the spec's own ``validate()``. Every failure is a
:class:`SpecError` whose message names the field and the rule, e.g.
``ModelSpec.top_k: top_k (9) must be <= experts (8)``.

Specs round-trip through plain dicts and YAML (``to_dict``/``from_dict``, ``to_yaml``/``from_yaml``);
unknown keys are errors, missing keys take the field default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

T = TypeVar("T", bound="Spec")


class SpecError(ValueError):
    """An invalid spec value, a bad YAML file, or an unknown preset. The message names the field."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class Spec:
    """Mixin for the testbed's specs: typed fields, validation, dict/YAML round-trip."""

    # Subclasses list cross-field rules in validate(); _check raises a SpecError naming the field.
    _hints_cache: ClassVar[dict[type, dict[str, Any]]] = {}

    # ------------------------------------------------------------------ construction-time checks
    def __post_init__(self) -> None:
        hints = self._hints()
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            coerced = self._coerce(f.name, hints[f.name], value)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        """Cross-field rules; raise through :meth:`fail`."""

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        if cls not in Spec._hints_cache:
            Spec._hints_cache[cls] = typing.get_type_hints(cls)
        return Spec._hints_cache[cls]

    def fail(self, field: str, rule: str) -> typing.NoReturn:
        raise SpecError(f"{type(self).__name__}.{field}: {rule}")

    def _coerce(self, name: str, tp: Any, value: Any) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            for arg in args:
                if arg is type(None):
                    continue
                try:
                    return self._coerce(name, arg, value)
                except SpecError:
                    pass
            self.fail(name, f"{value!r} is not a valid {_type_name(tp)}")
        if origin is Literal:
            if value not in args:
                choices = ", ".join(repr(a) for a in args)
                self.fail(name, f"{value!r} is not one of {choices}")
            return value
        if origin is tuple:
            if isinstance(value, list):
                value = tuple(value)
            if not isinstance(value, tuple):
                self.fail(name, f"expected a list, got {type(value).__name__} {value!r}")
            item_tp = args[0] if args else Any
            return tuple(self._coerce(f"{name}[{i}]", item_tp, v) for i, v in enumerate(value))
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if isinstance(value, tp):
                return value
            if isinstance(value, dict):
                try:
                    return tp.from_dict(value)
                except SpecError as e:
                    raise SpecError(f"{type(self).__name__}.{name}.{e}") from None
            self.fail(name, f"expected a mapping for {tp.__name__}, got {type(value).__name__}")
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(name, f"expected true/false, got {type(value).__name__} {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(name, f"expected an integer, got {type(value).__name__} {value!r}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(name, f"expected a number, got {type(value).__name__} {value!r}")
            if value != value or value in (float("inf"), float("-inf")):
                self.fail(name, f"expected a finite number, got {value!r}")
            return float(value) if isinstance(value, int) else value
        if tp is str:
            if not isinstance(value, str):
                self.fail(name, f"expected a string, got {type(value).__name__} {value!r}")
            return value
        raise TypeError(f"unsupported spec field type {tp!r} for {name}")  # programming error

    # ---------------------------------------------------------------- helpers for validate()
    def require_positive(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if v is not None and v <= 0:
                self.fail(n, f"{n} ({v}) must be > 0")

    def require_non_negative(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if v is not None and v < 0:
                self.fail(n, f"{n} ({v}) must be >= 0")

    # ---------------------------------------------------------------------------- round trip
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Spec):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = [x.to_dict() if isinstance(x, Spec) else x for x in v]
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        if not isinstance(data, dict):
            raise SpecError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(map(str, data)) - names)
        if unknown:
            raise SpecError(
                f"{cls.__name__}: unknown key(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(names))}"
            )
        try:
            return cls(**data)
        except TypeError as e:  # a required field is missing
            missing = [
                f.name
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.name not in data
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ]
            if missing:
                raise SpecError(f"{cls.__name__}: missing required key(s) {', '.join(missing)}") from None
            raise SpecError(f"{cls.__name__}: {e}") from None

    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            from semoe.io import atomic_write_text

            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls: type[T], source: str | Path) -> T:
        """Load from a YAML file path, or from YAML text (a string containing a newline or ':')."""
        import yaml

        if isinstance(source, Path) or ("\n" not in source and ":" not in source):
            path = Path(source)
            if not path.is_file():
                raise SpecError(f"{cls.__name__}: file not found: {path}")
            text = path.read_text()
        else:
            text = source
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpecError(f"{cls.__name__}: invalid YAML: {str(e).splitlines()[0]}") from None
        return cls.from_dict(data)

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
