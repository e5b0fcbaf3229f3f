"""Declared settings: a settings dataclass states, next to each field's default, its help
text and what the value may be (:func:`help_`); :func:`validate` checks an instance against
those declarations and the class's cross-field rules (``checks``), in Python terms.

Every command's settings are such a dataclass (``segnest.engine.config``, the tasks'
``config.py``, ``segnest.inference.config``, ``segnest.tools.config``); a library caller
builds one with typed Python values and gets errors that name the field
(``batch_size=0 is out of range``). The command line (:mod:`segnest.commands.config`) reads
the same declarations to build its flags, parses strings into these types and words the
same errors as flags (``--batch-size 0 is out of range``) by passing its own :class:`Names`.

This module is imported by the command line before anything else, so it imports no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from segnest.errors import SegnestError

# Field metadata keys that constrain a value (see ``help_``); the other keys shape a flag.
CONSTRAINTS = ("min", "above", "max", "below", "choices", "pattern")

# Value ranges several commands' settings share.
# The smallest training crop and example input: ResNeSt's total stride is 32, so a smaller
# image leaves the last stage (and a classifier's pooling) a single pixel or less. Such a
# run "works" and learns nothing; it is refused instead.
MIN_INPUT_SIZE = 32
# --precision: float32, bf16 or fp16 autocast, or the fastest native one (runtime/precision.py).
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
PRECISION_HELP = ("number format: fp32, bf16 or fp16 autocast (weights, loss, softmax and "
                  "metrics stay fp32), or auto: the fastest this hardware runs natively "
                  "(bf16 on a CPU with AVX512-BF16/AMX or a recent GPU, fp16 on an older GPU, "
                  "else fp32)")
DEVICE = (r"cpu|cuda(:\d+)?", "cpu, cuda or cuda:N")
DEVICE_HELP = "device (default: cuda if present)"


def help_(text: str, **extra: Any) -> dict[str, Any]:
    """A field's metadata: its help text and what the value may be, declared next to its
    default and checked by :func:`validate`:

    ``min`` / ``max``: inclusive bounds; ``above`` / ``below``: exclusive bounds (of the
    value, or of each item of a tuple); ``choices``: the allowed values (of each item of a
    tuple); ``pattern``: (regular expression, how to write it).
    Other keys (``required``, ``renamed_from``, ``const``) shape the command-line flag;
    ``default_shown`` is the default --help shows where the run computes it (a number and
    its rule).
    """
    return {"help": text, **extra}


class Names:
    """How an error names a value. This one speaks to Python callers (``scales=[0.5, -1]``);
    the command line's subclass names flags and recipe keys."""

    def show(self, name: str, value: Any) -> str:
        return f"{self.name(name)}={value!r}"

    def name(self, name: str) -> str:
        return name


class FlagNames(Names):
    """How the command line names a value: the flag as typed (``--lr -1.0``) unless it
    came from a recipe or a preset, which are named with the key (``lr: -1.0 in recipe
    r.yaml``). ``sources``: field -> where its value came from."""

    def __init__(self, sources: Mapping[str, str] | None = None) -> None:
        self.sources = dict(sources or {})

    def show(self, name: str, value: Any) -> str:
        if isinstance(value, str):
            shown = repr(value)
        elif value is None or isinstance(value, bool):
            shown = {None: "null", True: "true", False: "false"}[value]
        elif isinstance(value, tuple | list):
            shown = ",".join(map(str, value))
        else:
            shown = str(value)
        source = self.sources.get(name)
        return f"{name}: {shown} in {source}" if source else f"{self.name(name)} {shown}"

    def name(self, name: str) -> str:
        return flag(name)


def flag(name: str) -> str:
    """The command-line flag of field ``name``: ``crop_size`` -> ``--crop-size``."""
    return "--" + name.replace("_", "-")


# A cross-field rule: raises a one-line SegnestError naming the values involved. A settings
# class lists its own in a ``checks`` class attribute; subclasses inherit their bases'.
Check = Callable[[Any, Names], None]


@functools.cache
def field_types(owner: type) -> dict[str, tuple[Any, bool]]:
    """Field name -> (type without ``None``, whether ``None`` is allowed)."""
    out = {}
    for name, tp in typing.get_type_hints(owner).items():
        optional = False
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            args = typing.get_args(tp)
            optional = type(None) in args
            tp = next(a for a in args if a is not type(None))
        out[name] = (tp, optional)
    return out


def item_type(tp: Any) -> Any:
    """The item type of ``tuple[X, ...]``; None for any other type."""
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)[0]
    return None


def bounds_text(meta: Mapping[str, Any]) -> str | None:
    """``">= 0 and < 1"`` from a field's bounds; None when it has none."""
    parts = [f"{op} {meta[key]}" for key, op in
             (("min", ">="), ("above", ">"), ("max", "<="), ("below", "<")) if key in meta]
    return " and ".join(parts) or None


