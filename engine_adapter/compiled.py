"""The simulator's hot path compiled with mypyc: which modules, the build, and the guard.

The modules in ``MODULES`` (the scheduler, the simulator executor and its cost model, the
env's episode, observation, action and reward code) are plain, type-annotated Python. mypyc
compiles them, unchanged, into C extensions that run the env on the sim backend about twice
as fast (``scripts/bench_sim.py`` reports which way it ran). ``lpenv-compile`` builds them in
place (needs mypy and a C compiler; ``make`` does it; ``--clean`` removes the build), and
records a digest of their sources.

Python imports a module's extension before its source, so a build left behind by an edit would
run the old code. ``guard`` (called when either package is imported) prevents that: where a
source has changed since the build (theirs, or a project module they import), or only some
were built, or the build does not load (another machine's libc, a damaged file), or
``LPENV_PURE_PYTHON=1`` is set, every module below is imported from its source instead (with
a warning, unless asked for or nothing was built). ``lpenv-compile --if-stale`` rebuilds in
each of those cases.
"""

from __future__ import annotations

import ast
import copyreg
import dataclasses
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

MODULES = (
    "engine_adapter.block_manager", "engine_adapter.clock", "engine_adapter.cost_model",
    "engine_adapter.decision", "engine_adapter.energy", "engine_adapter.engine",
    "engine_adapter.errors", "engine_adapter.executor_sim", "engine_adapter.hardware",
    "engine_adapter.plan", "engine_adapter.request", "engine_adapter.routing",
    "engine_adapter.scheduler", "engine_adapter.traffic",
    "lpenv.actions", "lpenv.episode", "lpenv.metrics", "lpenv.observation", "lpenv.reward",
)
ROOT = Path(__file__).resolve().parent.parent
MANIFEST = Path(__file__).with_name("compiled.json")
PURE_ENV = "LPENV_PURE_PYTHON"
# The build's shared library, a module of this package (an editable install finds the
# packages, not the directory above them).
GROUP = "engine_adapter.hot_path"


