"""Our Table 1 and Table 2 on a model, beside the DDIM paper's, with the trends checked.

    python scripts/paper_tables.py [--model PATH] [--out paper_tables] [--device cpu|cuda] [--quick]

Runs (and resumes, if killed) exactly these commands, then writes OUT/comparison.md:

    ddim eval table1 [--model PATH] --steps 10,20,50,100,1000 --eta 0,0.2,0.5,1 --n 1000 --out OUT/table1
    ddim eval table2 [--model PATH] --steps 10,20,50,100,200,500,1000 --n 500 --out OUT/table2

Table 1 samples the default way (class i mod 10, the model's guidance, leading timesteps) and measures
the Fréchet distance, KID, precision and recall against all of MNIST-5k in the digit classifier's
features; Table 2 inverts the 500 held-out digits. --quick: n = 100 and 50, steps up to 100 (a trial).
--steps, --eta, --n, --steps2 and --n2 override single settings (a CPU-sized run, say).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ddim.cli import run
from ddim.evaluation.paper import compare_with_paper

FULL = {"steps": "10,20,50,100,1000", "eta": "0,0.2,0.5,1", "n": 1000, "steps2": "10,20,50,100,200,500,1000", "n2": 500}
QUICK = {"steps": "10,20,50,100", "eta": "0,0.2,0.5,1", "n": 100, "steps2": "10,20,50,100", "n2": 50}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder [embedded default]")
    ap.add_argument("--out", default="paper_tables")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a small trial (n = 100 / 50, S up to 100)")
    ap.add_argument("--class", dest="class_spec", default=None, help="Table 1 classes: all, none, ... [all]")
    ap.add_argument("--steps", default=None, help="Table 1 step counts, e.g. 10,20,50,100")
    ap.add_argument("--eta", default=None, help="Table 1 η values, e.g. 0,0.2,0.5,1")
    ap.add_argument("--n", type=int, default=None, help="Table 1 samples per cell")
    ap.add_argument("--steps2", default=None, help="Table 2 step counts")
    ap.add_argument("--n2", type=int, default=None, help="Table 2 held-out images")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    p = dict(QUICK if args.quick else FULL)
    p.update({k: getattr(args, k) for k in ("steps", "eta", "n", "steps2", "n2") if getattr(args, k) is not None})
    out = Path(args.out)
    common = (["--model", args.model] if args.model else []) + ["--device", args.device]
    common += [] if args.progress else ["--no-progress"]
    cls = ["--class", args.class_spec] if args.class_spec else []
    t1 = ["eval", "table1", *common, *cls, "--steps", p["steps"], "--eta", p["eta"], "--n", str(p["n"])]
    t2 = ["eval", "table2", *common, "--steps", p["steps2"], "--n", str(p["n2"])]
    for argv, folder in ((t1, "table1"), (t2, "table2")):
        argv = [*argv, "--out", str(out / folder)]
        print("ddim " + " ".join(argv), file=sys.stderr)
        rc = run(argv)
        if rc:
            return rc
    rows1 = json.loads((out / "table1" / "table1.json").read_text())["rows"]
    rows2 = json.loads((out / "table2" / "table2.json").read_text())["rows"]
    text = compare_with_paper(rows1, rows2)
    (out / "comparison.md").write_text(text)
    print(text)
    print(f"-> {out}/comparison.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
