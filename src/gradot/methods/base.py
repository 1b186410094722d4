"""What a compression method is: a name, a config dataclass, whether it reads calibration text, and
``build(model, split, config, calibration) -> Emulator``.

A config is a dataclass deriving from ``MethodConfig`` (which holds ``keep``, the budget every
method shares). Each further field is declared with ``option``: its default, its help text and how
a front end should read it. The command line, the pipeline's cell settings and the manifest all
read these fields; nothing here knows about argparse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol, runtime_checkable

#: Default share of the middle block an emulator keeps: chosen on the measured transfer frontier
#: (docs/transfer.md): at 0.4 no method carried the fine-tuning gain into the full model.
DEFAULT_KEEP = 0.7


def option(default: Any, help: str, *, kind: type | None = None, choices: tuple | None = None,
           minimum: int | None = None, metavar: str | None = None, runtime: bool = False):
    """A config field with what a front end needs to offer it.

    ``kind``: the value's type when ``default`` does not say (a ``None`` default); ``minimum``: the
    smallest integer accepted; ``runtime``: the option changes how fast, not what, is computed (it
    does not enter the pipeline's cached-cell settings).
    """
    meta = {"help": help, "kind": kind or type(default), "choices": choices, "minimum": minimum,
            "metavar": metavar, "runtime": runtime}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class MethodConfig:
    """Settings every method has: ``keep``, the fraction of middle-block parameters to keep."""

    keep: float = DEFAULT_KEEP


def config_options(config_cls: type) -> list:
    """The ``option`` fields of a config class (``keep`` and plain fields excluded)."""
    return [f for f in fields(config_cls) if "help" in f.metadata]


def make_config(config_cls: type, keep: float, options: dict[str, Any]):
    """``config_cls`` with ``keep`` and the values in ``options`` for its own fields (defaults for
    the ones missing); keys of other methods' options are ignored."""
    own = {f.name: options[f.name] for f in config_options(config_cls) if f.name in options}
    return config_cls(keep=keep, **own)


@dataclass(frozen=True)
class Calibration:
    """Calibration text as token batches, and what the manifest records of it."""

    batches: list
    described: dict


@runtime_checkable
class Method(Protocol):
    name: ClassVar[str] | str
    help: str  # one line for ``--method``'s help
    config: type  # a MethodConfig dataclass
    needs_calibration: bool

    def build(self, model, split, config, calibration: Calibration | None):
        """The emulator of ``model`` for ``split`` (an ``emulator.Emulator``)."""


@dataclass(frozen=True)
class SimpleMethod:
    """A ``Method`` given by its parts: ``build_fn(model, split, config, calibration)`` builds."""

    name: str
    help: str
    config: type
    needs_calibration: bool
    build_fn: Callable

    def build(self, model, split, config, calibration: Calibration | None = None):
        return self.build_fn(model, split, config, calibration)




def same_option(config_cls: type, name: str):
    """A field declared like ``config_cls``'s ``name`` (same default and help): methods that share an
    option share one declaration, so the command line offers it once."""
    f = config_cls.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)
