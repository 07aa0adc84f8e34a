"""The paper's parameter study: one :func:`compare.compare` per value of one parameter, drawn as accuracy vs value.

``DIR/<param>=<value>/`` holds a complete, resumable compare for each value. A method whose result cannot
depend on the parameter (see :func:`affects`) runs once, with the base configuration, in ``DIR/unaffected/``,
and that one result stands in every value's table: rerunning it would cost time and show noise-free copies anyway.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import compare as cmp, io
from .config import SWEEP_PARAM_TYPES
from .errors import ConfigError, check_choice, check_range
from .federation import METHOD_NAMES, METHODS, FedConfig, result_config

PARAM_TYPES = SWEEP_PARAM_TYPES   # in fedpft_lab.config, so the CLI can list them without importing torch
# Two distinct values of each parameter, to ask whether a method's result can depend on it at all.
_PROBE: dict[str, tuple[float, float]] = {"align_interval": (1, 2), "align_proportion": (0.3, 0.8),
                                          "keep_ratio": (0.25, 0.5), "alpha": (1.0, 5.0),
                                          "distill_steps": (100, 300)}
SHARED_DIR = "unaffected"


def affects(method: str, param: str, base: FedConfig | None = None) -> bool:
    """Can ``param`` change ``method``'s result? If not, the sweep runs the method once and reuses it.

    Asked of :func:`federation.result_config`, the one place that knows which fields a method's result depends
    on (the run cache uses it too), so the sweep and the cache can never disagree: the alignment knobs move
    only FedPFT and FedPFT-D, the layer-level distillation budget only the methods that distil before FL,
    keep_ratio every proxy but FedPETuning's (the FM), alpha every method.
    """
    check_choice("param", param, PARAM_TYPES)
    cfg = replace(base or FedConfig(), method=method)
    a, b = (with_param(cfg, param, v) for v in _PROBE[param])
    return result_config(a) != result_config(b)


def parse_values(param: str, values: list) -> list[int | float]:
    """``values`` (strings from the command line, or numbers) as the parameter's type, in the given order."""
    check_choice("param", param, PARAM_TYPES)
    kind = PARAM_TYPES[param]
    if not values:
        raise ConfigError(f"{param}: give at least one value")
    out = []
    for v in values:
        try:
            out.append(kind(str(v)))
        except ValueError:
            raise ConfigError(f"{param} values must be {'integers' if kind is int else 'numbers'}, "
                              f"got {v!r}") from None
    twice = sorted({v for v in out if out.count(v) > 1})
    if twice:
        raise ConfigError(f"{param} values must differ, got {', '.join(map(str, twice))} more than once")
    return out


def with_param(base: FedConfig, param: str, value: int | float) -> FedConfig:
    """``base`` with ``param`` set to ``value``, validated now (a bad value fails before any run starts)."""
    check_choice("param", param, PARAM_TYPES)
    if param != "alpha":
        return replace(base, **{param: value})
    if base.data.partition != "dirichlet":
        raise ConfigError(f"alpha only changes a Dirichlet split, but partition is {base.data.partition!r}; "
                          "pass --partition dirichlet")
    # DataConfig does not check alpha itself (the split does, much later), so check it here, as partition does
    check_range("alpha", value, 0, float("inf"), lo_open=True, hi_open=True)
    return replace(base, data=replace(base.data, alpha=value))


def value_dir(param: str, value: int | float) -> str:
    return f"{param}={value}"


def sweep(base: FedConfig, param: str, values: list, methods: list[str], seeds: list[int], out_dir: Path,
          resume: bool = False, progress: bool = True, workers: int | None = None,
          command: str | None = None) -> dict:
    """Compare ``methods`` over ``seeds`` at every value of ``param``; write ``sweep.json``, ``.md``, ``.html``.

    Everything is validated before the first run. ``resume`` reuses finished runs and continues partial ones,
    exactly as :func:`compare.compare` does.
    """
    values = parse_values(param, values)
    for m in methods:
        check_choice("method", m, METHODS)
    if not methods or not seeds:
        raise ConfigError("a sweep needs at least one method and one seed")
    cfgs = [with_param(base, param, v) for v in values]
    out_dir = Path(out_dir)
    shared = [m for m in methods if not affects(m, param, base)]
    swept = [m for m in methods if affects(m, param, base)]
    shared_runs = cmp.run_methods(base, shared, seeds, out_dir / SHARED_DIR, resume, progress, workers)
    results = []
    for value, cfg in zip(values, cfgs):
        sub = out_dir / value_dir(param, value)
        runs = {**cmp.run_methods(cfg, swept, seeds, sub, resume, progress, workers), **shared_runs}
        table = {**cmp.provenance(cfg, seeds, command), "param": param, "value": value,
                 "reused": {m: f"../{SHARED_DIR}/{m}" for m in shared},
                 **cmp.summarise({m: runs[m] for m in methods})}
        cmp.write_compare(table, sub)
        results.append({"value": value, "dir": sub.name, "methods": table["methods"]})
    result = {**cmp.provenance(base, seeds, command), "param": param, "values": values, "methods": methods,
              "affected": {m: affects(m, param, base) for m in methods}, "notes": cmp.NOTES, "results": results}
    io.atomic_json(result, out_dir / "sweep.json")
    io.atomic_write_text(out_dir / "sweep.md", format_sweep(result) + "\n")
    figure(result).write_html(out_dir / "sweep.html", include_plotlyjs=True)
    return result


def figure(result: dict):
    """The paper's parameter-study plot: last-round accuracy (%) with 95% CI bars vs value, one line per method."""
    from . import plots  # plotly is needed only here, not to build the command line's parser

    series = {METHOD_NAMES[m]: [r["methods"][m]["final_accuracy"] for r in result["results"]]
              for m in result["methods"]}
    return plots.parameter_study(result["values"], series, result["param"])


def format_sweep(result: dict) -> str:
    """Markdown: one row per value, one column per method; last-round accuracy, then mean gradient cosine."""
    param, methods = result["param"], result["methods"]
    head = "| " + param + " | " + " | ".join(METHOD_NAMES[m] for m in methods) + " |"
    rule = "|---" * (len(methods) + 1) + "|"
    lines = [f"# Parameter study: {param}", ""]
    if result.get("command"):
        lines += [f"`{result['command']}`", ""]
    for title, key, scale, digits in (("Last-round FM accuracy (%)", "final_accuracy", 100, 1),
                                      ("Mean gradient cosine", "grad_cosine", 1, 4)):
        lines += [f"{title}, mean ± sd [{cmp.LEVEL:.0%} CI] over seeds {result['seeds']}:", "", head, rule]
        for r in result["results"]:
            cells = [f"{cmp.format_pm(r['methods'][m][key], scale, digits)} "
                     f"{cmp.format_ci(r['methods'][m][key], scale, digits)}" for m in methods]
            lines.append(f"| {r['value']} | " + " | ".join(cells) + " |")
        lines.append("")
    once = [METHOD_NAMES[m] for m in methods if not result["affected"][m]]
    if once:
        lines.append(f"{', '.join(once)}: not affected by {param}, run once and repeated in every row.")
    return "\n".join(lines).rstrip()
