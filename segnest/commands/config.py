"""The command line's configuration layer: flags, recipes and presets -> one validated
settings dataclass per command. The command line (``segnest.cli``), the tools and the
training tasks' presets import it; the library (runtime, models, data, inference, engine)
never does: it takes the typed settings themselves (:mod:`segnest.schema`), whose field
names are the flags and the recipe (YAML) keys: ``--crop-size`` <-> ``crop_size``.
Defaults live in the settings classes and only there.

This module parses strings (``--scales 0.5,1.0`` -> ``(0.5, 1.0)``) and words every error
as the flag or the recipe key it came from.

Precedence, lowest first: dataclass defaults < dataset preset < recipe file (``--config``)
< flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.resources
import math
import os
import re
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from segnest.errors import SegnestError
from segnest.schema import (
    CONSTRAINTS,
    FlagNames,
    bounds_text,
    field_types,
    flag,
    item_type,
    validate,
)

if typing.TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+
    from importlib.resources.abc import Traversable


def renamed_keys(cls: type) -> dict[str, str]:
    """Old name -> current name of every renamed field of ``cls`` (flags and recipe keys)."""
    return {f.metadata["renamed_from"]: f.name for f in fields(cls) if "renamed_from" in f.metadata}


def warn_renamed(old: str, new: str, where: str) -> None:
    print(f"segnest: warning: {where} '{old}' is renamed '{new}'; the old name still works "
          "but will be removed", file=sys.stderr)


class _RenamedFlag(argparse.Action):
    """The old spelling of a renamed flag: sets the new field and says so once."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warn_renamed(option_string, "--" + self.dest.replace("_", "-"), "flag")
        setattr(namespace, self.dest, values)



HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("model", "backbone", "pretrained", "output_stride", "aux", "aux_weight",
              "head_channels", "stage_width", "stem_width", "dropblock_prob", "final_drop",
              "last_gamma", "in_channels", "loss", "ohem_thresh", "ohem_min_kept",
              "class_weights"),
    "data": ("dataset", "data_root", "config", "crop_size", "base_size", "scale_min",
             "scale_max", "cat_max_ratio", "photometric", "label_map", "mean", "std",
             "skip_bad_samples", "crop_pct", "auto_augment", "mixup", "cutmix",
             "label_smoothing", "workers"),
    "optimisation": ("iters", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                     "no_decay_norm", "head_lr_mult", "poly_power", "min_lr", "warmup_iters",
                     "warmup_epochs", "seed"),
    "checkpoints": ("work_dir", "resume", "overwrite", "checkpoint_interval",
                    "keep_checkpoints", "export", "val_interval", "val_samples"),
    "logging": ("log_interval", "panels", "tensorboard"),
    "hardware": ("device", "precision", "amp", "compile", "checkpoint_activations"),
    "detection": ("train_ann", "train_images", "val_ann", "val_images", "train_min_size",
                  "test_min_size", "max_size", "detector_width", "roi_batch_size"),
}


def _help_sections(parser: argparse.ArgumentParser, names: list[str]
                   ) -> dict[str, argparse._ArgumentGroup]:
    """field name -> the --help section it is listed in (sections made in HELP_GROUPS'
    order, only those with fields)."""
    where: dict[str, argparse._ArgumentGroup] = {}
    for title, members in (*HELP_GROUPS.items(), ("other", tuple(names))):
        present = [name for name in names if name in members and name not in where]
        if present:
            group = parser.add_argument_group(title)
            where.update(dict.fromkeys(present, group))
    return where


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
) -> None:
    """One ``--flag-name`` per field. Defaults are suppressed so that only what the user
    typed overrides the recipe and the presets; a renamed field also takes its old flag.
    The help shows a field's allowed values; they are checked by :func:`validate_config`
    (not by argparse), so that a flag and a recipe key fail alike, in one line. Flags are
    listed in the sections of :data:`HELP_GROUPS`."""
    sections = _help_sections(parser, [f.name for f in fields(cls) if f.name not in skip])
    for f in fields(cls):
        if f.name in skip:
            continue
        tp = field_types(cls)[f.name][0]
        listed = item_type(tp) is not None
        if listed:  # a tuple is typed as comma-separated text: parse_setting reads it
            tp = str
        meta = {k: v for k, v in f.metadata.items() if k not in CONSTRAINTS}
        required = meta.pop("required", False)
        old_name = meta.pop("renamed_from", None)
        const = meta.pop("const", None)
        meta.pop("default_shown", None)
        bounds = bounds_text(f.metadata)
        if bounds:
            meta["help"] += f" [{bounds}]"
        if "pattern" in f.metadata:
            meta["help"] += f" [{f.metadata['pattern'][1]}]"
        if not required:
            meta["help"] += _default_text(f, cls)
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, **meta)
        if required:
            kwargs["required"] = True
        if const is not None:
            kwargs.update(nargs="?", const=const)
        if tp is bool:
            # --no-decay-norm, never --no-no-decay-norm: a negative flag only switches on.
            kwargs["action"] = ("store_true" if f.name.startswith("no_")
                                else argparse.BooleanOptionalAction)
        else:
            kwargs["type"] = tp
            kwargs["metavar"] = f.name.upper() if tp is str else tp.__name__.upper()
            if "choices" in f.metadata and not listed:
                kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        sections[f.name].add_argument(flag(f.name), **kwargs)
        if old_name is not None and tp is not bool:
            parser.add_argument(flag(old_name), dest=f.name, type=tp,
                                default=argparse.SUPPRESS, action=_RenamedFlag,
                                help=argparse.SUPPRESS)


