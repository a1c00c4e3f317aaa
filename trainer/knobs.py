"""The training knobs: every settable ``TrainConfig`` and ``ModelConfig`` field, once.

``dnc train``'s flags, the pipeline config's ``trainer:`` section and the benchmarks'
flags are all derived from :func:`knobs`, which is derived from the dataclass fields:
the name and type come from the field and its annotation, the help text from the
class's ``Attributes:`` docstring section, the choices of a string field from the
``trainer.config`` constant named after it (``loss`` -> ``LOSSES``, ``training`` ->
``TRAININGS``). Written here is only what the fields cannot say: the documented flag
aliases (``--dim`` for ``embedding_dim``, ...), negated flags
(``--separate-item-embeddings``) and the fields that are not knobs.

A knob value of ``None`` means "not given": the field takes the regime of the variant
under the preset (``trainer.config.make_train_config``). A field that may be None
(``steps_per_epoch``, ``eval_users``) takes :data:`NONE` (``none``, or ``all``, on the
command line and in config files) for an explicit None.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import typing
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Tuple

from trainer import config as _config
from trainer.config import PRESETS, VARIANTS, ModelConfig, TrainConfig, make_train_config

# Explicit None of an optional field (None itself means "not given").
NONE = "none"
_NONE_WORDS = ("none", "all")

# TrainConfig fields that are not knobs, and where they are set instead.
NOT_KNOBS: Mapping[str, str] = {
    "data": "dnc train --data; the pipeline passes the Transform output",
    "output": "dnc train --output; the pipeline passes the Trainer's output directory",
    "variant": "dnc train --variant; the pipeline's trainer.variants (it selects the regime)",
    "model": "a ModelConfig: its fields are knobs (config files: trainer.model.<field>)",
}
# Documented short flags, listed before the field's own flag.
_ALIASES: Mapping[str, Tuple[str, ...]] = {
    "embedding_dim": ("--dim",),
    "num_blocks": ("--blocks",),
    "num_heads": ("--heads",),
}
# Flags that set a boolean field to False.
_NEGATIONS: Mapping[str, str] = {"share_item_embeddings": "--separate-item-embeddings"}

KINDS = ("int", "float", "str", "bool", "ints")


@dataclasses.dataclass(frozen=True)
class Knob:
    """One settable field of ``TrainConfig`` or ``ModelConfig``.

    Attributes:
        name: the field name (also the config-file key).
        model: a ``ModelConfig`` field (config files: ``trainer.model.<name>``).
        kind: ``int``, ``float``, ``str``, ``bool`` or ``ints`` (a tuple of ints).
        optional: the field accepts None (given as :data:`NONE`).
        flags: command-line flags, the documented ones first.
        dest: the ``argparse`` destination (the first flag's name: ``dim``).
        choices: the accepted values of a ``str`` knob.
        help: the field's description.
        negation: a flag that sets a ``bool`` knob to False.
    """

    name: str
    model: bool
    kind: str
    optional: bool
    flags: Tuple[str, ...]
    dest: str
    choices: Optional[Tuple[str, ...]]
    help: str
    negation: Optional[str] = None

    @property
    def key(self) -> str:
        """The dotted config key below ``trainer``: ``loss``, ``model.max_len``."""
        return f"model.{self.name}" if self.model else self.name

    def parse(self, text: str) -> Any:
        """A command-line string as this knob's value.

        Raises:
            argparse.ArgumentTypeError: naming the bad value.
        """
        if self.optional and text.strip().lower() in _NONE_WORDS:
            return NONE
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text)
            if self.kind == "ints":
                values = tuple(int(v) for v in text.split(",") if v.strip())
                if not values:
                    raise ValueError(text)
                return values
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"{self.flags[0]}: expected {self._expected()}, got {text!r}"
            ) from e
        return text

    def convert(self, value: Any, key: str) -> Any:
        """A config-file value (YAML/TOML data) as this knob's value; None stays None.

        Args:
            value: the parsed file's value.
            key: the dotted key, for the error message.

        Raises:
            ValueError: naming ``key`` and the bad value.
        """
        if value is None:
            return None
        if self.optional and isinstance(value, str) and value.lower() in _NONE_WORDS:
            return NONE
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind == "int" and number and type(value) is int:
            return value
        if self.kind == "float" and number:
            return float(value)
        if self.kind == "bool" and isinstance(value, bool):
            return value
        if self.kind == "str" and isinstance(value, str):
            if self.choices and value not in self.choices:
                raise ValueError(f"{key}: {value!r} is not one of {self.choices}")
            return value
        if self.kind == "ints" and isinstance(value, (list, tuple)) and value:
            if all(type(v) is int for v in value):
                return tuple(value)
        raise ValueError(f"{key}: expected {self._expected()}, got {value!r}")

    def _expected(self) -> str:
        kind = {"ints": "a list of integers", "int": "an integer", "float": "a number"}
        text = kind.get(self.kind, self.kind)
        return f"{text} or {NONE!r}" if self.optional else text


# --------------------------------------------------------------------------- derivation


def docstring_attributes(cls: type) -> Dict[str, str]:
    """Field name -> description, from the ``Attributes:`` section of ``cls``'s docstring."""
    doc = cls.__doc__ or ""
    match = re.search(r"Attributes:\n(.*)", doc, re.S)
    if not match:
        return {}
    out: Dict[str, str] = {}
    current = None
    for line in match.group(1).splitlines():
        m = re.match(r"\s{4,8}(\w+): (.*)", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


def _kind(hint: Any, name: str) -> Tuple[str, bool]:
    optional = False
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0]
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[:1] == (int,):
        return "ints", optional
    for kind in (bool, int, float, str):  # bool before int
        if hint is kind:
            return kind.__name__, optional
    raise TypeError(f"knob {name}: unsupported field type {hint!r}; extend trainer.knobs")


def _choices(name: str) -> Optional[Tuple[str, ...]]:
    for suffix in ("S", "ES"):
        value = getattr(_config, name.upper() + suffix, None)
        if isinstance(value, tuple) and value:
            return value
    return None


def _knobs_of(cls: type, model: bool) -> List[Knob]:
    hints = typing.get_type_hints(cls)
    docs = docstring_attributes(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not model and f.name in NOT_KNOBS:
            continue
        kind, optional = _kind(hints[f.name], f.name)
        flags = (*_ALIASES.get(f.name, ()), "--" + f.name.replace("_", "-"))
        out.append(
            Knob(
                name=f.name,
                model=model,
                kind=kind,
                optional=optional,
                flags=flags,
                dest=flags[0][2:].replace("-", "_"),
                choices=_choices(f.name) if kind == "str" else None,
                help=docs.get(f.name, ""),
                negation=_NEGATIONS.get(f.name),
            )
        )
    return out


@functools.cache
def knobs() -> Tuple[Knob, ...]:
    """Every knob: the ``TrainConfig`` fields but :data:`NOT_KNOBS`, then ``ModelConfig``'s."""
    out = (*_knobs_of(TrainConfig, model=False), *_knobs_of(ModelConfig, model=True))
    names = [k.name for k in out]
    if len(set(names)) != len(names):
        raise TypeError(f"TrainConfig and ModelConfig share a field name: {names}")
    return out


def knob(name: str) -> Knob:
    """The knob of field ``name``."""
    for k in knobs():
        if k.name == name:
            return k
    raise ValueError(f"unknown knob {name!r}; expected one of {[k.name for k in knobs()]}")


# --------------------------------------------------------------------------- configs


def build_config(
    data: str,
    output: str,
    variant: str,
    preset: str = "default",
    values: Optional[Mapping[str, Any]] = None,
) -> TrainConfig:
    """The ``TrainConfig`` of ``variant`` under ``preset`` with the given knob values.

    Args:
        data, output, variant, preset: as in ``trainer.config.make_train_config``.
        values: knob name -> value, ``ModelConfig`` knobs included (``embedding_dim``);
            None is "not given" (the regime), :data:`NONE` an explicit None.

    Raises:
        ValueError: an unknown knob, or a value the config rejects.
    """
    values = dict(values or {})
    by_name = {k.name: k for k in knobs()}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ValueError(f"unknown knobs {unknown}; expected names from {sorted(by_name)}")
    nones = {n for n, v in values.items() if isinstance(v, str) and v == NONE}
    wrong = sorted(n for n in nones if not by_name[n].optional)
    if wrong:
        raise ValueError(f"knobs {wrong} cannot be {NONE!r} (None)")
    given = {n: v for n, v in values.items() if n not in nones}
    train = {n: v for n, v in given.items() if not by_name[n].model}
    model = {n: v for n, v in given.items() if by_name[n].model}
    config = make_train_config(data, output, variant, preset, model_overrides=model, **train)
    model_nones = {n: None for n in nones if by_name[n].model}
    if model_nones:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, **model_nones))
    train_nones = {n: None for n in nones if not by_name[n].model}
    if train_nones:
        config = dataclasses.replace(config, **train_nones)
    return config