def _typed(name: str, value: Any, tp: Any, optional: bool, names: Names) -> Any:
    """``value`` as the field's type, or a SegnestError: nothing is truncated, nothing
    truthy-converted. An int field takes an integral float (``1e4`` -> 10000); a float field
    takes an int; text is never read as a number or a boolean."""
    what = names.show(name, value)
    if value is None:
        if optional:
            return None
        raise SegnestError(f"{what} needs a value; remove the key to use the default")
    if isinstance(value, str) and tp is bool:
        raise SegnestError(f"{what} is text, not true or false; write true or false without "
                           "quotes")
    if isinstance(value, str) and tp in (int, float):
        raise SegnestError(f"{what} is text, not a number; write it without quotes")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SegnestError(f"{what} is not a boolean; write true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise SegnestError(f"{what} is not a whole number; write one such as 2")
        if not isinstance(value, numbers.Integral):  # a float (or NumPy's) of a whole value
            value = float(value)
            if not math.isfinite(value):
                raise SegnestError(f"{what} is not a finite number; write a whole number")
            if not value.is_integer():
                raise SegnestError(f"{what} is not a whole number; write {math.floor(value)} "
                                   f"or {math.ceil(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise SegnestError(f"{what} is not a number; write one such as 0.01")
        if not math.isfinite(value):
            raise SegnestError(f"{what} is not a finite number; write one such as 0.01")
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and all(isinstance(k, int) and isinstance(v, int)
                                           for k, v in value.items()):
            # A recipe's mapping for a "k:v,k:v" flag (label_map: {255: 1}).
            return ",".join(f"{key}:{item}" for key, item in value.items())
        raise SegnestError(f"{what} is not text; put it in quotes")
    if item_type(tp) is not None:
        items = _items(value)
        if item_type(tp) is float:
            if not items or any(isinstance(v, bool) or not isinstance(v, numbers.Real)
                                or not math.isfinite(v) for v in items):
                raise SegnestError(f"{what} is not a sequence of finite numbers; give one "
                                   "such as (0.5, 1.0)")
            return tuple(float(v) for v in items)
        if not items or not all(isinstance(v, str) for v in items):
            raise SegnestError(f"{what} is not a sequence of names; give one such as "
                               "('a', 'b')")
        return tuple(dict.fromkeys(items))
    if typing.get_origin(tp) is list:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
        raise SegnestError(f"{what} is not a list of text")
    return value


def _items(value: Any) -> list[Any] | None:
    """The items of a list, tuple or array; None for text, a mapping or a single value."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        return None
    try:
        return list(value)
    except TypeError:  # a 0-d array
        return None


def _in_range(name: str, value: Any, meta: Mapping[str, Any], names: Names) -> None:
    if value is None:
        return
    what = names.show(name, value)
    items = value if isinstance(value, tuple) else (value,)
    if "choices" in meta:
        wrong = [item for item in items if item not in meta["choices"]]
        if wrong:
            shown = "" if len(items) == 1 else f" ({wrong[0]!r})"
            raise SegnestError(f"{what}{shown} is not one of "
                               f"{', '.join(map(str, meta['choices']))}; pick one of those")
    if "pattern" in meta and not re.fullmatch(meta["pattern"][0], value):
        raise SegnestError(f"{what} is not a device; use {meta['pattern'][1]}")
    bounds = bounds_text(meta)
    if bounds and not all(item >= meta.get("min", -math.inf)
                          and item > meta.get("above", -math.inf)
                          and item <= meta.get("max", math.inf)
                          and item < meta.get("below", math.inf) for item in items):
        kind = "a whole number" if isinstance(items[0], int) else "a number"
        if isinstance(value, tuple):
            raise SegnestError(f"{what} is out of range; every item must be {kind} {bounds}")
        raise SegnestError(f"{what} is out of range; use {kind} {bounds}")


def validate(settings: Any, names: Names | None = None) -> Any:
    """``settings`` with every value type-checked, range-checked (the field's ``help_``
    constraints) and cross-checked (the ``checks`` of its class, then of its bases), or the first
    problem as a one-line SegnestError worded by ``names`` (default: in Python terms).
    Returns a copy whose values have the field types (``1e4`` for an int field becomes
    10000, a list of scales a tuple of floats)."""
    cls, names = type(settings), names or Names()
    typed = {}
    for f in dataclasses.fields(cls):
        tp, optional = field_types(cls)[f.name]
        value = _typed(f.name, getattr(settings, f.name), tp, optional, names)
        _in_range(f.name, value, f.metadata, names)
        typed[f.name] = value
    settings = dataclasses.replace(settings, **typed)
    for owner in cls.__mro__:  # a class's own rules before its bases'
        for check in vars(owner).get("checks", ()):
            check(settings, names)
    return settings


def default_of(cls: type, name: str) -> Any:
    """The declared default of field ``name`` of dataclass ``cls``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