def _default_text(f: dataclasses.Field, cls: type) -> str:
    """`` (default: X)`` for a flag's help, from the field's default (argparse cannot show
    it: the parser's defaults are suppressed); nothing where the help already names the
    default. The ``--dataset`` presets that change a value are named with theirs."""
    if "default" in f.metadata.get("help", "").lower():
        return ""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value is None:
        shown = "none"
    elif isinstance(value, bool):
        shown = "on" if value else "off"
    elif isinstance(value, list | tuple):
        if not value:
            return ""
        shown = ",".join(map(str, value))
    else:
        shown = str(value)
    presets = getattr(cls, "help_presets", {})
    # The number each preset uses, e.g. "2; mini: 8" or, with no built-in value,
    # "ade20k: 180; cityscapes: 240; folder: 50".
    changed = [f"{name}: {_shown(preset[f.name])}" for name, preset in presets.items()
               if preset.get(f.name, value) != value]
    if "default_shown" in f.metadata:  # a default computed by the run, as a number
        shown = "; ".join([f.metadata["default_shown"], *changed])
    elif value is None and changed:
        shown = "; ".join(changed)
    else:
        shown = "; ".join([shown, *changed])
    return f" (default: {shown})".replace("%", "%%")


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


class _RecipeLoader(yaml.SafeLoader):
    """YAML as PyYAML reads it, except that ``1e-3`` is a number (as in YAML 1.2) rather
    than the string YAML 1.1 makes of an exponent without a dot. Quoted values stay text."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


# --------------------------------------------------------------------------- recipes
# The published recipes ship inside the package (segnest/recipes/<name>.yaml, package data
# in setup.cfg), so that ``--config <name>`` works after a plain ``pip install``.
RECIPE_FOLDER = "recipes"
# Keys that describe a recipe for people and ``segnest recipes``; they are not flags.
RECIPE_INFO_KEYS = ("target", "hardware", "reference", "notes")


def packaged_recipes() -> dict[str, Traversable]:
    """Name -> file of every recipe shipped in the package, sorted by name."""
    folder = importlib.resources.files("segnest") / RECIPE_FOLDER
    files = [f for f in folder.iterdir() if f.name.endswith(".yaml")] if folder.is_dir() else []
    return {f.name[: -len(".yaml")]: f for f in sorted(files, key=lambda f: f.name)}


def find_recipe(name: str | Path) -> tuple[str, str]:
    """``(how messages name it, its YAML text)`` for ``--config name``: a path that exists is
    that file; otherwise a packaged recipe's name (``.yaml`` optional); otherwise a
    one-line error listing the packaged names."""
    path = Path(name)
    if path.is_file():
        return str(path), _recipe_text(path.read_bytes(), path)
    packaged = packaged_recipes()
    stem = str(name)[: -len(".yaml")] if str(name).endswith(".yaml") else str(name)
    if stem in packaged:
        return stem, _recipe_text(packaged[stem].read_bytes(), stem)
    raise SegnestError(f"recipe {name} not found: no such file and no packaged recipe of that "
                       f"name; packaged recipes: {', '.join(packaged)} ('segnest recipes' "
                       "describes them)")


def _recipe_text(data: bytes, label: str | Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SegnestError(
            f"recipe {label} is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8, or 'Save as UTF-8' in an editor)") from err


def _note_unused_copy(name: str | Path) -> None:
    """``--config NAME`` means the packaged recipe even beside a ``NAME.yaml``; say so,
    so that an edited copy of that name never goes unused in silence."""
    _note_unused_copy_once(str(name), os.getcwd())


@functools.cache
def _note_unused_copy_once(name: str, folder: str) -> None:
    # Once per name and working folder (where the copy is looked for) in a process:
    # segnest train resolves its flags twice, the first time for its presets.
    copy = Path(f"{name}.yaml")
    if not Path(name).is_file() and str(name) in packaged_recipes() and copy.is_file():
        print(f"recipe: using the packaged recipe {name}, not your copy {copy}; pass "
              f"--config {copy} to use the copy", file=sys.stderr)


def read_recipe(name: str | Path) -> tuple[str, dict[str, Any]]:
    """``(how messages name it, its keys and values as written)``, info keys included."""
    label, text = find_recipe(name)
    try:
        data = yaml.load(text, Loader=_RecipeLoader) or {}
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())
        raise SegnestError(f"recipe {label} is not valid YAML: {problem}") from err
    if not isinstance(data, dict):
        raise SegnestError(f"recipe {label} must be a mapping of flag names to values")
    return label, data


def load_recipe(path: str | Path, cls: type) -> dict[str, Any]:
    """The flags a recipe (a file or a packaged name, :func:`find_recipe`) sets for ``cls``."""
    path, data = read_recipe(path)
    data = {str(k).replace("-", "_"): v for k, v in data.items()
            if k not in RECIPE_INFO_KEYS}
    for old, new in renamed_keys(cls).items():
        if old in data:
            warn_renamed(old, new, f"recipe {path}: key")
            data.setdefault(new, data.pop(old))
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SegnestError(
            f"recipe {path}: unknown key(s) {', '.join(unknown)}; valid keys are the flags of "
            f"this command ({', '.join(sorted(known))})"
        )
    if "config" in data:
        raise SegnestError(f"recipe {path}: a recipe cannot name another recipe (key config); "
                           "copy the keys you need into this one")
    return data


# --------------------------------------------------------------------------- validation



# --------------------------------------------------------------------------- parsing


def parse_scales(text: str, flag: str = "--scales") -> tuple[float, ...]:
    """``"0.5,0.75,1"`` -> ``(0.5, 0.75, 1.0)``; anything else is a SegnestError naming the flag."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    try:
        scales = tuple(float(part) for part in parts)
    except ValueError:
        scales = ()
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise SegnestError(
            f"{flag} {text!r} is not a list of positive numbers; write e.g. {flag} 0.5,0.75,1.0"
        )
    return scales


