"""Step distillation compared: students of the demo model by method, at 1, 2 and 4 steps, against the teacher.

    python benchmarks/distill.py --student regression=runs/students/reg-4step --student lcm=runs/students/lcm-4step \\
        [--steps 1,2,4] [--prompts 240] [--json distill.json] [--html distill.html]

Every figure is measured here on the demo's held-out prompts (guidance 4, image i at seed i):
prompt accuracy per attribute and all five at once, the Fréchet distance of the shapes
classifier's features against renders of the same prompts, and diversity across seeds
(``pocketfusion.demo.students.measure``). A model whose manifest already holds those figures for
the same prompts (``metrics.evaluation.by_steps``, written by ``python -m pocketfusion.demo.students
ship``) is read, not generated again, unless ``--remeasure``. Each student's training cost (wall
time, device, iterations, batch) comes from its manifest. The HTML page plots all-five accuracy and
the Fréchet distance against steps per method, the teacher's figure as a line.
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path


def _evaluation(model, steps: list[int], n_prompts: int | None, remeasure: bool) -> dict[str, dict]:
    """Figures by step count: the manifest's when it has them for these prompts, else measured now."""
    from pocketfusion import artifact
    from pocketfusion.demo.students import measure
    from pocketfusion.demo.suite import demo_suite

    n = len(demo_suite().heldout(n_prompts))
    shipped = artifact.load_manifest(model.path, verify=False).metrics.get("evaluation") or {}
    have = shipped.get("by_steps") or ({str(shipped["steps"]): shipped} if "steps" in shipped else {})
    out = {}
    for s in steps:
        got = have.get(str(s))
        if got is not None and got.get("prompts") == n and not remeasure:
            out[str(s)] = dict(got, source="manifest")
        else:
            out[str(s)] = dict(measure(model, steps=s, n_prompts=n_prompts), source="measured")
    return out


def compare(students: dict[str, Path], *, teacher: Path | None = None, steps: tuple[int, ...] = (1, 2, 4),
            n_prompts: int | None = None, remeasure: bool = False) -> dict:
    from pocketfusion import artifact
    from pocketfusion.checkpoint import find_source, load_model
    from pocketfusion.generate import default_steps

    models = {label: load_model(path) for label, path in students.items()}
    if teacher is None:
        found = {p for p in (find_source(m) for m in models.values()) if p is not None}
        if len(found) != 1:
            raise SystemExit(f"error: the students' teachers are {sorted(map(str, found)) or 'not found'}: give --teacher DIR")
        teacher = found.pop()
    tmodel = load_model(teacher)
    tsteps = default_steps(tmodel)
    out = {"teacher": {"path": str(teacher), "steps": tsteps,
                       **_evaluation(tmodel, [tsteps], n_prompts, remeasure)[str(tsteps)]}, "students": {}}
    for label, m in models.items():
        man = artifact.load_manifest(m.path, verify=False)
        ev = _evaluation(m, list(steps), n_prompts, remeasure)
        ratio = {s: round(e["all_correct"] / out["teacher"]["all_correct"], 4) for s, e in ev.items()}
        out["students"][label] = {"path": str(m.path), "training": man.metrics.get("training"), "by_steps": ev,
                                  "all_correct_ratio_to_teacher": ratio}
    return out


def _plot(res: dict) -> str:
    from pocketfusion.runtimes.base import require
    from pocketfusion.runtimes.report import _png

    plt = require("matplotlib.pyplot", "report")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    t = res["teacher"]
    panels = ((axes[0], "all_correct", "all five attributes correct"), (axes[1], "frechet", "Fréchet distance (lower: closer)"))
    for ax, key, name in panels:
        for i, (label, s) in enumerate(res["students"].items()):
            xs = sorted(int(k) for k in s["by_steps"])
            ax.plot(xs, [s["by_steps"][str(x)][key] for x in xs], marker="o", color=f"C{i}", label=label)
        ax.axhline(t[key], color="k", linestyle="--", label=f"teacher ({t['steps']} steps, CFG)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4], ["1", "2", "4"])
        ax.set_xlabel("sampling steps")
        ax.set_title(name, fontsize=10)
    axes[0].legend(fontsize=8)
    plt.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def render(res: dict) -> str:
    rows = []
    t = res["teacher"]
    attrs = list(t["per_attribute"])

    def row(label, steps, e, cost=""):
        cells = "".join(f"<td>{e['per_attribute'][a]:.1%}</td>" for a in attrs)
        return (f"<tr><td>{html.escape(label)}</td><td>{steps}</td>{cells}<td>{e['all_correct']:.1%}</td><td>{e['frechet']:.1f}</td>"
                f"<td>{e['diversity']:.2f}</td><td>{cost}</td></tr>")

    rows.append(row("teacher", t["steps"], t))
    for label, s in res["students"].items():
        tr = s.get("training") or {}
        cost = (f"{tr.get('wall_s', 0) / 60:.1f} min on {html.escape(str(tr.get('device')))}, {tr.get('iterations')} it x "
                f"{tr.get('batch_size')}" if tr else "")
        for k in sorted(s["by_steps"], key=int):
            rows.append(row(label, k, s["by_steps"][k], cost))
    head = "".join(f"<th>{html.escape(a)}</th>" for a in attrs)
    table = (f"<table><tr><th>model</th><th>steps</th>{head}<th>all five</th><th>Fréchet</th><th>diversity</th><th>training</th></tr>"
             f"{''.join(rows)}</table>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>pocketfusion step distillation</title></head><body>"
            "<h1>Step distillation: accuracy against steps, per method</h1>"
            f"<p>Held-out prompts: {t['prompts']}; guidance {t['guidance']}; Fréchet floor (renders against renders) "
            f"{t.get('frechet_renders', float('nan')):.1f}.</p>"
            f"<img src='data:image/png;base64,{_plot(res)}'>{table}</body></html>")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", action="append", required=True, help="LABEL=DIR (a distilled student), repeatable")
    ap.add_argument("--teacher", default=None, help="the teacher (default: the students' source, found by content hash)")
    ap.add_argument("--steps", default="1,2,4")
    ap.add_argument("--prompts", type=int, default=None, help="held-out prompts (default: all 240)")
    ap.add_argument("--remeasure", action="store_true", help="generate again even where a manifest holds the figures")
    ap.add_argument("--json", default=None)
    ap.add_argument("--html", default=None)
    args = ap.parse_args(argv)
    students = {}
    for item in args.student:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            raise SystemExit(f"error: --student {item!r}: LABEL=DIR with an existing directory")
        students[label] = Path(path)
    from pocketfusion.artifact import atomic_write_text

    res = compare(students, teacher=Path(args.teacher) if args.teacher else None,
                  steps=tuple(int(s) for s in args.steps.split(",")), n_prompts=args.prompts, remeasure=args.remeasure)
    for label, s in res["students"].items():
        for k, e in sorted(s["by_steps"].items(), key=lambda kv: int(kv[0])):
            print(f"{label:<12} {k} step(s): all five {e['all_correct']:.1%} ({s['all_correct_ratio_to_teacher'][k]:.1%} of the "
                  f"teacher's {res['teacher']['all_correct']:.1%}), worst {min(e['per_attribute'].items(), key=lambda kv: kv[1])}, "
                  f"Fréchet {e['frechet']:.1f}, diversity {e['diversity']:.2f}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res, indent=2) + "\n")
    if args.html:
        atomic_write_text(Path(args.html), render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
