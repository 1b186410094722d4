"""The ``gradot`` command line, one module per role: ``app`` (the parser, ``main`` and the model
owner's compress/plugin/info), ``data_owner`` (finetune, eval, pipeline, federate), ``audit`` (the
model owner's audit) and ``options`` (the options they share). The library never imports it."""

from .app import main

__all__ = ["main"]