def parse_names(text: str, choices: tuple[str, ...], flag: str) -> tuple[str, ...]:
    """``"pointwise,dense"`` -> ``("pointwise", "dense")``, each one of ``choices``."""
    names = tuple(dict.fromkeys(part.strip() for part in str(text).split(",") if part.strip()))
    unknown = [name for name in names if name not in choices]
    if not names or unknown:
        raise SegnestError(f"{flag} {text!r} must list one or more of {','.join(choices)}; "
                           f"write e.g. {flag} {','.join(choices[:2])}")
    return names


def parse_layer_types(text: str, flag: str = "--layer-types") -> tuple[str, ...]:
    """``"pointwise,dense"`` -> ``("pointwise", "dense")``, each one of QUANTIZE_LAYER_TYPES."""
    from segnest.inference.config import QUANTIZE_LAYER_TYPES

    return parse_names(text, QUANTIZE_LAYER_TYPES, flag)


def parse_setting(cls: type, name: str, value: Any) -> Any:
    """A flag's or recipe's value as field ``name`` of ``cls`` takes it: comma-separated
    text becomes the tuple a tuple field holds (``--scales 0.5,1.0``); other values pass
    unchanged (:func:`validate_config` checks them)."""
    tp = field_types(cls)[name][0] if name in field_types(cls) else None
    if not isinstance(value, str) or item_type(tp) is None:
        return value
    if item_type(tp) is float:
        return parse_scales(value, flag(name))
    meta = next(f.metadata for f in fields(cls) if f.name == name)
    return parse_names(value, tuple(meta.get("choices", ())), flag(name))


# --------------------------------------------------------------------------- validation


def validate_config(cfg: Any, sources: typing.Mapping[str, str] | None = None) -> Any:
    """``cfg`` validated (:func:`segnest.schema.validate`) with its problems named as the
    flag, or as the recipe or preset key ``sources`` names (field -> "recipe r.yaml")."""
    return validate(cfg, FlagNames(sources))


def resolve_config(
    cls: type, cli: dict[str, Any], presets: dict[str, dict[str, Any]] | None = None
):
    """Merge defaults < dataset preset < recipe < command line into one ``cls`` instance,
    validated before any work (:func:`validate_config`)."""
    recipe_path = cli.get("config")
    recipe = load_recipe(recipe_path, cls) if recipe_path else {}
    known = {f.name for f in fields(cls)}
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    dataset = cli.get("dataset") or recipe.get("dataset")
    if presets is not None:
        dataset = dataset or next(f.default for f in fields(cls) if f.name == "dataset")
        preset = presets.get(dataset, {}) if isinstance(dataset, str) else {}
        merged.update({k: v for k, v in preset.items() if k in known})
        sources.update({k: f"the {dataset} preset" for k in merged})
    merged.update(recipe)
    recipe_label = find_recipe(recipe_path)[0] if recipe_path else None
    if recipe_path:
        _note_unused_copy(recipe_path)
    sources.update({k: f"recipe {recipe_label}" for k in recipe})
    merged.update(cli)
    for k in cli:
        sources.pop(k, None)
    unknown = sorted(set(merged) - known)
    if unknown:
        raise SegnestError(f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}")
    merged = {name: parse_setting(cls, name, value) for name, value in merged.items()}
    return validate_config(cls(**merged), sources)
