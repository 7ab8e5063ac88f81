"""The fidelity summary of a model on one detector's held-out showers, and the goals it is held to.

What a calorimeter physicist checks first, in one row per detector: the worst incident-energy bin's mean E_dep / E_inc
and relative spread against the data's (`calofm.evaluate.response`), FPD in calofm's and the CaloChallenge's
definitions, and the classifier AUC on high-level features; beside it the coherence of the shower's centre across
depth, generated and data, whose lack accounts for most of the shipped model's AUC (benchmarks/fidelity.md). The
demo's report and the shipped models' cards (`calofm/pretrained`) are built from these rows.
"""

from __future__ import annotations

from pathlib import Path

from calofm.data.formats import Showers

# The goals of a pretrained model on held-out showers (CaloDiT-2's FPD on CaloChallenge dataset 2 is 20.1e-3 for
# EDM; its 1-step CD is 3.4x its teacher's): mean E_dep / E_inc and its relative spread per E_inc bin within these
# fractions of the data's, FPD and classifier AUC on high-level features at most these.
GOALS = {"edm": {"mean": 0.02, "spread": 0.10, "fpd": 20e-3, "auc_high": 0.65},
         "cd": {"mean": 0.03, "spread": 0.15, "fpd_vs_teacher": 3.0}}
# "observables" adds no figure to the row: it puts the shower observables' and profiles' plots in the report.
METRICS = ["response", "observables", "fpd", "fpd_cc", "auc_high", "coherence"]

NOTE = ("Held-out synthetic showers, one generated at each one's (E, theta, phi). Mean ratio and spread ratio: "
        "generated / data of the mean E_dep / E_inc and of its relative spread, in the five log-spaced E_inc bins "
        "of `calofm.evaluate.response`; the bin furthest from 1 is shown. FPD x1e3 in calofm's definition "
        "(44 features, data vs data ~0) and the CaloChallenge's (362 features; two independent samples of 2,000 "
        "stand-in showers of one detector score ~340-400, so that is the floor here, not 0).")


def fidelity(reference: Showers, generated: Showers, folder: str | Path, detector: str) -> dict:
    """`calofm.evaluate` of `generated` against `reference` into `folder`, summarised as one row."""
    from calofm.evaluate.report import evaluate

    r = evaluate(reference, generated, folder, metrics=METRICS, detector=detector)
    worst = {k: max(r["response"], key=lambda row, k=k: abs(row[k] - 1)) for k in ("mean_ratio", "spread_ratio")}
    return {"n": len(reference),
            "mean_ratio": worst["mean_ratio"]["mean_ratio"], "mean_ratio_error": worst["mean_ratio"]["mean_ratio_error"],
            "spread_ratio": worst["spread_ratio"]["spread_ratio"],
            "spread_ratio_error": worst["spread_ratio"]["spread_ratio_error"],
            "fpd": r["fpd"], "fpd_cc": r["fpd_cc"], "auc_high": r["auc_high"]["value"],
            "auc_high_error": r["auc_high"]["error"], "coherence": r["coherence"]}


def table(summary: dict[str, dict], goals: dict | None = None, teacher: dict[str, dict] | None = None,
          links: dict[str, str] | None = None) -> str:
    """A markdown table of `fidelity` rows by detector (name -> row), with the goal row and the FPD as a multiple
    of the `teacher`'s where given, and a link to each detector's report where given."""
    head = ("| detector | showers | worst mean ratio | worst spread ratio | FPD x1e3 (calofm) | "
            "FPD x1e3 (CaloChallenge) | AUC high-level | centre coherence gen / data |" + (" report |" if links else "")
            + "\n|---|---|---|---|---|---|---|---|" + ("---|" if links else "") + "\n")
    rows = []
    for d, s in summary.items():
        fpd = f"{s['fpd']['value'] * 1e3:.3g} ± {s['fpd']['error'] * 1e3:.2g}"
        if teacher is not None and d in teacher:
            fpd += f" ({s['fpd']['value'] / teacher[d]['fpd']['value']:.2g}x EDM)"
        rows.append(f"| {d} | {s['n']:,} | {s['mean_ratio']:.3f} ± {s['mean_ratio_error']:.3f} | "
                    f"{s['spread_ratio']:.2f} ± {s['spread_ratio_error']:.2f} | {fpd} | "
                    f"{s['fpd_cc']['value'] * 1e3:.3g} ± {s['fpd_cc']['error'] * 1e3:.2g} | {auc_text(s)} | "
                    f"{_coherence(s)} |" + (f" [report]({links[d]}) |" if links else ""))
    if goals:
        fpd_goal = (f"<= {goals['fpd_vs_teacher']:g}x the EDM teacher's" if "fpd_vs_teacher" in goals
                    else f"<= {goals['fpd'] * 1e3:g}")
        auc_goal = f"<= {goals['auc_high']:g}" if "auc_high" in goals else "–"
        rows.append(f"| **goal** | | within {goals['mean'] * 100:g}% | within {goals['spread'] * 100:g}% | "
                    f"{fpd_goal} | data vs data: see note | {auc_goal} | the data's |" + (" |" if links else ""))
    return head + "\n".join(rows) + "\n"


def auc_text(row: dict) -> str:
    """"value ± error" of a row's classifier AUC; the value alone for rows scored before its error was."""
    return f"{row['auc_high']:.3f}" + (f" ± {row['auc_high_error']:.3f}" if "auc_high_error" in row else "")


def _coherence(row: dict) -> str:
    """"gen ± e / data ± e" of a row's centre coherence; "–" for rows scored before it was measured."""
    c = row.get("coherence")
    return "–" if c is None else " / ".join(f"{c[k]['value']:.2f} ± {c[k]['error']:.2f}" for k in ("generated", "reference"))


def card_metrics(summary: dict[str, dict]) -> dict[str, dict]:
    """The rows as a model card lists them (`calofm.hub.metric_rows`): per detector, value ± error pairs."""
    def card_row(s: dict) -> dict:
        row = {"showers": s["n"],
               "worst mean E_dep/E_inc ratio": [s["mean_ratio"], s["mean_ratio_error"]],
               "worst relative-spread ratio": [s["spread_ratio"], s["spread_ratio_error"]],
               "FPD x1e3 (calofm)": [s["fpd"]["value"] * 1e3, s["fpd"]["error"] * 1e3],
               "FPD x1e3 (CaloChallenge)": [s["fpd_cc"]["value"] * 1e3, s["fpd_cc"]["error"] * 1e3],
               "classifier AUC (high-level)": ([s["auc_high"], s["auc_high_error"]] if "auc_high_error" in s
                                               else s["auc_high"])}
        for role, label in (("generated", "generated"), ("reference", "data")) if "coherence" in s else ():
            row[f"centre coherence across depth, {label}"] = [s["coherence"][role]["value"], s["coherence"][role]["error"]]
        return row

    return {d: card_row(s) for d, s in summary.items()}
