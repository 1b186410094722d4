"""The Flower App folder that ``flwr run`` submits to a SuperLink (deployment runtime).

``flwr run DIR`` packs ``DIR`` (its ``pyproject.toml``) into a Flower App Bundle and sends it to
the SuperLink, whose ServerApp process and every SuperNode's ClientApp process then import the
components it names: ``gradot.federated.apps:server_app`` and ``:client_app``, from the gradot
installed on each machine. The folder holds no code of its own, only that wiring and the run
config's defaults (:data:`gradot.federated.apps.RUN_CONFIG`), each of which ``flwr run
--run-config`` can override.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import __version__
from .apps import FederationSettings

__all__ = ["write_flower_app"]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_flower_app(folder: str | os.PathLike, emulator: str = "", out: str = "", **overrides) -> Path:
    """Write ``folder/pyproject.toml``: the Flower App for ``flwr run``. ``emulator`` (the model
    owner's emulator folder) and ``out`` (where the server writes the adapter and record) become
    run-config defaults, with every :class:`FederationSettings` field; ``overrides`` change them."""
    from .apps import RUN_CONFIG

    s = FederationSettings(**overrides)
    config = {"emulator": emulator, "out": out, "plug-model": ""}
    config.update({key: getattr(s, name) for key, name in RUN_CONFIG.items()})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "# A Flower App that runs gradot's federated offsite-tuning (written by `gradot federate app`).",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "gradot-federate"',
        f'version = "{__version__}"',
        'description = "gradot federated offsite-tuning: one adapter, many data owners"',
        "dependencies = []  # gradot and flwr must already be installed where it runs",
        "",
        "[tool.hatch.build.targets.wheel]",
        'packages = ["."]',
        "",
        "[tool.flwr.app]",
        'publisher = "gradot"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "gradot.federated.apps:server_app"',
        'clientapp = "gradot.federated.apps:client_app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {_toml_value(v)}" for k, v in config.items()),
        "",
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines))
    return folder
