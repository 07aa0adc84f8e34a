"""One place for each piece of FedPFT logic (issue 11): read the package's source and fail if a copy comes back.

LoRA wrapping, FM <-> proxy layer renaming, atomic file writing and the CLI's choice lists each had two to four
copies that could drift apart (a seed changed in one, a choice added to one parser). These checks parse the
source with ``ast``, so they cost milliseconds and need no model.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fedpft_lab
from fedpft_lab import config

PACKAGE = Path(fedpft_lab.__file__).parent


def _modules() -> dict[str, ast.Module]:
    """Every module of the package by its path relative to the package (``core/proxy.py``)."""
    return {p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _called(tree: ast.AST, name: str) -> list[int]:
    """Lines where ``name(...)`` or ``anything.name(...)`` is called."""
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
            and ((isinstance(n.func, ast.Name) and n.func.id == name)
                 or (isinstance(n.func, ast.Attribute) and n.func.attr == name))]


def _where_called(name: str) -> dict[str, list[int]]:
    return {path: lines for path, tree in _modules().items() if (lines := _called(tree, name))}


def test_the_package_is_where_the_checks_look():
    mods = _modules()
    assert {"adapters.py", "core/proxy.py", "core/server.py", "io.py", "cli.py", "bench.py"} <= set(mods)


def test_lora_wrapping_lives_in_core_proxy_only():
    """Every LoRA wrap of an FM, a proxy or both goes through core/proxy.py (wrap_pair, wrap_proxy, build_proxy),
    so the same config, seed and layer mapping hold for the server, the clients, the labs and the bench."""
    assert set(_where_called("add_lora")) == {"core/proxy.py"}, _where_called("add_lora")
    assert _where_called("get_peft_model") == {"adapters.py": _called(_modules()["adapters.py"], "get_peft_model")}
    assert sum(map(len, _where_called("get_peft_model").values())) == 1


def _defined(tree: ast.Module) -> set[str]:
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _inverts_enumerate(node: ast.AST) -> bool:
    """``{x: i for i, x in enumerate(...)}``: a layer list turned into a layer-index map."""
    if not (isinstance(node, ast.DictComp) and len(node.generators) == 1):
        return False
    gen = node.generators[0]
    return (isinstance(gen.iter, ast.Call) and isinstance(gen.iter.func, ast.Name) and gen.iter.func.id == "enumerate"
            and isinstance(gen.target, ast.Tuple) and len(gen.target.elts) == 2
            and all(isinstance(e, ast.Name) for e in (*gen.target.elts, node.key, node.value))
            and node.key.id == gen.target.elts[1].id and node.value.id == gen.target.elts[0].id)


def test_layer_renaming_lives_in_adapters_only():
    mods = _modules()
    owners = {path for path, tree in mods.items() if _defined(tree) & {"to_proxy_names", "to_fm_names"}}
    assert owners == {"adapters.py"}, owners
    assert set(_where_called("remap_layers")) <= {"adapters.py"}, _where_called("remap_layers")
    inverting = {path for path, tree in mods.items() if any(_inverts_enumerate(n) for n in ast.walk(tree))}
    assert inverting <= {"adapters.py"}, inverting


def test_io_is_the_only_atomic_writer():
    """io.py renames temporary files over their targets; nothing else does, or names a writer of its own."""
    mods = _modules()
    renamers = {path for path, tree in mods.items() for n in ast.walk(tree)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("replace", "rename")
                and isinstance(n.func.value, ast.Name) and n.func.value.id == "os"}
    assert renamers == {"io.py"}, renamers
    aliases = []
    for path, tree in mods.items():
        if path == "io.py":
            continue
        for n in ast.walk(tree):
            names = ([t.id for t in n.targets if isinstance(t, ast.Name)] if isinstance(n, ast.Assign) else
                     [a.asname or a.name for a in n.names] if isinstance(n, ast.ImportFrom) and n.module != "io"
                     and not (n.module or "").endswith(".io") else
                     [n.name] if isinstance(n, ast.FunctionDef) else [])
            aliases += [f"{path}: {name}" for name in names if "atomic" in name]
    assert not aliases, aliases


def _string_literals(tree: ast.AST) -> list[tuple[int, frozenset[str]]]:
    """(line, values) of every tuple/list/set literal made only of two or more string constants."""
    out = []
    for n in ast.walk(tree):
        if isinstance(n, (ast.Tuple, ast.List, ast.Set)) and len(n.elts) >= 2 and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in n.elts):
            out.append((n.lineno, frozenset(e.value for e in n.elts)))
    return out


CHOICES = {"DEVICES": config.DEVICES, "METHODS": config.METHODS, "LR_SCHEDULES": config.LR_SCHEDULES,
           "ALIGN_RULES": config.ALIGN_RULES, "TASKS": config.TASKS, "PUBLIC_SOURCES": config.PUBLIC_SOURCES,
           "PARTITION_SCHEMES": config.PARTITION_SCHEMES, "PARTITION_CONVENTIONS": config.PARTITION_CONVENTIONS,
           "SELECTIONS": config.SELECTIONS, "BENCH_ONLY": tuple(config.BENCH_ONLY),
           "ENGINES": config.ENGINES}


@pytest.mark.parametrize("name", CHOICES)
def test_each_choice_list_is_spelled_once_in_config(name):
    """A choice list copied into a parser or a checker drifts: one side accepts what the other refuses."""
    wanted = frozenset(CHOICES[name])
    copies = [f"{path}:{line}" for path, tree in _modules().items() if path != "config.py"
              for line, values in _string_literals(tree) if values == wanted]
    assert not copies, f"{name} spelled again at {copies}; import it from fedpft_lab.config"


def test_both_bench_parsers_offer_the_same_entries():
    from fedpft_lab import bench, cli

    def only(parser):
        return next(a for a in parser._actions if "--only" in a.option_strings)

    bench_sub = cli.build_parser()._subparsers._group_actions[0].choices["bench"]
    assert list(only(bench_sub).choices) == list(only(bench.build_parser()).choices) == list(config.BENCH_ONLY)
    assert only(bench_sub).help == only(bench.build_parser()).help
    flags = [sorted(a.option_strings) for a in bench_sub._actions]
    assert flags == [sorted(a.option_strings) for a in bench.build_parser()._actions]   # every flag, not just --only
