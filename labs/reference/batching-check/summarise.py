"""Old (random client batches) vs new (length-grouped) last-round accuracy, paired by seed, from two compare folders."""
import json, sys
from pathlib import Path
from fedpft_lab.stats import mean_ci, paired_diff
old_dir, new_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
methods = ["fedpft", "fedpft-n", "fedot", "fedpetuning"]
def finished(d, m):
    res = {}
    for f in sorted((d / m).glob("seed*/metrics.json")):
        x = json.loads(f.read_text())
        if len(x["rounds"]) == x["config"]["rounds"] + 1:
            res[int(f.parent.name[4:])] = x
    return res
table = {"metric": "final_accuracy (FM, last round)", "pairs": "per seed: grouped minus random", "methods": {}}
lines = ["| method | seeds | random (before) | grouped (now) | grouped - random, mean [95% CI] |", "|---|---|---|---|---|"]
for m in methods:
    a, b = finished(old_dir, m), finished(new_dir, m)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        continue
    ra = {s: a[s]["final_accuracy"] for s in seeds}; rb = {s: b[s]["final_accuracy"] for s in seeds}
    d = paired_diff(rb, ra)
    table["methods"][m] = {"seeds": seeds, "random": ra, "grouped": rb, "diff": d,
                           "seconds_random": {s: a[s]["cost"]["seconds"] for s in seeds},
                           "seconds_grouped": {s: b[s]["cost"]["seconds"] for s in seeds}}
    ci = f"[{100*d['ci'][0]:+.1f}, {100*d['ci'][1]:+.1f}]" if d["ci"] else "(one seed: no interval)"
    lines.append(f"| {m} | {','.join(map(str, seeds))} | {', '.join(f'{100*ra[s]:.1f}' for s in seeds)} | "
                 f"{', '.join(f'{100*rb[s]:.1f}' for s in seeds)} | {100*d['mean']:+.1f} {ci} |")
diffs = [table["methods"][m]["grouped"][s] - table["methods"][m]["random"][s]
         for m in table["methods"] for s in table["methods"][m]["seeds"]]
if diffs:
    pooled = mean_ci(diffs)
    table["pooled"] = pooled   # every (method, seed) pair, as if independent: a rough overall read
    ci = f"[{100*pooled['ci'][0]:+.1f}, {100*pooled['ci'][1]:+.1f}]" if pooled["ci"] else ""
    lines.append(f"| all pairs | {len(diffs)} pairs | | | {100*pooled['mean']:+.1f} {ci} |")
out.mkdir(parents=True, exist_ok=True)
(out / "check.json").write_text(json.dumps(table, indent=1))
print("\n".join(lines))