def config_values(config: TrainConfig) -> Dict[str, Any]:
    """Knob name -> value of ``config`` (explicit None as :data:`NONE`)."""
    out = {}
    for k in knobs():
        value = getattr(config.model if k.model else config, k.name)
        out[k.name] = NONE if value is None else value
    return out


@functools.cache
def _regime_config(variant: str, preset: str) -> TrainConfig:
    return make_train_config("", "", variant, preset)


def regime_values(name: str, preset: str) -> Dict[Any, List[str]]:
    """Value of knob ``name`` in each variant's ``preset`` regime -> those variants."""
    k = knob(name)
    out: Dict[Any, List[str]] = {}
    for variant in VARIANTS:
        config = _regime_config(variant, preset)
        value = getattr(config.model if k.model else config, k.name)
        out.setdefault(value, []).append(variant)
    return out


def common_default(name: str, preset: str = "default") -> Any:
    """The value of knob ``name`` shared by every variant's regime (ValueError if none)."""
    values = regime_values(name, preset)
    if len(values) != 1:
        raise ValueError(f"knob {name!r} differs between the {preset} regimes: {values}")
    return next(iter(values))


def _show(value: Any) -> str:
    if value is None:
        return NONE
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def regime_help(name: str) -> str:
    """``regime: default: V; paper: W``: the knob's value in each preset (``--help``)."""
    parts = []
    for preset in PRESETS:
        values = regime_values(name, preset)
        if len(values) == 1:
            parts.append(f"{preset}: {_show(next(iter(values)))}")
        else:
            each = ", ".join(f"{_show(v)} for {'/'.join(vs)}" for v, vs in values.items())
            parts.append(f"{preset}: {each}")
    return "regime: " + "; ".join(parts)