def source(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def extension(module: str) -> Path | None:
    """The module's built extension next to its source, if there is one."""
    src = source(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = src.with_suffix(suffix)
        if path.exists():
            return path
    return None


def compiled_against() -> list[str]:
    """``MODULES`` and the project's modules they import (mypyc compiles them against those
    modules' types: a change there changes the build too)."""
    names = set(MODULES)
    for m in MODULES:
        for node in ast.walk(ast.parse(source(m).read_bytes())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
    return sorted(n for n in names if n.split(".")[0] in ("engine_adapter", "lpenv")
                  and n != __name__ and source(n).is_file())  # (not this module: the guard)


def digest(modules: list[str]) -> str:
    h = hashlib.sha256()
    for m in modules:
        h.update(m.encode())
        h.update(source(m).read_bytes())
    return h.hexdigest()


def record() -> dict:
    """What a build records: the modules it compiled, those it was compiled against and
    their sources' digest. (Checking it needs no parsing: an import added to a compiled
    module changes that module's source.)"""
    against = compiled_against()
    return {"digest": digest(against), "modules": list(MODULES), "against": against}


def stale_reason() -> str | None:
    """Why the build must not run (None: it may), where there is one."""
    built = [m for m in MODULES if extension(m) is not None]
    if not built:
        return "not built"
    if len(built) < len(MODULES):
        return f"not built: {len(MODULES) - len(built)} of the modules"
    if extension(GROUP + "__mypyc") is None:
        return "the build's shared library is missing"
    try:
        made = json.loads(MANIFEST.read_text())
        recorded, against = made["digest"], made["against"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST.name} is missing or unreadable"
    try:
        if recorded != digest(against):
            return "sources changed since the build"
    except (OSError, TypeError):  # (a module it was compiled against is gone)
        return "sources changed since the build"
    try:  # (files in order, and it loads here)
        importlib.import_module(GROUP + "__mypyc")
    except ImportError as exc:
        return f"its shared library does not load: {exc}"
    return None


class _FromSource(importlib.abc.MetaPathFinder):
    """Imports the compiled modules from their sources; says so at the first (unless the
    source was asked for), where it matters: ``lpenv-compile`` imports none of them."""

    def __init__(self, warning: str | None) -> None:
        self.warning = warning

    def find_spec(self, name, path=None, target=None):
        if name not in MODULES:
            return None
        if self.warning is not None:
            warnings.warn(self.warning, stacklevel=2)
            self.warning = None
        return importlib.util.spec_from_file_location(name, source(name))


_state: dict[str, object] = {}


def guard() -> None:
    """Decide once, before any of ``MODULES`` is imported, whether the build runs."""
    if "compiled" in _state:
        return
    warning = None
    if os.environ.get(PURE_ENV) == "1":
        # (whether the build is in order does not matter, only whether there is one to step
        # around: no digest to compute, no shared library to load)
        reason: str | None = f"{PURE_ENV}=1"
        built = any(extension(m) is not None for m in MODULES)
    else:
        reason = stale_reason()
        built = reason != "not built"
        if reason is not None:
            warning = (f"lpenv: the compiled modules are not used ({reason}): running the "
                       "source, as fast as uncompiled; rebuild with `lpenv-compile` (make "
                       "compile)")
    if reason is not None and built:
        sys.meta_path.insert(0, _FromSource(warning))
    _state["compiled"] = reason is None


def running_compiled() -> bool:
    """Whether the compiled modules are the ones running."""
    guard()
    return bool(_state["compiled"])


def _reduce_frozen(obj):
    return type(obj), tuple(getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init)


def picklable(cls: type) -> None:
    """Pickle and copy a frozen dataclass by its fields: compiled, its instances have no
    ``__dict__`` to restore, and a frozen one refuses the attribute sets copying does."""
    copyreg.pickle(cls, _reduce_frozen)


def build() -> None:
    """Compile ``MODULES`` in place and record their sources' digest (as they were when the
    build began)."""
    # The old build goes first: files unlinked, not rewritten, so that a process running it
    # keeps its copy (and a module no longer in MODULES keeps no extension).
    clean()
    made = record()
    files = [str(source(m).relative_to(ROOT)) for m in MODULES]
    print(f"lpenv: compiling {len(files)} modules with mypyc (a minute or two)...", flush=True)
    start = time.perf_counter()
    # (setuptools' build_ext in place, as the mypyc command does, with the group named)
    code = ("import sys; from setuptools import setup; from mypyc.build import mypycify; "
            "setup(name='lpenv-hot-path', script_args=['build_ext', '--inplace'], "
            "ext_modules=mypycify(['--ignore-missing-imports', '--follow-imports=silent', "
            "*sys.argv[2:]], group_name=sys.argv[1]))")
    # No fused multiply-adds (some compilers' default off x86-64): the compiled arithmetic
    # must round as Python's does, so that both give the same results to the bit.
    env = {**os.environ, "CFLAGS": f"{os.environ.get('CFLAGS', '')} -ffp-contract=off"}
    out = subprocess.run([sys.executable, "-c", code, GROUP, *files], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{out.stdout[-4000:]}{out.stderr[-4000:]}\nlpenv: mypyc failed (above): "
                 "the modules run from their source")
    MANIFEST.write_text(json.dumps(made) + "\n")
    print(f"lpenv: compiled in {time.perf_counter() - start:.0f} s")


def clean() -> None:
    """Remove the build: ``MODULES``' extensions and those the last build made."""
    try:
        made = json.loads(MANIFEST.read_text())["modules"]
    except (OSError, ValueError, KeyError):
        made = []
    for m in {*MODULES, *made}:
        ext = extension(m)
        if ext is not None:
            ext.unlink()
    lib = extension(GROUP + "__mypyc")
    if lib is not None:
        lib.unlink()
    MANIFEST.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Compile the simulator's hot path with mypyc "
                                "(or remove the build).")
    p.add_argument("--clean", action="store_true", help="remove the build")
    p.add_argument("--if-stale", action="store_true",
                   help="build only where the build is missing or does not match its sources")
    args = p.parse_args(argv)
    if args.clean:
        clean()
    elif not args.if_stale or stale_reason() is not None:
        build()
