"""The descriptor types of the format registry (pocketvlm/formats/__init__.py): what a format declares."""

from __future__ import annotations

import importlib
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

from pocketvlm.errors import PocketVLMError


@dataclass(frozen=True)
class Option:
    """An exporter option: `name` in Python, --name-with-dashes on the command line."""

    name: str
    help: str
    type: Callable | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    aliases: tuple[str, ...] = ()  # older names still accepted on the command line, same destination

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag, *("--" + a.replace("_", "-") for a in self.aliases))

    def argparse_kwargs(self) -> dict:
        kwargs = {"dest": self.name, "help": self.help}
        for key in ("type", "choices", "metavar"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        return kwargs


STAGES = ("export", "quantize", "runtime")


@dataclass(frozen=True)
class Format:
    name: str                              # as in pocketvlm.json's "format" and `--to`
    title: str                             # for people: "GGUF (llama.cpp)"
    extra: str | None                      # pip extra with its engine; None: in the base install
    backend: str                           # class name in pocketvlm.runtime.<module>
    export_quants: tuple[str, ...] = ()    # what `export --quant` takes, the default first
    quantize_quants: tuple[str, ...] = ()  # what `quantize --quant` makes ...
    quantize_from: tuple[str, ...] = ()    # ... from artifacts of these quants
    options: tuple[Option, ...] = ()       # exporter options (argparse flags)
    runs_on: tuple[str, ...] | None = None  # platform.system() names where its backend predicts; None: anywhere
    adapters: bool = False                 # its backend applies LoRA adapter artifacts (export ADAPTER --to it)
    module: str | None = None              # stage module name, if not `name`
    notes: dict[str, str] = field(default_factory=dict)  # per quant: what a user should know (shown by export)

    @property
    def default_quant(self) -> str | None:
        return self.export_quants[0] if self.export_quants else None

    def runs_here(self) -> bool:
        return self.runs_on is None or platform.system() in self.runs_on

    def stage(self, stage: str):
        """The format's module for one stage, imported now; a missing engine is a one-line error saying which
        extra to install."""
        if stage not in STAGES:
            raise ValueError(f"bug: unknown stage {stage!r}")
        name = f"pocketvlm.{stage}.{self.module or self.name}"
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("pocketvlm"):
                raise
            what = {"export": f"exporting {self.name}", "quantize": f"quantizing {self.name}",
                    "runtime": f"running {self.name} artifacts"}[stage]
            extra = f"pip install 'pocketvlm[{self.extra}]'" if self.extra else "reinstall pocketvlm"
            raise PocketVLMError(f"{what} needs {e.name!r}, which is not installed: {extra}") from e

    def backend_class(self):
        return getattr(self.stage("runtime"), self.backend)

    def check_quant(self, quant: str, *, quantize: bool = False) -> str:
        quants = self.quantize_quants if quantize else self.export_quants
        if not quants:
            raise PocketVLMError(f"{'quantizing' if quantize else 'exporting to'} {self.name} is not supported")
        if quant not in quants:
            raise PocketVLMError(f"unknown --quant {quant!r} for {self.name}; choose one of: {', '.join(quants)}")
        return quant
