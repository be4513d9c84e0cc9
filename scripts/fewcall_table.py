"""Few-call samplers on the shipped model: distance to the converged ODE map and classifier Fréchet distance.

    python scripts/fewcall_table.py --runs dpmv3:logsnr:5,unipc:logsnr:5 [--fd-n 200] [--map-n 64] \\
        [--cache runs.json] [--threads 1]

Each run is sampler:spacing:calls (``optimized``: the model's shipped lists, ``config.sampling.
optimized_timesteps``; ``file=PATH``: the lists of a JSON file ``{"schedules": {"S": [...]}}``; "restart"
spends calls - RESTARTS·RESTART_STEPS on its main steps), or ``adaptive:RTOL`` (adaptive steps,
``ddim sample --rtol RTOL``: the calls column is then the mean calls per image). Measured on
seeds the schedules and statistics never saw (map: 1000 + i, Fréchet distance: 2000 + i; image i has
class i mod 10), with the model's guidance and clipping:

- map: the RMS difference on [0, 1] (pixels clamped to [-1, 1]) to DDIM at 200 log-SNR steps from the same
  x_T (``--map-n`` samples; runs whose first timestep is not T-1 are compared with DDIM-200 on their own
  spacing, as scripts/map_distance.py does);
- fd: the Fréchet distance between the shipped digit classifier's features of ``--fd-n`` samples and of
  the 5,000 MNIST-5k digits (small n inflates it: compare rows at equal n only), and the share classified
  as their class.

Results are cached in ``--cache`` (JSON, one entry per measurement; the DDIM-200 references beside it), so
an interrupted table resumes. For long runs (DDPM-1000 at n = 500: a million guided image-calls) give
``--chunk N``: the Fréchet-distance samples are then made N seeds at a time, each chunk saved as it is done
(a folder beside the cache), so a killed run loses at most one chunk; several processes started with the
same arguments share the chunks (each takes the next one nobody holds) and the last to finish measures.
Image i depends only on its seed, so the chunking does not change the result.

    python scripts/fewcall_table.py --runs ddpm:leading:1000 --no-map --fd-n 500 --chunk 25 &   # twice
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import ddim
from ddim.diffusers_io import sampling_kwargs
from ddim.solvers import restart


def steps_for(sampler: str, calls: int) -> int:
    if sampler == "heun":
        return (calls + 1) // 2
    if sampler == "restart":
        return calls - restart.RESTARTS * restart.RESTART_STEPS
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="", help="sampler:spacing:calls, comma-separated (required unless --table)")
    ap.add_argument("--map-n", type=int, default=64)
    ap.add_argument("--fd-n", type=int, default=200)
    ap.add_argument("--no-fd", action="store_true")
    ap.add_argument("--no-map", action="store_true")
    ap.add_argument("--cache", default="fewcall.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="Only print the cached results as Markdown.")
    ap.add_argument("--chunk", type=int, default=0, help="Make the FD samples N seeds at a time, resumably.")
    args = ap.parse_args()
    if args.table:
        print_table(json.loads(Path(args.cache).read_text()), args.map_n, args.fd_n)
        return
    if not args.runs.strip():
        ap.error("--runs is required (unless --table)")
    torch.set_num_threads(args.threads)
    model, schedule, config = ddim.load()
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    def save() -> None:
        tmp = cache_path.with_name(cache_path.name + ".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, cache_path)

    guidance = float(config["sampling"]["guidance"])

    def run(sampler: str, spacing: str, steps: int, seeds: list[int]) -> tuple[torch.Tensor, float]:
        n = len(seeds)
        x_T = ddim.randn((n, 1, 28, 28), seeds)
        y = torch.tensor(seeds) % 10
        if sampler == "adaptive":  # spacing holds the tolerance
            from ddim.adaptive import sample_adaptive

            stats: dict = {}
            x = sample_adaptive(
                model,
                x_T,
                schedule,
                rtol=float(spacing),
                prediction=config["prediction"],
                model_kwargs={"y": y},
                guidance_scale=guidance,
                uncond_kwargs={"y": torch.full_like(y, 10)},
                clip_sample=bool(config["sampling"].get("clip_sample", False)),
                stats=stats,
            )
            return (x.clamp(-1, 1) + 1) / 2, sum(stats["calls"]) / n
        if spacing.startswith("file="):  # lists from a JSON file {"schedules": {"S": [...]}} (e.g. KLUB's)
            lists = json.loads(Path(spacing[5:]).read_text())["schedules"]
            kw = sampling_kwargs(config, schedule, steps, "logsnr", lists[str(steps)])
        else:
            kw = sampling_kwargs(config, schedule, steps, spacing)
        stats: dict = {}
        with torch.inference_mode():
            x = ddim.sample(
                model,
                x_T,
                schedule,
                steps=steps,
                spacing=kw.pop("spacing"),
                timesteps=kw.pop("timesteps"),
                sampler=sampler,
                seeds=seeds,
                prediction=config["prediction"],
                model_kwargs={"y": y},
                guidance_scale=guidance,
                uncond_kwargs={"y": torch.full_like(y, 10)},
                stats=stats,
                **kw,
            )
        return (x.clamp(-1, 1) + 1) / 2, stats["nfe"]

    refs: dict[str, torch.Tensor] = {}
    runs = [r.split(":") + (["auto"] if r.startswith("adaptive:") else []) for r in args.runs.split(",") if r.strip()]
    clf = real = None
    for sampler, spacing, calls in runs:
        steps = 0 if sampler == "adaptive" else steps_for(sampler, int(calls))
        key = f"{sampler}:{spacing}:{calls}"
        entry = cache.setdefault(key, {})
        if not args.no_map and f"map{args.map_n}" not in entry:
            tic = time.perf_counter()
            seeds = list(range(1000, 1000 + args.map_n))
            ref_spacing = spacing if spacing in ("leading", "quadratic") else "logsnr"  # from t = T-1
            if ref_spacing not in refs:
                ref_file = cache_path.with_name(f"{cache_path.stem}.ref-{ref_spacing}-{args.map_n}.pt")
                if ref_file.is_file():
                    refs[ref_spacing] = torch.load(ref_file)
                else:
                    refs[ref_spacing] = run("ddim", ref_spacing, 200, seeds)[0]
                    torch.save(refs[ref_spacing], ref_file)
            x, nfe = run(sampler, spacing, steps, seeds)
            entry[f"map{args.map_n}"] = (x - refs[ref_spacing]).pow(2).mean().sqrt().item()
            entry["nfe" if sampler != "adaptive" else f"calls{args.map_n}"] = nfe
            save()
            took = time.perf_counter() - tic
            print(f"{key}: map {entry[f'map{args.map_n}']:.4f} ({nfe:g} calls, {took:.0f} s)", flush=True)
        if not args.no_fd and f"fd{args.fd_n}" not in entry:
            from ddim.classifier import load_classifier
            from ddim.data import mnist5k
            from ddim.metrics import frechet_distance

            if clf is None:
                clf = load_classifier()
                real, _ = clf.predict_features(mnist5k().images)
            tic = time.perf_counter()
            seeds = list(range(2000, 2000 + args.fd_n))
            if args.chunk > 0:
                make = lambda s, a=sampler, b=spacing, c=steps: run(a, b, c, s)  # noqa: E731
                got = chunked(cache_path, key, seeds, args.chunk, make)
                if got is None:  # other processes still hold chunks: the last one to finish measures
                    print(f"{key}: my chunks are done; another process finishes the measurement", flush=True)
                    continue
                x, nfe = got
            else:
                x, nfe = run(sampler, spacing, steps, seeds)
            cache.update({k: v for k, v in _reload(cache_path).items() if k not in cache})
            entry = cache.setdefault(key, entry)
            feats, pred = clf.predict_features(x * 2 - 1)
            entry[f"fd{args.fd_n}"] = frechet_distance(feats, real)
            entry[f"acc{args.fd_n}"] = (pred == torch.tensor(seeds) % 10).float().mean().item()
            entry["nfe" if sampler != "adaptive" else f"calls{args.fd_n}"] = nfe
            save()
            took = time.perf_counter() - tic
            print(f"{key}: FD {entry[f'fd{args.fd_n}']:.2f} ({nfe:g} calls, {took:.0f} s)", flush=True)


def _reload(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def chunked(cache_path: Path, key: str, seeds: list[int], size: int, make) -> tuple[torch.Tensor, float] | None:
    """The images of ``seeds`` made ``size`` at a time by ``make(seeds) -> (images, nfe)``, each chunk saved
    in ``<cache stem>.chunks/`` (atomically) as it is done; a chunk another live process holds (its ``.lock``
    file) is skipped. Returns (images, nfe) once every chunk is on disk, else None (others still work)."""
    folder = cache_path.with_name(f"{cache_path.stem}.chunks")
    folder.mkdir(parents=True, exist_ok=True)
    tag = key.replace(":", "_").replace("/", "_")
    parts = [seeds[a : a + size] for a in range(0, len(seeds), size)]
    files = [folder / f"{tag}-{p[0]}-{len(p)}.pt" for p in parts]
    for part, f in zip(parts, files, strict=True):
        lock = f.with_suffix(".lock")
        if f.is_file():
            continue
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = int(lock.read_text() or 0) if lock.is_file() else 0
            try:
                os.kill(pid, 0)
                continue  # a live process makes this chunk
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # its process died: take the chunk over
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        tic = time.perf_counter()
        x, nfe = make(part)
        tmp = f.with_name(f.name + ".tmp")
        torch.save({"images": x, "nfe": nfe}, tmp)
        os.replace(tmp, f)
        lock.unlink(missing_ok=True)
        print(f"{key}: seeds {part[0]}-{part[-1]} done ({time.perf_counter() - tic:.0f} s)", flush=True)
    if not all(f.is_file() for f in files):
        return None
    loaded = [torch.load(f) for f in files]
    return torch.cat([d["images"] for d in loaded]), loaded[0]["nfe"]


def print_table(cache: dict, map_n: int, fd_n: int) -> None:
    """Rows sampler × spacing, columns calls: map distance (and Fréchet distance where measured)."""
    rows: dict[tuple[str, str], dict[int, dict]] = {}
    adaptive = []
    for key, entry in cache.items():
        sampler, spacing, calls = key.split(":")
        if sampler == "adaptive":
            adaptive.append((float(spacing), entry))
        else:
            rows.setdefault((sampler, spacing), {})[int(calls)] = entry
    budgets = sorted({c for r in rows.values() for c in r})
    metrics = ((f"map{map_n}", "{:.4f}", "RMS to DDIM-200"), (f"fd{fd_n}", "{:.2f}", "Fréchet distance"))
    for metric, fmt, title in metrics:
        have = {k: r for k, r in rows.items() if any(metric in e for e in r.values())}
        if not have:
            continue
        print(f"\n{title} ({metric}):\n")
        print("| sampler | spacing | " + " | ".join(f"{c} calls" for c in budgets) + " |")
        print("|---|---|" + "---:|" * len(budgets))
        for (sampler, spacing), r in sorted(have.items()):
            cells = [fmt.format(r[c][metric]) if c in r and metric in r[c] else "" for c in budgets]
            print(f"| {sampler} | {spacing} | " + " | ".join(cells) + " |")
    if adaptive:
        print("\nAdaptive steps (mean calls per image; map / Fréchet distance):\n")
        print(f"| rtol | calls ({map_n}) | map{map_n} | calls ({fd_n}) | fd{fd_n} | acc{fd_n} |")
        print("|---:|---:|---:|---:|---:|---:|")
        for rtol, e in sorted(adaptive, reverse=True):
            cells = [(f"calls{map_n}", "{:.1f}"), (f"map{map_n}", "{:.4f}"), (f"calls{fd_n}", "{:.1f}"),
                     (f"fd{fd_n}", "{:.2f}"), (f"acc{fd_n}", "{:.3f}")]  # fmt: skip
            print(f"| {rtol:g} | " + " | ".join(f.format(e[k]) if k in e else "" for k, f in cells) + " |")


if __name__ == "__main__":
    main()
