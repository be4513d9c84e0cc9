"""Where a progressive-distillation student's distance to the teacher's ODE map comes from.

    python scripts/student_diagnostics.py --student runs/pd3/round1_8 --steps 8 [--k 2] [--n 64] [--threads 1]

Four measurements, image i: seed 1000 + i, class i mod 10, the teacher (the embedded default) at its
guidance 1.5 with x̂₀ clipping on the student's "trailing" grid refined K times (``--k``, default 2; 4 for
a `--teacher-steps-per-step 4` student):

1. landing: per student step, the RMS distance between where one student DDIM step lands and where the
   teacher's K steps land from the same z, along the student's own sampling path and on noised training
   digits at the same level (a gap between the two would be a distribution shift);
2. amplification: the RMS change of the teacher's final image (on [0, 1]) when its own path is perturbed
   by Gaussian noise of RMS ``--eps`` at each student level (do random errors of that size matter?);
3. guidance: the RMS distance (on [0, 1]) of the student's samples to the teacher's DDIM-50 at guidance
   1, 1.25, 1.5, 1.75, 2 (has the student learnt the guidance it distils?);
4. substitution: the RMS distance (on [0, 1]) to the teacher's converged map (its DDIM-``--ref-steps``,
   default 200) of the teacher's K·S-step DDIM with ONE student step i in place of its K steps, and what
   that step adds in quadrature to the teacher's own distance (which student step costs the map?).
"""

from __future__ import annotations

import argparse

import torch

import ddim
from ddim.data import load_data
from ddim.distill import student_grid, teacher_target
from ddim.prediction import Denoiser


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="a student run folder or shipped name")
    ap.add_argument("--steps", type=int, required=True, help="the student's steps")
    ap.add_argument("--k", type=int, default=2, help="teacher steps per student step")
    ap.add_argument("--ref-steps", type=int, default=200)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher, sched, tc = ddim.load()
    student, _, sc = ddim.load(args.student)
    n, S, k = args.n, args.steps, args.k
    y = torch.arange(n) % 10
    w = float(tc["sampling"]["guidance"])
    clip = {"clip_sample": True, "use_clipped_model_output": True}
    guided = {"guidance_scale": w, "model_kwargs": {"y": y}, "uncond_kwargs": {"y": torch.full_like(y, 10)}, **clip}
    ts = ddim.timesteps(sched, k * S, "trailing")
    grid = student_grid(ts, k)
    teach = Denoiser(teacher, sched, tc["prediction"], **guided)
    stud = Denoiser(student, sched, sc["prediction"], model_kwargs={"y": y})
    ab = sched.alphas_cumprod.double()
    levels = torch.cat([ab[ts], torch.ones(1, dtype=torch.float64)])
    x_T = ddim.randn((n, 1, 28, 28), list(range(1000, 1000 + n)))
    x0 = load_data("mnist").images[:n]
    g = torch.Generator().manual_seed(0)

    def land(z: torch.Tensor, i: int) -> tuple[torch.Tensor, float]:
        idx = torch.full((n,), i)
        _, z_teacher, ab_end = teacher_target(teach, z, idx, ts, k)
        x0s, eps = stud(z, grid[idx], levels[k * idx])
        e = ab_end.sqrt().float().view(-1, 1, 1, 1)
        z_s = e * x0s + (1 - ab_end).sqrt().float().view(-1, 1, 1, 1) * eps
        return z_s, (z_s - z_teacher).pow(2).mean().sqrt().item()

    print("1. landing RMS per student step (own path / noised digits)")
    with torch.inference_mode():
        z = x_T
        for i in range(S):
            a = float(levels[k * i])
            zd = a**0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=g)
            z, e_path = land(z, i)
            print(f"   t={int(grid[i]):4d}: {e_path:.4f} / {land(zd, i)[1]:.4f}", flush=True)

        print(f"2. teacher's final image moved by noise of RMS {args.eps} at each student level")
        states: dict[int, torch.Tensor] = {}
        kw = {"prediction": tc["prediction"], **guided}
        base = ddim.sample(teacher, x_T, sched, timesteps=ts, callback=lambda i, t, x, _: states.update({i: x}), **kw)
        for i in range(0, k * S, k):
            d = torch.randn(x_T.shape, generator=g) * args.eps
            out = ddim.sample(teacher, states[i] + d, sched, timesteps=ts[i:], **kw)
            print(f"   t={int(ts[i]):4d}: {((out.clamp(-1, 1) - base.clamp(-1, 1)) / 2).pow(2).mean().sqrt():.4f}")

        print("3. student's samples against the teacher's DDIM-50 at guidance w")
        s = ddim.sample(student, x_T, sched, steps=S, spacing="trailing", prediction=sc["prediction"],
                        model_kwargs={"y": y}, **clip)  # fmt: skip
        for gw in (1.0, 1.25, 1.5, 1.75, 2.0):
            t = ddim.sample(teacher, x_T, sched, steps=50, spacing="trailing", **{**kw, "guidance_scale": gw})
            print(f"   w={gw}: {((s.clamp(-1, 1) - t.clamp(-1, 1)) / 2).pow(2).mean().sqrt():.4f}", flush=True)

        print(f"4. distance to the teacher's DDIM-{args.ref_steps} with one student step in the teacher's DDIM-{k * S}")
        ref = ddim.sample(teacher, x_T, sched, steps=args.ref_steps, spacing="trailing", **kw)

        def to_map(x: torch.Tensor) -> float:
            return ((x.clamp(-1, 1) - ref.clamp(-1, 1)) / 2).pow(2).mean().sqrt().item()

        own = to_map(base)
        print(f"   teacher alone: {own:.4f}; student alone: {to_map(s):.4f}")
        for i in range(S):
            z = states[k * i]  # the teacher's own path up to student level i
            z, _ = land(z, i)
            rest = ts[k * (i + 1) :]
            out = ddim.sample(teacher, z, sched, timesteps=rest, **kw) if len(rest) else z
            d = to_map(out)
            print(f"   step {i} (t={int(grid[i]):4d}): {d:.4f}, adds {max(d**2 - own**2, 0.0) ** 0.5:.4f}", flush=True)


if __name__ == "__main__":
    main()
