"""The continued pre-training benchmark's goal arithmetic (benchmarks/continued_pretraining_report.py).

The goals decide what the benchmark reports as met or missed, so the choices they rest on are checked on
made-up rows: a method's best lr is the lowest in-domain mean over its seeds, a gap is paired per seed,
runs under way or stopped as diverged and --float-lr probes take no part.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.continued_pretraining_report import goals  # noqa: E402


def row(method, lr, seed, indomain, general, steps=74, complete=True, float_lr="ratio"):
    flr = None if method == "adamw" else lr / 5 if float_lr == "ratio" else float_lr
    return {"method": method, "lr": lr, "float_lr": flr, "seed": seed, "steps": steps, "tokens": steps * 4096,
            "indomain": indomain, "general": general, "complete": complete}


def test_best_lr_is_the_seed_mean_and_gaps_are_paired():
    rows = [row("adamw", 3e-4, 0, 3.70, 3.00), row("adamw", 3e-4, 1, 3.80, 3.10),
            row("adamw", 1e-4, 0, 3.69, 3.00), row("adamw", 1e-4, 1, 3.95, 3.20),  # better seed 0, worse mean
            row("qapollo", 3e-4, 0, 3.71, 3.02), row("qapollo", 3e-4, 1, 3.84, 3.11),
            row("qapollo", 1e-3, 0, 3.60, 3.00, complete=False),  # diverged / under way: not a result
            row("qapollo", 3e-4, 0, 3.50, 2.90, float_lr=3e-4), row("qapollo", 3e-4, 1, 3.50, 2.90, float_lr=3e-4),
            row("qapollo_lean_lagged", 3e-4, 0, 3.75, 3.03)]  # one seed so far
    (g,) = goals(rows)
    assert g["best"]["adamw"]["lr"] == 3e-4 and g["best"]["qapollo"]["lr"] == 3e-4
    q = g["qapollo_vs_adamw"]
    assert q["seeds"] == [0, 1]
    assert q["indomain_by_seed"] == pytest.approx([0.01, 0.04]) and q["indomain"] == pytest.approx(0.025)
    assert q["general"] == pytest.approx(0.015)
    assert not g["qapollo_met"]  # in-domain +0.025 > 0.02
    lean = g["lean_vs_qapollo"]
    assert lean["seeds"] == [0] and lean["indomain"] == pytest.approx(0.04) and not g["lean_met"]


def test_goal_met_and_lengths_kept_apart():
    rows = [row("adamw", 3e-4, 0, 3.70, 3.00, steps=25), row("qapollo", 3e-4, 0, 3.72, 3.01, steps=25),
            row("qapollo", 3e-4, 0, 3.60, 2.95), row("qapollo_lean_lagged", 3e-4, 0, 3.62, 2.97)]
    (g,) = goals(rows)  # the longer runs have no AdamW run yet: no goal for them
    assert g["steps"] == 25 and g["qapollo_met"] and "lean_vs_qapollo" not in g


def test_no_shared_seed_is_no_verdict():
    rows = [row("adamw", 3e-4, 0, 3.70, 3.00), row("qapollo", 3e-4, 1, 3.90, 3.20)]
    (g,) = goals(rows)
    assert g["qapollo_vs_adamw"] is None and g["qapollo_met"] is None


def test_probes_and_superseded_runs_take_no_part():
    """A --set probe (e.g. float weights) is a diagnosis, and a run of code since fixed is history: neither
    is the method as shipped."""
    probe = {**row("qapollo", 3e-4, 0, 3.60, 2.90), "overrides": ["model.weight_quant=false"]}
    old = {**row("qapollo", 1e-4, 0, 3.50, 2.90), "superseded": "bf16-nearest"}
    (g,) = goals([row("adamw", 3e-4, 0, 3.70, 3.00), row("qapollo", 3e-4, 0, 3.75, 3.01), probe, old])
    assert g["qapollo_vs_adamw"]["indomain"] == pytest.approx(0.05) and not g["qapollo_met"]
