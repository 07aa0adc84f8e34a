"""``fedpft-lab report DIR``: one HTML page that shows a run or a comparison, to keep, mail or hand in.

The page must open anywhere, offline, years later: so it is a single file with plotly.js embedded once (the first
figure carries it, the others reuse it), no link to a CDN, and everything needed to judge the numbers on it: the
curves, the table(s), the configuration, the command that made them and the code version, when the folder has them.

Two kinds of folder:

* a **run** (``fedpft-lab run --out DIR``): ``metrics.json``. Accuracy and gradient-cosine curves over rounds,
  a summary, the per-round table and the configuration.
* a **comparison** (``fedpft-lab compare --out DIR``): ``compare.json`` plus ``<method>/seed<k>/metrics.json``.
  The results table (mean ± sd and 95% interval over seeds), the paired differences from FedPFT, the last-round
  accuracy with its interval, and the mean curves over seeds with their 95% bands. A ``sweep`` value folder works
  too: its methods shared between values are read from the folder ``compare.json`` names.

Figures come from :mod:`fedpft_lab.plots` and numbers from ``compare.json`` as written (:mod:`fedpft_lab.compare`),
so the page shows exactly what the command printed.
"""
from __future__ import annotations

import html
import json
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import io
from .errors import ConfigError

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.meta td { text-align: left; } .note { color: #555; font-size: 0.9em; }
"""


# --------------------------------------------------------------------------- reading a folder

def _read_json(path: Path) -> Any:
    try:
        return io.load_json(path)
    except Exception as err:
        raise ConfigError(f"{path} is unreadable ({type(err).__name__}: {err})") from err


def read_folder(folder: Path) -> tuple[str, dict, dict[str, dict[int, dict]]]:
    """``(kind, main file, runs[method][seed])`` of a run (``"run"``) or comparison (``"compare"``) folder."""
    folder = Path(folder)
    if (folder / "compare.json").is_file():
        table = _read_json(folder / "compare.json")
        runs: dict[str, dict[int, dict]] = {}
        sources = {m: folder / m for m in table.get("methods", {})}
        sources.update({m: (folder / rel).resolve() for m, rel in table.get("reused", {}).items()})
        for method, base in sources.items():
            for path in sorted(base.glob("seed*/metrics.json")):
                runs.setdefault(method, {})[int(path.parent.name[4:])] = _read_json(path)
        return "compare", table, runs
    if (folder / "metrics.json").is_file():
        metrics = _read_json(folder / "metrics.json")
        if not isinstance(metrics, dict) or not isinstance(metrics.get("rounds"), list):
            raise ConfigError(f"{folder / 'metrics.json'} is not the metrics of a `fedpft-lab run`")
        return "run", metrics, {metrics.get("method", "run"): {0: metrics}}
    extra = (" (a sweep folder: pass one of its value folders, each holds a compare.json)"
             if (folder / "sweep.json").is_file() else "")
    raise ConfigError(f"DIR must hold metrics.json (from `fedpft-lab run`) or compare.json (from "
                      f"`fedpft-lab compare`); {folder} has neither{extra}")


# --------------------------------------------------------------------------- HTML pieces

def _esc(value: Any) -> str:
    return html.escape(str(value))


def html_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of equal keys as an HTML table, every cell escaped."""
    if not rows:
        return ""
    head = "".join(f"<th>{_esc(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_esc('' if v is None else v)}</td>" for v in r.values()) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def meta_table(items: Mapping[str, Any]) -> str:
    """Key/value provenance (command, code version, ...); empty entries are left out, a dict reads ``k v, ...``."""
    def text(v: Any) -> str:
        return ", ".join(f"{k} {x}" for k, x in v.items()) if isinstance(v, Mapping) else str(v)

    body = "".join(f"<tr><th>{_esc(k)}</th><td><code>{_esc(text(v))}</code></td></tr>" for k, v in items.items()
                   if v not in (None, "", {}))
    return f'<table class="meta">{body}</table>'


def figures_html(figures: Sequence) -> list[str]:
    """Each figure as an HTML fragment; only the first carries plotly.js, so the page embeds it exactly once."""
    return [fig.to_html(full_html=False, include_plotlyjs=i == 0, default_width="100%",
                        config={"displaylogo": False}) for i, fig in enumerate(figures)]


def page(title: str, sections: Sequence[tuple[str, str]], subtitle: str = "") -> str:
    """The whole document: ``sections`` are ``(heading, html)`` pairs (an empty heading adds no title)."""
    parts = [f"<h2>{_esc(h)}</h2>\n{body}" if h else body for h, body in sections if body]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_esc(title)}</h1>\n"
            f"<p class=\"note\">{_esc(subtitle)}</p>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _generated(folder: Path) -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"from {folder.resolve()}, generated {now} by fedpft-lab report"