# --------------------------------------------------------------------------- argparse


def add_arguments(
    parser: argparse.ArgumentParser,
    names: Optional[Collection[str]] = None,
    exclude: Collection[str] = (),
    defaults: Optional[Mapping[str, Any]] = None,
    show_regime: bool = True,
) -> None:
    """Adds one flag (with its aliases) per knob to ``parser``.

    Args:
        parser: the parser or argument group.
        names: the knobs to add (default: all).
        exclude: knobs not to add.
        defaults: knob name -> default value (default: None, "not given").
        show_regime: append each knob's regime values to its help.
    """
    defaults = defaults or {}
    for k in knobs():
        if (names is not None and k.name not in names) or k.name in exclude:
            continue
        text = k.help
        if show_regime:
            text = f"{text} [{regime_help(k.name)}]"
        text = text.replace("%", "%%")
        default = defaults.get(k.name)
        if k.kind == "bool":
            parser.add_argument(
                *k.flags,
                dest=k.dest,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=text,
            )
            if k.negation:
                parser.add_argument(
                    k.negation,
                    dest=k.dest,
                    action="store_const",
                    const=False,
                    help=f"same as --no-{k.name.replace('_', '-')}",
                )
            continue
        parser.add_argument(
            *k.flags,
            dest=k.dest,
            type=_typed(k),
            choices=k.choices,
            default=default,
            metavar=None if k.choices else k.name.upper(),
            help=text,
        )


def _typed(k: Knob) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return k.parse(text)

    parse.__name__ = k.kind
    return parse


def values_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """Knob name -> value of every knob ``args`` has a destination for."""
    return {k.name: getattr(args, k.dest) for k in knobs() if hasattr(args, k.dest)}
