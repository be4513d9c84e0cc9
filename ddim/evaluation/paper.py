"""The DDIM paper's Table 1 and Table 2 (CIFAR-10) beside ours, and which of its trends ours share.

The values are not comparable (other data, model and feature space); the trends are: how the error
moves with the number of steps S and with η. :func:`compare_with_paper` checks each trend the paper
shows on our rows and says where they agree and where they do not.
"""

from __future__ import annotations

import math
from typing import Any

from ddim.evaluation.common import fmt, markdown_table

__all__ = ["PAPER_TABLE1", "PAPER_TABLE1_SIGMA_HAT", "PAPER_TABLE2", "compare_with_paper", "trend_checks"]

#: Song, Meng & Ermon (ICLR 2021), Table 1: CIFAR-10 FID (Inception, 50k samples), quadratic timesteps.
PAPER_TABLE1: dict[float, dict[int, float]] = {
    0.0: {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16, 1000: 4.04},
    0.2: {10: 14.04, 20: 7.11, 50: 4.77, 100: 4.25, 1000: 4.09},
    0.5: {10: 16.66, 20: 8.35, 50: 5.25, 100: 4.46, 1000: 4.29},
    1.0: {10: 41.07, 20: 18.36, 50: 8.01, 100: 5.78, 1000: 4.73},
}
#: Table 1's σ̂ row: η = 1 with DDPM's larger variance σ̂_t² = 1 − ᾱ_t/ᾱ_prev (Ho et al.'s choice for CIFAR-10).
PAPER_TABLE1_SIGMA_HAT: dict[int, float] = {10: 367.43, 20: 133.37, 50: 32.72, 100: 9.99, 1000: 3.17}
#: Table 2: CIFAR-10 test set, DDIM inversion then decoding, per-dimension MSE on [0, 1].
PAPER_TABLE2: dict[int, float] = {
    10: 0.014,
    20: 0.0065,
    50: 0.0023,
    100: 0.0009,
    200: 0.0004,
    500: 0.0001,
    1000: 0.0001,
}