# --------------------------------------------------------------------------- a run

def run_summary(m: Mapping) -> dict[str, Any]:
    """The numbers a reader looks for first, as one table row (accuracies in %)."""
    from .federation import METHOD_NAMES

    rounds, p, c = m["rounds"], m.get("params", {}), m.get("cost", {})
    trained = [r for r in rounds if r.get("round", 0) > 0]
    return {"method": METHOD_NAMES.get(m.get("method"), m.get("method")),
            "rounds": len(trained),
            "last-round FM accuracy (%)": _pct(m.get("final_accuracy")),
            "best round (picked on test set, optimistic) (%)": _pct(m.get("best_accuracy")),
            "last-round proxy accuracy (%)": _pct(rounds[-1].get("sub_accuracy")),
            "mean grad cosine (rounds ≥ 1)": (f"{statistics.fmean(r['grad_cosine'] for r in trained):.4f}"
                                              if trained else ""),
            "proxy / FM transformer params": f"{p.get('sub_transformer', 0):,} / {p.get('fm_transformer', 0):,}",
            "communication (MB)": f"{(c.get('bytes_up', 0) + c.get('bytes_down', 0)) / 1e6:.2f}",
            "seconds": f"{c.get('seconds', 0):.0f}"}


def round_rows(rounds: Sequence[Mapping]) -> list[dict[str, Any]]:
    """The per-round table of ``fedpft-lab run``, one row per round."""
    return [{"round": r["round"], "FM acc (%)": _pct(r.get("accuracy")), "proxy acc (%)": _pct(r.get("sub_accuracy")),
             "grad cosine": f"{r['grad_cosine']:.4f}", "grad rel L2": f"{r['grad_rel_l2']:.3f}",
             "aligned": "yes" if r.get("aligned") else "",
             "MB up": f"{r.get('bytes_up', 0) / 1e6:.2f}", "MB down": f"{r.get('bytes_down', 0) / 1e6:.2f}",
             "seconds": f"{r.get('seconds', 0):.1f}"} for r in rounds]


def run_report(m: Mapping, folder: Path) -> str:
    from . import plots
    from .federation import METHOD_NAMES

    name = METHOD_NAMES.get(m.get("method"), m.get("method", "run"))
    rounds = m["rounds"]
    figures = [plots.round_curves(rounds, ("accuracy", "sub_accuracy"), title=f"{name}: accuracy per round",
                                  ylabel="accuracy"),
               plots.discrepancy_curves({name: rounds}, "grad_cosine",
                                        title=f"{name}: cosine(proxy gradient, FM gradient) per round")]
    if any(r.get("update_cosine") is not None for r in rounds):
        figures.append(plots.round_curves(rounds, ("update_cosine",), title="Update disparity: cosine of the "
                                          "proxy's and the FM's adapter change", ylabel="cosine"))
    sections = [("Provenance", meta_table({"command": m.get("command"), "code version": m.get("code_version"),
                                           "folder": folder.resolve()})),
                ("Summary", html_table([run_summary(m)])),
                ("Curves", "\n".join(figures_html(figures))),
                ("Rounds", html_table(round_rows(rounds))),
                ("Configuration", f"<pre>{_esc(json.dumps(m.get('config', {}), indent=2))}</pre>")]
    return page(f"FedPFT Lab report: {name} run", sections, _generated(folder))


# --------------------------------------------------------------------------- a comparison

