"""``fedpft-lab``: inspect a sub-FM, run one federated method, compare methods, sweep a parameter, benchmark,
write an HTML report of results, and the student edition of the labs.

Every sub-command runs offline on the embedded default (MiniLM + tweets + Wikipedia summaries).
"""
from __future__ import annotations

import argparse
import shlex
import os
import sys
import time
from pathlib import Path

from .config import (ALIGN_RULES, BENCH_ONLY, BENCH_ONLY_HELP, DEFAULT_FM, DEVICES, ENGINES, METHODS,
                     PARTITION_CONVENTIONS, PARTITION_SCHEMES, PUBLIC_SOURCES, SELECTIONS, SWEEP_PARAM_TYPES, TASKS)
from .errors import ConfigError
from .presets import DEFAULT_PRESET, PRESETS, preset_values


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like '0 5' or '0,5', got {text!r}") from None


def _add_data_args(p: argparse.ArgumentParser, preset: str, with_clients: bool = False) -> None:
    d, _ = preset_values(preset)
    p.add_argument("--preset", choices=PRESETS, default=preset,
                   help="sizes to start from (flags given with it still win): workshop (default: the 1.5-minute "
                        "run), lab, smoke (seconds, for CI), paper (100 clients, 10%% per round, all tweets)")
    p.add_argument("--device", choices=DEVICES, default=d["device"],
                   help="where models and batches live: auto (default) takes a CUDA GPU, then Apple's MPS, "
                        "then the CPU; on a GPU the clients of a round train one after another")
    p.add_argument("--fm", default=d["fm"], help="foundation model: 'minilm' (offline default), a Hub name such as "
                   "bert-base-uncased / roberta-base / google/vit-base-patch16-224-in21k, a local folder, or tiny-bert")
    p.add_argument("--allow-unsafe-weights", action="store_true",
                   help="let --fm load a local folder's pickle weights (pytorch_model.bin), which can run code; "
                        "only for folders you trust (default: safetensors only)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default=d["task"], help=f"{', '.join(TASKS)} (default: %(default)s)")
    src.add_argument("--data", default=None, metavar="PATH", help="your own CSV/JSONL with text,label columns")
    p.add_argument("--max-train", type=_optional_int, default=d["max_train"],
                   help="training examples used (all clients; 'all' for the whole training split)")
    p.add_argument("--max-test", type=_optional_int, default=d["max_test"],
                   help="test examples used for evaluation ('all' for the whole test split)")
    p.add_argument("--public-blocks", type=int, default=d["public_blocks"], help="public-corpus blocks for distillation")
    p.add_argument("--public", choices=PUBLIC_SOURCES, default=d["public"],
                   help="server's unlabeled data: Wikipedia sentences (default), packed Wikipedia blocks, or "
                        "held-out unlabeled tweets of the clients' domain (task)")
    balance = p.add_mutually_exclusive_group()
    balance.add_argument("--balance", dest="balanced", action="store_true", default=d["balanced"],
                         help="take equally many examples of every label (default for tweets only)")
    balance.add_argument("--no-balance", dest="balanced", action="store_false", default=d["balanced"],
                         help="keep the task's own label mix")
    if with_clients:
        p.add_argument("--clients", type=int, default=d["clients"])
        p.add_argument("--partition", choices=PARTITION_SCHEMES, default=d["partition"])
        p.add_argument("--alpha", type=float, default=d["alpha"], help="Dirichlet concentration (> 0)")
        p.add_argument("--convention", choices=PARTITION_CONVENTIONS, default=d["convention"],
                       help="flgo: each client ~ Dir(alpha * global label mix) (the paper's code); "
                            "per-class: each label split by Dir(alpha) over clients")
    p.add_argument("--seed", type=int, default=0)


def _optional_int(text: str) -> int | None:
    if text.strip().lower() in ("all", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'all', got {text!r}") from None


def _add_subfm_args(p: argparse.ArgumentParser, preset: str) -> None:
    _, f = preset_values(preset)
    p.add_argument("--keep-ratio", type=float, default=f["keep_ratio"], help="fraction of FFN neurons kept, in (0, 1]")
    p.add_argument("--retained-layers", type=_int_list, default=None,
                   help="layers kept whole, e.g. '0 5' (default: first and last)")
    p.add_argument("--selection", choices=SELECTIONS, default=f["selection"])
    p.add_argument("--distill-steps", type=int, default=f["distill_steps"], help="layer-level distillation steps")


def _data_config(a: argparse.Namespace):
    from .config import DataConfig

    kw, _ = preset_values(a.preset)   # the preset's values of the fields that have no flag
    kw.update(fm=a.fm, task=a.data or a.task, max_train=a.max_train, max_test=a.max_test, public=a.public,
              public_blocks=a.public_blocks, balanced=a.balanced, seed=a.seed, device=a.device)
    for name in ("clients", "partition", "alpha", "convention"):
        if hasattr(a, name):
            kw[name] = getattr(a, name)
    if not hasattr(a, "clients"):
        kw.update(clients=1, partition="iid")
    return DataConfig(**kw)


def _fed_config(a: argparse.Namespace, method: str | None = None):
    from .config import FedConfig

    _, kw = preset_values(a.preset)   # the preset's values of the fields that have no flag
    kw.update(method=method or a.method, sample_fraction=a.sample_fraction,
              rounds=a.rounds, local_epochs=a.local_epochs, batch_size=a.batch_size, lr=a.lr,
              keep_ratio=a.keep_ratio,
              retained_layers=a.retained_layers, selection=a.selection, distill_steps=a.distill_steps,
              align_interval=a.align_interval, align_proportion=a.align_proportion,
              align_steps=a.align_steps, align_rule=a.align_rule, lora_rank=a.lora_rank,
              dropout=a.dropout, measure_update=a.measure_update, group_by_length=a.group_by_length,
              seed=a.seed)
    return FedConfig(data=_data_config(a), **kw)


def _add_fed_args(p: argparse.ArgumentParser, preset: str) -> None:
    _, f = preset_values(preset)
    _add_data_args(p, preset, with_clients=True)
    _add_subfm_args(p, preset)
    p.add_argument("--sample-fraction", type=float, default=f["sample_fraction"],
                   help="clients sampled per round, (0, 1]")
    p.add_argument("--rounds", type=int, default=f["rounds"])
    p.add_argument("--local-epochs", type=int, default=f["local_epochs"])
    p.add_argument("--batch-size", type=int, default=f["batch_size"], help="client batch size")
    p.add_argument("--lr", type=float, default=f["lr"], help="initial client learning rate (linear decay over rounds)")
    p.add_argument("--lora-rank", type=int, default=f["lora_rank"])
    p.add_argument("--dropout", action="store_true", default=f["dropout"],
                   help="train clients with dropout (LoRA 0.1 + the FM's own), as the official code; slower")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=f["group_by_length"],
                   help="client batches of similar length: the same epochs with almost no padding, faster "
                        "(default: off, random batches; opt-in until its accuracy check is complete)")
    p.add_argument("--align-interval", type=int, default=f["align_interval"], help="t: align every t rounds")
    p.add_argument("--align-proportion", type=float, default=f["align_proportion"],
                   help="p: fraction of each compressed FFN's neurons updated at an alignment, (0, 1]")
    p.add_argument("--align-steps", type=int, default=f["align_steps"])
    p.add_argument("--align-rule", choices=ALIGN_RULES, default=f["align_rule"])
    p.add_argument("--measure-update", action="store_true", default=f["measure_update"],
                   help="also replay each round's first client on the FM and record the update disparity "
                        "(cosine / relative L2 of the proxy's vs the FM's adapter change; one FM job per round)")
    p.add_argument("--workers", type=int, default=None,
                   help="clients trained at the same time, one thread each (default: one per CPU core; on a GPU "
                        "one); results do not depend on it")


# --------------------------------------------------------------------------- inspect

def cmd_inspect(a: argparse.Namespace) -> dict:
    from . import adapters, models, subfm
    from .core.proxy import wrap_pair
    from .discrepancy import gradient_discrepancy
    from .distill import DistillConfig
    from .workspace import prepare, sub_fm

    t0 = time.perf_counter()
    ws = prepare(_data_config(a))
    sub_cfg = subfm.SubFMConfig(a.keep_ratio, a.retained_layers, a.selection, a.seed)
    built = sub_fm(ws, sub_cfg, DistillConfig(steps=a.distill_steps, seed=a.seed), progress=not a.quiet)
    fm, sub = wrap_pair(ws.fm, built.model, adapters.LoRAConfig(), a.seed)
    d = gradient_discrepancy(fm, sub, ws.probe_batches, state=adapters.adapter_state(fm))
    result = {
        "fm": a.fm, "task": ws.task.name, "keep_ratio": a.keep_ratio, "selection": a.selection,
        "params": {"fm_transformer": models.transformer_params(ws.fm),
                   "sub_transformer": models.transformer_params(built.model)},
        "grad_cosine": d.cosine, "grad_rel_l2": d.rel_l2, "logit_kl": d.logit_kl,
        "per_module": d.per_module,
        "layers": [{"layer": i, "compressed": i in built.info.kept,
                    "kept_neurons": len(built.info.kept.get(i, range(built.info.fm_width[i]))),
                    "fm_neurons": built.info.fm_width[i], "hidden_rel_mse": d.hidden_rel_mse[i],
                    "grad_cosine": next((x["cosine"] for x in d.per_layer if x["layer"] == i), None)}
                   for i in range(built.info.num_layers)],
        "distill_loss": built.distill_loss, "distill_cached": built.cached,
        "seconds": time.perf_counter() - t0,
    }
    _write_json(Path(a.out) / "inspect.json", result)
    if not a.quiet:
        _print_inspect(result)
    return result


def _print_inspect(r: dict) -> None:
    from .models import format_params

    p = r["params"]
    print(f"\nFM {r['fm']}  task {r['task']}  keep_ratio {r['keep_ratio']}  selection {r['selection']}")
    print(f"  transformer params  FM {format_params(p['fm_transformer'])}")
    print(f"                   sub-FM {format_params(p['sub_transformer'])}  "
          f"({p['sub_transformer'] / p['fm_transformer']:.2f}x)")
    if r["distill_loss"]:
        print(f"  layer-level distillation: {len(r['distill_loss'])} steps, loss {r['distill_loss'][0]:.4f} -> "
              f"{r['distill_loss'][-1]:.4f}{' (cached)' if r['distill_cached'] else ''}")
    print(f"  adapter-gradient cosine {r['grad_cosine']:.4f}   relative L2 {r['grad_rel_l2']:.4f}   "
          f"logit KL {r['logit_kl']:.2e}")
    print("  layer  compressed  neurons      hidden rel-MSE")
    for l in r["layers"]:
        print(f"  {l['layer']:>5}  {'yes' if l['compressed'] else 'no':>10}  {l['kept_neurons']:>4}/{l['fm_neurons']:<6}  "
              f"{l['hidden_rel_mse']:.4f}")
    print(f"  ({r['seconds']:.1f}s)")


# --------------------------------------------------------------------------- run / compare

def cmd_run(a: argparse.Namespace) -> dict:
    from .federation import run

    cfg = _fed_config(a)
    out = Path(a.out)
    _restart(a)
    if a.engine != "inprocess" and a.resume:   # a checkpoint of another configuration: say so before any work
        from .federation import read_checkpoint

        read_checkpoint(out, cfg)
    if a.engine == "flower":
        from .engines.flower.deploy import run_flower

        if not a.quiet:
            print(f"a local Flower deployment: 1 SuperLink + {cfg.data.clients} SuperNodes on 127.0.0.1 "
                  f"(logs: {out / 'flower-logs'})", file=sys.stderr)
        metrics = run_flower(cfg, out, resume=a.resume)
    elif a.engine == "flower-sim":
        from .engines.flower.simulation import check_ray, run_flower_sim

        check_ray()
        if not a.quiet:
            print(f"Flower's simulation engine: the ServerApp here, {cfg.data.clients} virtual SuperNodes in Ray "
                  "actors", file=sys.stderr)
        metrics = run_flower_sim(cfg, out, resume=a.resume)
    else:
        metrics = run(cfg, out_dir=out, resume=a.resume, progress=not a.quiet, workers=a.workers)
    if not a.quiet:
        print_run_table(metrics)
        print(f"results: {out / 'metrics.json'}")
    return metrics


def print_run_table(m: dict) -> None:
    from .models import format_params

    print(f"\n{m['method']}: round  FM-acc  sub-acc  grad-cos  rel-L2  aligned  MB-up  MB-down  s")
    for r in m["rounds"]:
        print(f"  {r['round']:>5}  {r['accuracy']:.3f}   {r['sub_accuracy']:.3f}   {r['grad_cosine']:.4f}   "
              f"{r['grad_rel_l2']:.3f}   {'yes' if r['aligned'] else '':>7}  {r['bytes_up'] / 1e6:5.2f}  "
              f"{r['bytes_down'] / 1e6:7.2f}  {r['seconds']:.1f}")
    p, c = m["params"], m["cost"]
    print(f"last-round accuracy {m['final_accuracy']:.4f}  "
          f"(best round {m['best_accuracy']:.4f}: picked on the test set, optimistic)")
    print(f"transformer params: FM {format_params(p['fm_transformer'])}, proxy {format_params(p['sub_transformer'])}; "
          f"trainable {p['trainable']:,}; communication {(c['bytes_up'] + c['bytes_down']) / 1e6:.1f} MB")


def cmd_compare(a: argparse.Namespace) -> dict:
    from .compare import compare, format_table

    base = _fed_config(a, method=a.methods[0])
    _restart(a)
    table = compare(base, a.methods, a.seeds, out_dir=Path(a.out), resume=a.resume, progress=not a.quiet,
                    workers=a.workers, command=a.command_line)
    if not a.quiet:
        print(format_table(table))
        print(f"results: {Path(a.out) / 'compare.json'}")
    return table


def cmd_sweep(a: argparse.Namespace) -> dict:
    from .sweep import format_sweep, sweep

    base = _fed_config(a, method=a.methods[0])
    result = sweep(base, a.param, a.values, a.methods, a.seeds, Path(a.out), resume=a.resume,
                   progress=not a.quiet, workers=a.workers, command=a.command_line)
    if not a.quiet:
        print(format_sweep(result))
        print(f"results: {Path(a.out) / 'sweep.json'}, figure: {Path(a.out) / 'sweep.html'}")
    return result


def cmd_server(a: argparse.Namespace) -> dict:
    from .engines.flower.deploy import serve

    cfg = _fed_config(a)
    _restart(a)
    if a.resume:
        from .federation import read_checkpoint

        read_checkpoint(Path(a.out), cfg)
    metrics = serve(cfg, Path(a.out), a.host, a.port, resume=a.resume)
    if not a.quiet:
        print_run_table(metrics)
        print(f"results: {Path(a.out) / 'metrics.json'}")
    return metrics


def cmd_client(a: argparse.Namespace) -> int:
    from .engines.flower.deploy import join

    if not 0 <= a.partition_id < a.num_partitions:
        raise ConfigError(f"--partition-id must be in [0, {a.num_partitions - 1}], got {a.partition_id}")
    return join(a.server, a.partition_id, a.num_partitions, a.port)


def cmd_bench(a: argparse.Namespace) -> dict:
    from .bench import main as bench_main

    return bench_main(a)


def cmd_report(a: argparse.Namespace) -> str:
    from .report import write_report

    path = write_report(Path(a.dir), Path(a.output) if a.output else None)
    print(f"report: {path}")
    return str(path)


def cmd_student_edition(a: argparse.Namespace) -> list[str]:
    from .editions import write_student_edition
    from .paths import LABS_DIR

    written = write_student_edition(Path(a.out_dir), Path(a.labs) if a.labs else LABS_DIR)
    for path in written:
        print(path)
    print(f"student edition: {sum(p.suffix == '.ipynb' for p in written)} notebooks in {a.out_dir} "
          "(exercise cells hold stubs; the labs in the checkout keep the solutions)")
    return [str(p) for p in written]


def cmd_warm(a: argparse.Namespace) -> list[dict]:
    """Run every lab once, headless, at its default size: afterwards the room's first Run All hits warm caches
    (token caches, distilled sub-FMs, the federated runs labs 04-06 share) instead of distilling for minutes."""
    from .bench import notebook_times
    from .paths import LABS_DIR, lab_notebooks

    notebooks = lab_notebooks(Path(a.labs) if a.labs else LABS_DIR)
    if a.only:
        wanted = {n.zfill(2) for n in a.only}
        notebooks = [nb for nb in notebooks if nb.name[:2] in wanted]
        if not notebooks:
            raise ConfigError(f"--only {' '.join(a.only)}: no lab with that number (allowed: 01 to 99, as in labs/)")
    results = []
    for nb in notebooks:   # one at a time, so each line prints as soon as its lab is done
        (r,) = notebook_times([nb], smoke_settings=(a.smoke,))
        print(f"{r['notebook']:<40} {r['seconds']:6.1f} s  {'ok' if r['ok'] else 'FAILED: ' + r['error']}", flush=True)
        results.append(r)
    failed = [r["notebook"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} labs ran, {sum(r['seconds'] for r in results):.0f} s in all"
          + (f"; failed: {', '.join(failed)}" if failed else "; caches are warm"))
    if failed:
        raise SystemExit(1)
    return results


def _restart(a: argparse.Namespace) -> None:
    """--restart: move the previous results in --out aside (never delete them) so the run starts over."""
    out = Path(a.out).resolve()
    if a.restart and out.is_dir() and any(out.iterdir()):
        from .io import move_aside

        print(f"--restart: moved the previous contents of {out} to {move_aside(out, 'replaced')}", file=sys.stderr)


def _write_json(path: Path, obj: dict) -> None:
    from .io import atomic_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_json(obj, path)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's flags: one list for ``fedpft-lab bench`` and ``python -m fedpft_lab.bench`` (its own process
    for each clients-scaling point), so the two never drift apart."""
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--skip-notebooks", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (for a smoke check)")
    p.add_argument("--fm", default=DEFAULT_FM, help="minilm (default) or tiny-bert for a seconds-long check")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); 1 is faster when other jobs share the CPU")
    p.add_argument("--only", choices=BENCH_ONLY, default=None, help=BENCH_ONLY_HELP)
    p.add_argument("--repeats", type=int, default=1, help="default-speed: runs of each path, alternating; precision: "
                                                                 "timed passes of each precision (at least 3)")
    p.add_argument("--baseline", default=None, metavar="GIT_REVISION",
                   help="default-speed: the code to compare with (default: the commit of main when the faster "
                        "default run was asked for, fedpft_lab.bench.SPEED_BASELINE)")
    p.add_argument("--scaling-point", type=int, default=None, help=argparse.SUPPRESS)  # a child of clients-scaling


def build_parser(preset: str = DEFAULT_PRESET) -> argparse.ArgumentParser:
    """The CLI. ``preset``'s values are the defaults of the size flags (main() finds ``--preset`` first).

    Builds in milliseconds: only fedpft_lab.config/presets are imported here, every command imports its own work.
    """
    preset = preset if preset in PRESETS else DEFAULT_PRESET   # an unknown name: argparse's choices report it
    parser = argparse.ArgumentParser(prog="fedpft-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("inspect", help="build (and optionally distil) a sub-FM; report params and discrepancy")
    _add_data_args(p, preset)
    _add_subfm_args(p, preset)
    p.set_defaults(distill_steps=0)
    p.add_argument("--out", default="runs/inspect")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="run one federated method (default: FedPFT on the offline default)")
    p.add_argument("--method", choices=METHODS, default="fedpft")
    _add_fed_args(p, preset)
    p.add_argument("--out", default="runs/run")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    again.add_argument("--restart", action="store_true",
                       help="start over in --out; a previous run there is moved aside to <out>.replaced-<time>")
    p.add_argument("--engine", choices=ENGINES, default="inprocess",
                   help="inprocess (default): clients on threads in this process; flower-sim: Flower's simulation "
                        "engine, clients in Ray actors (extra [flower-sim]); flower: a local Flower deployment, one "
                        "SuperLink and one SuperNode process per client on 127.0.0.1 (same numbers on all three)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("server", help="serve one configured run to a room over Flower (SuperLink + ServerApp)")
    p.add_argument("--method", choices=METHODS, default="fedpft")
    _add_fed_args(p, preset)
    p.add_argument("--host", default="0.0.0.0", help="address the SuperLink listens on (default: every interface)")
    p.add_argument("--port", type=int, default=9092, help="the SuperLink's port (default 9092)")
    p.add_argument("--out", default="runs/server")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run saved in --out (a restarted server; clients get their proxies again)")
    again.add_argument("--restart", action="store_true",
                       help="start over in --out; a previous run there is moved aside to <out>.replaced-<time>")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("client", help="join a room's run as one client: a Flower SuperNode serving one shard")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the address `fedpft-lab server` printed")
    p.add_argument("--partition-id", type=int, required=True, help="which client (shard) this machine is, 0-based")
    p.add_argument("--num-partitions", type=int, required=True, help="how many clients the run has")
    p.add_argument("--port", type=int, default=None, help="this SuperNode's local port (default: a free one)")
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("compare", help="several methods x seeds on identical splits, as in the paper's tables")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    _add_fed_args(p, preset)
    p.add_argument("--out", default="runs/compare")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="reuse finished runs in --out and continue partial ones")
    again.add_argument("--restart", action="store_true",
                       help="start over in --out; previous results there are moved aside to <out>.replaced-<time>")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="the paper's parameter study: compare at each value of one parameter")
    p.add_argument("--param", required=True, help=f"the parameter to vary: {', '.join(SWEEP_PARAM_TYPES)}")
    p.add_argument("--values", nargs="+", required=True, help="its values, in the order to plot them")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["fedpft", "fedpft-n"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    _add_fed_args(p, preset)
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--resume", action="store_true", help="reuse finished runs in --out and continue partial ones")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("bench", help="measure throughput, FLOP efficiency, round and notebook times")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="one self-contained HTML page (works offline) from a run or compare folder")
    p.add_argument("dir", help="a folder written by `fedpft-lab run` (metrics.json) or `fedpft-lab compare` "
                               "(compare.json)")
    p.add_argument("-o", "--output", default=None, help="the HTML file to write (default: DIR/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("student-edition", help="write the labs with their exercises unsolved (the committed labs "
                                               "are the instructor edition)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where the student notebooks go (not the labs folder itself)")
    p.add_argument("--labs", default=None,
                   help="the folder of the instructor edition (default: labs/ of this checkout)")
    p.set_defaults(func=cmd_student_edition)

    p = sub.add_parser("warm", help="run every lab once, headless, at its default size, so a room's first Run All "
                                    "finds the caches warm (labs/INSTRUCTOR.md)")
    p.add_argument("--only", nargs="+", default=None, metavar="NN", help="only these labs, e.g. --only 03 04")
    p.add_argument("--smoke", action="store_true", help="SMOKE sizes (seconds; warms only the SMOKE caches)")
    p.add_argument("--labs", default=None, help="the folder of the labs (default: labs/ of this checkout)")
    p.set_defaults(func=cmd_warm)
    return parser


def _preset_in(argv: list[str]) -> str:
    """The ``--preset`` named in ``argv`` (or the default), read before the real parser is built."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=DEFAULT_PRESET)
    return pre.parse_known_args(argv)[0].preset


def main(argv: list[str] | None = None) -> int:
    from .paths import set_offline_env

    set_offline_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["run"]  # the main job: FedPFT on the offline default at workshop size
    args = build_parser(_preset_in(argv)).parse_args(argv)
    args.command_line = shlex.join(["fedpft-lab", *argv])  # stored with compare/sweep results
    if getattr(args, "allow_unsafe_weights", False):
        from .models import PICKLE_OPT_IN

        os.environ[PICKLE_OPT_IN] = "1"
    if not hasattr(args, "func"):
        build_parser().print_help()
        return 2
    try:
        args.func(args)
    except ConfigError as e:
        print(f"fedpft-lab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: results written so far are kept (use --resume to continue)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