def _slope(points: dict[int, float]) -> float | None:
    """Least-squares slope of log(value) against log(S) (a power law's exponent)."""
    pts = [(math.log(s), math.log(v)) for s, v in points.items() if v and v > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def _falls(values: list[float]) -> bool:
    """Never up, and down overall (the paper's MSE levels off at 1e-4 for S = 500 and 1000)."""
    return all(b <= a for a, b in zip(values, values[1:], strict=False)) and values[-1] < values[0]


def _rises(values: list[float]) -> bool:
    return _falls(values[::-1])


def trend_checks(table1: dict[float | str, dict[int, float]], table2: dict[int, float]) -> list[dict[str, Any]]:
    """The paper's trends, checked on our numbers (Fréchet distance by η and S; MSE by S).

    ``table1`` maps η (or "hat", the σ̂ row) to {S: Fréchet distance}. Each check: ``trend`` (what the
    paper shows), ``paper`` and ``ours`` (the evidence, as text), ``agree`` (True / False / None when
    our table lacks the cells).
    """
    checks = []

    def add(trend, paper, ours, agree):
        checks.append({"trend": trend, "paper": paper, "ours": ours, "agree": agree})

    hat = table1.get("hat", {})
    table1 = {e: v for e, v in table1.items() if not isinstance(e, str)}

    etas = sorted(e for e in table1 if e in PAPER_TABLE1)
    for e in etas:
        steps = sorted(s for s in table1[e] if s in PAPER_TABLE1[e])
        if len(steps) < 2:
            continue
        ours = [table1[e][s] for s in steps]
        theirs = [PAPER_TABLE1[e][s] for s in steps]
        add(
            f"η = {e:g}: FID falls as S grows ({', '.join(map(str, steps))})",
            " > ".join(fmt(v, 3) for v in theirs),
            " → ".join(fmt(v, 3) for v in ours),
            _falls(ours) if _falls(theirs) else None,
        )
    common_steps = sorted(set.intersection(*(set(table1[e]) for e in etas))) if etas else []
    for s in common_steps:
        if s not in PAPER_TABLE1[0.0] or len(etas) < 2:
            continue
        ours = [table1[e][s] for e in etas]
        theirs = [PAPER_TABLE1[e][s] for e in etas]
        add(
            f"S = {s}: FID rises with η ({', '.join(f'{e:g}' for e in etas)})",
            " < ".join(fmt(v, 3) for v in theirs),
            " → ".join(fmt(v, 3) for v in ours),
            _rises(ours),
        )
    if 0.0 in etas and 1.0 in etas and len(common_steps) >= 2:
        lo, hi = common_steps[0], common_steps[-1]

        def ratio(t, s):
            return t[1.0][s] / t[0.0][s]

        if lo in PAPER_TABLE1[0.0] and hi in PAPER_TABLE1[0.0]:
            add(
                f"η = 1 and η = 0 draw closer from S = {lo} to S = {hi} (their ratio moves towards 1)",
                f"{ratio(PAPER_TABLE1, lo):.2f} → {ratio(PAPER_TABLE1, hi):.2f}",
                f"{ratio(table1, lo):.2f} → {ratio(table1, hi):.2f}",
                abs(math.log(ratio(table1, hi))) < abs(math.log(ratio(table1, lo))),
            )
    if hat and 1.0 in table1:
        steps = sorted(s for s in hat if s in table1[1.0] and s in PAPER_TABLE1_SIGMA_HAT)
        if steps:
            s = steps[0]
            paper_1, paper_hat = PAPER_TABLE1[1.0][s], PAPER_TABLE1_SIGMA_HAT[s]
            add(
                f"S = {s}: σ̂ (DDPM's larger variance) is far worse than η = 1",
                f"{paper_hat:.4g} vs {paper_1:.4g}",
                f"{hat[s]:.4g} vs {table1[1.0][s]:.4g}",
                hat[s] > table1[1.0][s],
            )
        if len(steps) >= 2:
            ours = [hat[s] for s in steps]
            add(
                f"σ̂: FID falls as S grows ({', '.join(map(str, steps))})",
                " > ".join(fmt(PAPER_TABLE1_SIGMA_HAT[s], 3) for s in steps),
                " → ".join(fmt(v, 3) for v in ours),
                _falls(ours),
            )
    steps2 = sorted(s for s in table2 if s in PAPER_TABLE2)
    if len(steps2) >= 2:
        ours = [table2[s] for s in steps2]
        theirs = [PAPER_TABLE2[s] for s in steps2]
        add(
            f"inversion MSE falls as S grows ({', '.join(map(str, steps2))})",
            " > ".join(fmt(v, 2) for v in theirs),
            " → ".join(fmt(v, 2) for v in ours),
            _falls(ours) if _falls(theirs) else None,
        )
        ps, os_ = _slope({s: PAPER_TABLE2[s] for s in steps2}), _slope({s: table2[s] for s in steps2})
        if ps is not None and os_ is not None:
            add(
                "MSE ∝ S^k, k within 0.5 of the paper's (log-log slope)",
                f"k = {ps:.2f}",
                f"k = {os_:.2f}",
                abs(os_ - ps) < 0.5,
            )
    return checks


def compare_with_paper(table1_rows: list[dict[str, Any]], table2_rows: list[dict[str, Any]]) -> str:
    """Markdown: our Table 1 (Fréchet distance) and Table 2 beside the paper's, and the trend checks."""
    t1: dict[float | str, dict[int, float]] = {}
    for r in table1_rows:
        if r.get("sampler") == "ddim" and r.get("eta") is not None:
            key = "hat" if r["eta"] == "hat" else float(r["eta"])
            t1.setdefault(key, {})[int(r["steps"])] = float(r["fd"])
    t2 = {int(r["steps"]): float(r["mse"]) for r in table2_rows}
    floor = next((float(r["fd"]) for r in table1_rows if r.get("sampler") == "data"), None)
    lines = ["# Our Table 1 and Table 2 beside the paper's", ""]
    steps = sorted({s for d in t1.values() for s in d} | set(PAPER_TABLE1[0.0]))
    body = []
    for e in sorted({e for e in t1 if not isinstance(e, str)} | set(PAPER_TABLE1)):
        if e in PAPER_TABLE1:
            body.append([f"paper η = {e:g}"] + [PAPER_TABLE1[e].get(s) for s in steps])
        if e in t1:
            body.append([f"ours η = {e:g}"] + [t1[e].get(s) for s in steps])
    body.append(["paper σ̂"] + [PAPER_TABLE1_SIGMA_HAT.get(s) for s in steps])
    if "hat" in t1:
        body.append(["ours σ̂"] + [t1["hat"].get(s) for s in steps])
    lines.append("Table 1 (paper: CIFAR-10 FID; ours: Fréchet distance in the digit classifier's features):")
    lines.append("")
    lines.append(markdown_table(["", *[f"S = {s}" for s in steps]], body))
    if floor is not None:
        lines.append(f"Ours, real data at the same n (the floor): {floor:.4g}.")
        lines.append("")
    steps2 = sorted(set(t2) | set(PAPER_TABLE2))
    lines.append("Table 2 (per-dimension MSE on [0, 1]; paper: CIFAR-10 test set; ours: held-out digits):")
    lines.append("")
    lines.append(
        markdown_table(
            ["", *[f"S = {s}" for s in steps2]],
            [["paper"] + [PAPER_TABLE2.get(s) for s in steps2], ["ours"] + [t2.get(s) for s in steps2]],
        )
    )
    lines.append("Trends:")
    lines.append("")
    verdict = {True: "agrees", False: "differs", None: "n/a"}
    body = [[c["trend"], c["paper"], c["ours"], verdict[c["agree"]]] for c in trend_checks(t1, t2)]
    lines.append(markdown_table(["trend in the paper", "paper", "ours", ""], body))
    return "\n".join(lines)