def result_rows(table: Mapping) -> list[dict[str, str]]:
    """``compare.json``'s results table (what ``compare.format_table`` prints), one row per method."""
    from .compare import BEST_LABEL, LEVEL, format_ci, format_pm

    ci = f"{LEVEL:.0%} CI"
    return [{"method": row["name"],
             "last-round acc (%), mean ± sd": format_pm(row["final_accuracy"]),
             f"acc {ci}": format_ci(row["final_accuracy"]),
             f"{BEST_LABEL} (%)": format_pm(row["best_accuracy_test_picked"]),
             "proxy acc (%)": format_pm(row["final_sub_accuracy"]),
             "mean grad cos, mean ± sd": format_pm(row["grad_cosine"], 1, 4),
             f"grad cos {ci}": format_ci(row["grad_cosine"], 1, 4),
             "proxy / FM params (M)": f"{row['proxy_transformer'] / 1e6:.2f} / {row['fm_transformer'] / 1e6:.2f}",
             "comm (MB)": f"{row['comm_mb']['mean']:.1f}",
             "time (s)": f"{row['seconds']['mean']:.0f}"} for row in table["methods"].values()]


def paired_rows(table: Mapping) -> list[dict[str, str]]:
    """Each method's per-seed difference from FedPFT with its interval, and how often its gradient cosine beat
    FedPFT-N's (``compare.format_table``'s second table; empty when neither FedPFT nor FedPFT-N was compared)."""
    from .compare import LEVEL, format_ci, format_pm

    rows = table["methods"].values()
    if not any(row.get("vs_fedpft") or row.get("grad_cosine_above_fedpft_n") for row in rows):
        return []
    out = []
    for row in rows:
        d, above = row.get("vs_fedpft"), row.get("grad_cosine_above_fedpft_n")
        out.append({"method": row["name"],
                    "Δ last-round acc (points), mean ± sd": format_pm(d["final_accuracy"], sign="+") if d else "–",
                    f"Δ acc {LEVEL:.0%} CI": format_ci(d["final_accuracy"]) if d else "–",
                    "Δ mean grad cos, mean ± sd": format_pm(d["grad_cosine"], 1, 4, "+") if d else "–",
                    f"Δ grad cos {LEVEL:.0%} CI": format_ci(d["grad_cosine"], 1, 4) if d else "–",
                    "grad cos above FedPFT-N (round-points)": (f"{above['above']}/{above['points']}"
                                                               if above and above["points"] else "–")})
    return out


def compare_report(table: Mapping, runs: Mapping[str, Mapping[int, dict]], folder: Path) -> str:
    from . import plots, reference

    study = reference.Study(folder.name, folder, dict(table), {m: dict(s) for m, s in runs.items()})
    figures = [plots.interval_bars(reference.interval_rows(study), "Last-round FM accuracy over seeds",
                                   "accuracy (%)")]
    if runs:
        figures += [plots.band_curves(reference.by_round(study, "accuracy"), "FM accuracy per round "
                                      "(mean over seeds, 95% band)", "accuracy"),
                    plots.band_curves(reference.by_round(study, "grad_cosine"), "cos(proxy gradient, FM gradient) "
                                      "per round (mean over seeds, 95% band)", "cosine")]
    paired = paired_rows(table)
    notes = "".join(f"<li><b>{_esc(k)}</b>: {_esc(v)}</li>" for k, v in table.get("notes", {}).items())
    sections = [("Provenance", meta_table({"command": table.get("command"), "code version": table.get("code_version"),
                                           "seeds": table.get("seeds"), "created (UTC)": table.get("created_utc"),
                                           "folder": folder.resolve()})),
                ("Results", html_table(result_rows(table))),
                ("Paired differences from FedPFT (method minus FedPFT on the same seed)", html_table(paired)),
                ("Figures", "\n".join(figures_html(figures))),
                ("Notes", f"<ul class=\"note\">{notes}</ul>" if notes else ""),
                ("Configuration (shared by every method; each run's own is in its metrics.json)",
                 f"<pre>{_esc(json.dumps(table.get('base_config', {}), indent=2))}</pre>")]
    title = "FedPFT Lab report: comparison of " + ", ".join(r["name"] for r in table["methods"].values())
    return page(title, sections, _generated(folder))


# --------------------------------------------------------------------------- entry point

def build_report(folder: str | Path) -> str:
    """The HTML page for a run or comparison folder."""
    folder = Path(folder)
    kind, main, runs = read_folder(folder)
    return run_report(main, folder) if kind == "run" else compare_report(main, runs, folder)


def write_report(folder: str | Path, output: str | Path | None = None) -> Path:
    """Write :func:`build_report` of ``folder`` to ``output`` (default ``folder/report.html``) and return its path."""
    folder = Path(folder)
    text = build_report(folder)
    target = Path(output) if output is not None else folder / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(target, text)
    return target
