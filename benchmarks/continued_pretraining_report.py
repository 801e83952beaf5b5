"""The continued pre-training benchmark's goals and plot: pure functions of its result rows.

The issue's goals, judged at each run length with complete runs of every method: qapollo's in-domain and
general held-out loss at its best lr within GOAL_QAPOLLO nats above AdamW's at its best lr, and lean +
lagged within GOAL_LEAN of qapollo. A method's best lr is the one with the lowest in-domain loss averaged
over its seeds; gaps are averaged over the seeds both methods ran (each seed sees the same batches in
every method, so a gap is paired), and each seed's gap is kept to show the noise.
"""
from __future__ import annotations

import math
from statistics import mean

GOAL_QAPOLLO, GOAL_LEAN = 0.02, 0.03


def within(d: dict, goal: float) -> bool:
    """Both held-out gaps at most `goal` (losses are kept to 5 decimals: a gap of exactly the goal meets it)."""
    return max(d["indomain"], d["general"]) <= goal + 1e-9


def shipped_ratio(r: dict) -> bool:
    """AdamW, or a qapollo run whose float tensors step at the presets' lr / 5 (not a --float-lr probe)."""
    return r["float_lr"] is None or math.isclose(r["float_lr"], r["lr"] / 5)


def shipped(r: dict) -> bool:
    """A run of a method as shipped: the presets' float-lr ratio, no --set probe override, not superseded."""
    return shipped_ratio(r) and not r.get("overrides") and not r.get("superseded")


def best(rows: list[dict], method: str, steps: int) -> dict | None:
    by_lr: dict[float, list[dict]] = {}
    for r in rows:
        if r["method"] == method and r["steps"] == steps and r["complete"] and shipped(r):
            by_lr.setdefault(r["lr"], []).append(r)
    if not by_lr:
        return None
    lr, runs = min(by_lr.items(), key=lambda kv: mean(x["indomain"] for x in kv[1]))
    return {"lr": lr, "tokens": runs[0]["tokens"], "seeds": sorted(x["seed"] for x in runs),
            "indomain": mean(x["indomain"] for x in runs), "general": mean(x["general"] for x in runs),
            "by_seed": {x["seed"]: (x["indomain"], x["general"]) for x in runs}}


def gap(base: dict, other: dict) -> dict | None:
    """other − base over the seeds both ran (None when they share none)."""
    seeds = sorted(set(base["by_seed"]) & set(other["by_seed"]))
    if not seeds:
        return None
    d = {k: [other["by_seed"][s][i] - base["by_seed"][s][i] for s in seeds] for i, k in enumerate(("indomain", "general"))}
    return {"seeds": seeds, **{k: mean(v) for k, v in d.items()}, **{f"{k}_by_seed": v for k, v in d.items()}}


def goals(rows: list[dict]) -> list[dict]:
    out = []
    for steps in sorted({r["steps"] for r in rows}):
        b = {m: best(rows, m, steps) for m in ("adamw", "qapollo", "qapollo_lean_lagged")}
        if b["adamw"] is None or b["qapollo"] is None:
            continue
        g = {"steps": steps, "tokens": b["adamw"]["tokens"], "best": b, "qapollo_vs_adamw": gap(b["adamw"], b["qapollo"])}
        g["qapollo_met"] = None if g["qapollo_vs_adamw"] is None else within(g["qapollo_vs_adamw"], GOAL_QAPOLLO)
        if b["qapollo_lean_lagged"] is not None:
            g["lean_vs_qapollo"] = lean = gap(b["qapollo"], b["qapollo_lean_lagged"])
            g["lean_met"] = None if lean is None else within(lean, GOAL_LEAN)
        out.append(g)
    return out


def print_goals(gs: list[dict]) -> None:
    def cell(x):
        return "–" if x is None else f"lr {x['lr']:g}, seeds {x['seeds']}: {x['indomain']:.4f} / {x['general']:.4f}"

    def diff(d, goal):
        if d is None:
            return "–"
        per = ", ".join(f"{a:+.3f}/{b:+.3f}" for a, b in zip(d["indomain_by_seed"], d["general_by_seed"]))
        ok = "met" if within(d, goal) else "missed"
        return f"**{d['indomain']:+.3f} / {d['general']:+.3f}** ({ok}; per seed {per})"

    print("\n| tokens | AdamW (in-domain / general) | qapollo | lean + lagged | qapollo − AdamW (goal ≤ +0.02) | "
          "lean − qapollo (goal ≤ +0.03) |")
    print("|---|---|---|---|---|---|")
    for g in gs:
        b = g["best"]
        print(f"| {g['tokens']:,} | {cell(b['adamw'])} | {cell(b['qapollo'])} | {cell(b['qapollo_lean_lagged'])} | "
              f"{diff(g['qapollo_vs_adamw'], GOAL_QAPOLLO)} | {diff(g.get('lean_vs_qapollo'), GOAL_LEAN)} |")


def plot(rows: list[dict], path: str, tokens_per_step: int) -> None:
    """One row of panels per run length (the lr sweep, then the longer runs), in-domain left, general right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = sorted({r["steps"] for r in rows})
    fig, grid = plt.subplots(len(lengths), 2, figsize=(16, 4.5 * len(lengths)), squeeze=False)
    lrs = sorted({lr_key(x) for x in rows})  # the same lr draws the same line in every method and panel
    for axes, steps in zip(grid, lengths):
        panel(axes, [r for r in rows if r["steps"] == steps], f"{steps * tokens_per_step:,}-token runs", lrs)
    fig.suptitle("Continued pre-training of SmolLM2-135M: qapollo vs float AdamW")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legends sit outside the panels


def lr_key(r: dict) -> tuple:
    """A run's lr, its float lr where a --float-lr probe set one, and a --set probe's overrides."""
    return r["lr"], 0 if shipped_ratio(r) else r["float_lr"], tuple(r.get("overrides", []))


def panel(axes, rows: list[dict], length: str, lrs: list[tuple]) -> None:
    colors = {"adamw": "tab:blue", "qapollo": "tab:orange", "qapollo_lean_lagged": "tab:green"}
    styles = ((0, (1, 1)), "--", "-", "-.", ":", (0, (5, 1)))  # one per lr (and float lr), smallest first
    for r in rows:
        probe = [o.split(".", 1)[-1] for o in r.get("overrides", [])]  # section names dropped: a shorter legend
        label = " ".join([r["method"], *probe, f"lr {r['lr']:g}"]) + \
            ("" if shipped_ratio(r) else f" float {r['float_lr']:g}") + f" s{r['seed']}"
        color = "tab:purple" if r.get("overrides") else "0.6" if r.get("superseded") else colors[r["method"]]
        label += f" ({r['superseded']})" if r.get("superseded") else ""
        for ax, key in zip(axes, ("indomain", "general")):
            ys = [c[key] for c in r["curve"]]
            top = r["curve"][0][key] + 0.1  # a diverged run would squash the others: its points above are cut
            ax.plot([c["tokens"] for c in r["curve"]], [min(y, top) for y in ys], color=color,
                    linestyle=styles[lrs.index(lr_key(r)) % len(styles)],
                    alpha=1.0 if r["seed"] == 0 else 0.5, marker="." if r["seed"] == 0 else "x", label=label)
            for c, y in zip(r["curve"], ys):
                if y > top:
                    ax.annotate(f"{y:.2f} (cut)", (c["tokens"], top), fontsize=7, color=color)
    for ax, title in zip(axes, ("in-domain held-out (Persuasion, Hamlet)", "general held-out (Python docs)")):
        ax.set_title(f"{title}, {length}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the panel: never over a line
