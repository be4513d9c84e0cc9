"""The sampling loop's fast path: fused updates, cached tables, pre-drawn noise, no host sync.

Speed itself is measured by ``ddim bench``, never asserted here.
"""

import pytest
import torch
from conftest import GaussianData, dummy_model

import ddim
from ddim import Denoiser, StepNoise
from ddim.prediction import PREDICTIONS, conversion_coefficients, input_scale


def _schedule_for(prediction, linear):
    """The linear schedule, or the flow time grid a flow model needs."""
    return ddim.NoiseSchedule.flow(1000) if prediction == "flow" else linear


def _reference_ddim(model, x, schedule, steps, prediction, eta=0.0, seeds=None, spacing="leading"):
    """DDIM by hand with the public pure step (unfused: x̂₀ and ε̂ first, then Eq. 12)."""
    ts = ddim.timesteps(schedule, steps, spacing).tolist()
    ab = schedule.alphas_cumprod
    noise = StepNoise(x.shape, seeds, dtype=x.dtype)
    for i, t in enumerate(ts):
        ab_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        k = input_scale(ab[t], prediction)  # flow models see z = k·x
        out = model(x if k is None else x * k.item(), torch.full((x.shape[0],), t))
        last = i + 1 == len(ts)
        z = None if last or eta == 0 else noise()
        x, _ = ddim.ddim_step(x, out, float(ab[t]), ab_prev, 0.0 if last else eta, z, prediction)
    return x


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_fused_loop_equals_unfused_steps(linear, prediction, eta):
    linear = _schedule_for(prediction, linear)
    x = ddim.randn((3, 2, 16), [1, 2, 3], dtype=torch.float64)
    kw = dict(steps=12, prediction=prediction, eta=eta, seeds=[1, 2, 3])
    got = ddim.sample(dummy_model, x, linear, **kw)
    ref = _reference_ddim(dummy_model, x, linear, 12, prediction, eta, [1, 2, 3])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_plan_fuse_is_the_same_linear_map(linear, prediction):
    linear = _schedule_for(prediction, linear)
    d = Denoiser(dummy_model, linear, prediction)
    ts = ddim.timesteps(linear, 7, "trailing")[1:]  # avoid ᾱ near 0 for ε at t = 999
    x = torch.randn(2, 5, dtype=torch.float64)
    plan = d.plan(ts, x)
    a_x0, a_eps, a_x = torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64), torch.rand(6).double()
    A, B = plan.fuse(a_x0, a_eps, a_x)
    for i in range(6):
        out = d.output(x, plan, i)
        x0, eps = d.predict(x, plan, i)
        torch.testing.assert_close(A[i] * x + B[i] * out, a_x0[i] * x0 + a_eps[i] * eps + a_x[i] * x)
    assert torch.equal(plan.conv, conversion_coefficients(linear.alphas_cumprod[ts], prediction))


@pytest.mark.parametrize("kw", [dict(), dict(eta=1.0, seeds=[0, 1]), dict(sampler="ddpm"), dict(prediction="sample")])
def test_fused_loop_names_the_first_nonfinite_step(linear, kw):
    calls = []

    def nan_at_600(x, t):
        calls.append(int(t[0]))
        out = dummy_model(x, t)
        return out.fill_(float("nan")) if int(t[0]) == 600 else out

    # leading, 5 steps: [800, 600, 400, 200, 0]: checked only at the end, then re-run up to the bad call
    with pytest.raises(FloatingPointError, match=r"i=1 \(timestep t=600\)"):
        ddim.sample(nan_at_600, torch.randn(2, 3), linear, steps=5, **kw)
    assert calls == [800, 600, 400, 200, 0, 800, 600]

    def inf_once(x, t, seen=[]):  # noqa: B006 - a model that fails on its first call only
        seen.append(1)
        return torch.full_like(x, float("inf")) if len(seen) == 1 else dummy_model(x, t)

    with pytest.raises(FloatingPointError, match="deterministic"):
        ddim.sample(inf_once, torch.randn(2, 3), linear, steps=3)


def test_callback_sees_x0_on_the_fused_path(linear):
    seen = []
    x = torch.randn(2, 6, dtype=torch.float64)
    out = ddim.sample(dummy_model, x, linear, steps=5, callback=lambda i, t, x_t, x0: seen.append((t, x_t, x0)))
    for t, x_t, x0 in seen:  # the callback's x̂₀ is the prediction at the x_t it was given
        ref, _ = ddim.to_x0_eps(x_t, dummy_model(x_t, torch.full((2,), t)), linear.alphas_cumprod[t])
        torch.testing.assert_close(x0, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(seen[-1][2], out, rtol=0, atol=0)  # ᾱ_final = 1: the result is the last x̂₀


def test_repeated_runs_hit_the_table_cache_and_agree(linear):
    from ddim import prediction as P

    x = torch.randn(4, 8)
    first = ddim.sample(dummy_model, x, linear, steps=9, spacing="trailing")
    size = len(P._MEMO)
    again = ddim.sample(dummy_model, x, linear, steps=9, spacing="trailing")
    assert len(P._MEMO) == size and torch.equal(first, again)
    # A new schedule object (even at a recycled id) gets its own timesteps.
    other = ddim.NoiseSchedule.cosine(500)
    got = ddim.sample(dummy_model, x, other, steps=9, spacing="trailing", stats=(stats := {}))
    assert max(stats["timesteps"]) == 499 and got.shape == x.shape


@pytest.mark.parametrize("per_sample", [(3, 16), (1, 5, 7), (784,)])
@pytest.mark.parametrize("block", [1, 4, 50])
def test_predrawn_noise_equals_step_by_step_draws(per_sample, block):
    seeds = [7, 0, 123]
    noise = StepNoise((3, *per_sample), seeds, dtype=torch.float64, block=block)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    for g in gens:
        torch.randn(per_sample, generator=g)  # x_T's draw is skipped
    for _ in range(9):
        expected = torch.stack([torch.randn(per_sample, generator=g) for g in gens]).double()
        assert torch.equal(noise(), expected)


def test_global_rng_noise_is_drawn_at_call_time():
    torch.manual_seed(5)
    a = StepNoise((2, 3), None, block=10)()
    torch.manual_seed(5)
    assert torch.equal(a, torch.stack([torch.randn(3), torch.randn(3)]))


def test_stochastic_batch_invariance_with_predrawn_noise(linear):
    g = GaussianData(linear)
    seeds = [4, 8, 15]
    x_T = ddim.randn((3, 1, 4, 4), seeds)  # 16 values per sample: drawn in one call per sample
    batched = ddim.sample(g.eps, x_T, linear, steps=20, eta=1.0, seeds=seeds)
    for i, s in enumerate(seeds):
        one = ddim.sample(g.eps, ddim.randn((1, 1, 4, 4), [s]), linear, steps=20, eta=1.0, seeds=[s])
        assert torch.equal(batched[i : i + 1], one)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(eta=1.0, seeds=[0, 1]),
        dict(sampler="ddpm", seeds=[0, 1]),
        dict(clip_sample=True, eta=0.5, seeds=[0, 1]),
        dict(prediction="v_prediction", guidance_scale=3.0, model_kwargs={"y": 1}, uncond_kwargs={"y": 1}),
    ],
)
def test_loop_never_reads_a_device_value(linear, kw, monkeypatch):
    # On the meta device tensors have no data: .item(), bool(), float() or .tolist() of a device tensor
    # would raise, so a loop that runs there has no host synchronisation (CUDA-graph / compile friendly).
    # the one sync, after the loop: the deferred report, or the fused loop's check of its result
    monkeypatch.setattr(Denoiser, "finish", lambda self, plan: None)
    monkeypatch.setattr(Denoiser, "finite", lambda self, x: True)
    x = torch.empty(2, 1, 4, 4, device="meta")
    out = ddim.sample(lambda x, t, **_: x * 0.5, x, linear, steps=6, **kw)
    assert out.device.type == "meta" and out.shape == x.shape
    z = torch.empty(2, 1, 4, 4, device="meta")
    assert ddim.invert(lambda x, t: x * 0.5, z, linear, steps=4).device.type == "meta"


# ----------------------------------------------------------------- end-to-end settings (ddim.perf, CLI)
def test_prepare_keeps_the_model_and_its_attributes():
    from ddim.perf import Precision, prepare
    from ddim.unet import UNet

    torch.manual_seed(0)
    model = UNet(image_size=8, base_channels=8, channel_mults=(1, 2), num_classes=3).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 3])
    with torch.no_grad():
        ref = model(x, t, y=y)
        fast = prepare(model, channels_last=True)
        torch.testing.assert_close(fast(x, t, y=y), ref, rtol=1e-4, atol=1e-5)
        assert fast.config.num_classes == 3 and not any(p.requires_grad for p in fast.parameters())
        half = prepare(model, dtype="bf16", channels_last=False)
        assert isinstance(half, Precision) and half.config.image_size == 8
        out = half(x, t, y=y)
        assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1  # bf16 network, fp32 state


def test_resolve_dtype_and_threads():
    from ddim.perf import resolve_dtype, set_threads

    assert resolve_dtype(None) == torch.float32 and resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="accelerator"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
    finally:
        torch.set_num_threads(before)


def test_cli_runtime_options(tmp_path, capsys):
    from ddim.checkpoint import save_model
    from ddim.cli import run
    from ddim.unet import UNet

    torch.manual_seed(0)
    save_model(
        tmp_path / "m",
        UNet(image_size=8, base_channels=8, channel_mults=(1, 2)),
        ddim.NoiseSchedule.linear(),
        "epsilon",
    )
    base = ["sample", "--model", str(tmp_path / "m"), "-n", "2", "--steps", "3", "--no-progress"]
    folder = str(tmp_path / "imgs")
    assert run([*base, "--out", folder, "--channels-last", "--threads", "1"]) == 0
    # speed-only options are not image settings: the folder resumes under other ones
    assert run([*base, "-n", "3", "--out", folder, "--no-channels-last"]) == 0
    assert sorted(p.name for p in (tmp_path / "imgs").glob("seed_*.png")) == [f"seed_00000{i}.png" for i in range(3)]
    assert run([*base, "--out", str(tmp_path / "b.npz"), "--dtype", "bf16"]) == 0
    assert run([*base, "--out", str(tmp_path / "c.npz"), "--dtype", "fp16"]) == 2
    if not torch.cuda.is_available():
        assert run([*base, "--out", str(tmp_path / "d.npz"), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err or torch.cuda.is_available()


# ----------------------------------------------------------------- the fused multistep loop (DPM-Solver++, PLMS, UniPC)
MULTISTEP = [("dpmpp_2m", {}), ("dpmpp_3m", {}), ("dpmpp_2m_sde", {"seeds": [3, 1, 4]}), ("plms", {}), ("unipc", {})]


@pytest.fixture(params=["stacked", "rows"])
def multistep_path(request, monkeypatch):
    """Run the fused multistep loop stacked (small samples) or row by row (large ones on the CPU)."""
    from ddim import fused as base

    monkeypatch.setattr(base, "STACK_BYTES", 2**40 if request.param == "stacked" else 0)
    return request.param


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sampler,kw", MULTISTEP)
@pytest.mark.parametrize("final_one", [True, False])
def test_fused_multistep_equals_the_unfused_loop(linear, prediction, sampler, kw, final_one, multistep_path):
    linear = _schedule_for(prediction, linear)
    # clip_sample at a range nothing reaches makes the denoiser non-linear: the unfused loop, same math
    x = ddim.randn((3, 2, 16), [1, 2, 3], dtype=torch.float64)
    common = dict(steps=12, prediction=prediction, sampler=sampler, set_alpha_to_one=final_one, **kw)
    got = ddim.sample(dummy_model, x, linear, **common)
    ref = ddim.sample(dummy_model, x, linear, clip_sample=True, clip_sample_range=1e9, **common)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sampler,kw", MULTISTEP)
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_fused_multistep_few_steps_and_zero_snr(sampler, kw, steps, spacing, multistep_path):
    # warm-up orders, fewer steps than the history, and a first level at ᾱ = 0 (v-prediction)
    schedule = ddim.NoiseSchedule.linear(1000).rescale_zero_terminal_snr()
    x = ddim.randn((3, 1, 16), [5, 6, 7], dtype=torch.float64)
    common = dict(steps=steps, spacing=spacing, prediction="v_prediction", sampler=sampler, **kw)
    got = ddim.sample(dummy_model, x, schedule, **common)
    ref = ddim.sample(dummy_model, x, schedule, clip_sample=True, clip_sample_range=1e9, **common)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_fused_multistep_float32_matches_the_unfused_loop(linear, multistep_path):
    # the folded float64 tables are applied in float32 as any table: the fused result stays within
    # float32 rounding of the unfused one
    x = ddim.randn((4, 1, 8, 8), range(4))
    for sampler in ("dpmpp_2m", "dpmpp_3m", "plms", "unipc"):
        got = ddim.sample(dummy_model, x, linear, steps=10, sampler=sampler, spacing="linspace")
        ref = ddim.sample(dummy_model, x, linear, steps=10, sampler=sampler, spacing="linspace", clip_sample=True,
                          clip_sample_range=1e9)  # fmt: skip
        assert (got - ref).abs().max() <= 2e-5 * ref.abs().max(), sampler


def test_multistep_buffers_are_kept_between_runs_but_never_shared(linear):
    from ddim import fused as base

    x = ddim.randn((2, 1, 4, 4), [1, 2])
    first = ddim.sample(dummy_model, x, linear, steps=6, sampler="dpmpp_2m")
    other = ddim.sample(dummy_model, ddim.randn((3, 1, 4, 4), [1, 2, 3]), linear, steps=6, sampler="dpmpp_2m")
    assert torch.equal(ddim.sample(dummy_model, x, linear, steps=6, sampler="dpmpp_2m"), first)
    assert other.shape[0] == 3 and first.data_ptr() != other.data_ptr()
    assert any(k[0] == x.shape for k in base._POOL)  # kept for the next run of this layout

    # A model that samples with the same layout inside its own call gets other buffers.
    def nested(x_t, t):
        inner = ddim.sample(dummy_model, x_t.clone(), linear, steps=3, sampler="dpmpp_2m")
        return dummy_model(x_t, t) + 0 * inner

    assert torch.equal(ddim.sample(nested, x, linear, steps=6, sampler="dpmpp_2m"), first)
    # Buffers made under inference mode are not reused outside it (they could not be written there).
    with torch.inference_mode():
        inside = ddim.sample(dummy_model, x, linear, steps=6, sampler="unipc")
    assert torch.equal(ddim.sample(dummy_model, x, linear, steps=6, sampler="unipc"), inside)


def test_multistep_tables_are_cached_per_sample_rank():
    # equal levels from two schedule objects share tables by content, but not across numbers of dims
    for shape in [(2, 1, 4, 4), (2, 3), (2, 2, 3)]:
        schedule = ddim.NoiseSchedule.linear(1000)
        x = ddim.randn(shape, [1, 2], dtype=torch.float64)
        for sampler in ("dpmpp_3m", "plms", "unipc"):
            got = ddim.sample(dummy_model, x, schedule, steps=6, sampler=sampler)
            ref = ddim.sample(
                dummy_model, x, schedule, steps=6, sampler=sampler, clip_sample=True, clip_sample_range=1e9
            )
            assert got.shape == x.shape
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "plms", "unipc"])
def test_fused_loops_keep_the_memory_format(linear, sampler, multistep_path):
    seen = []

    def model(x_t, t):
        seen.append(x_t.is_contiguous(memory_format=torch.channels_last))
        return dummy_model(x_t, t)

    x = ddim.randn((2, 3, 4, 4), [1, 2])
    ref = ddim.sample(dummy_model, x, linear, steps=5, sampler=sampler)
    got = ddim.sample(model, x.to(memory_format=torch.channels_last), linear, steps=5, sampler=sampler)
    assert all(seen) and len(seen) == 5
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler,kw", MULTISTEP)
def test_fused_multistep_callback_and_identity_model(linear, sampler, kw, multistep_path):
    kw = {"seeds": [5, 6]} if kw else kw
    seen = []
    x = torch.randn(2, 6, dtype=torch.float64)
    cb = lambda i, t, x_t, x0: seen.append((t, x_t.clone(), x_t, x0))  # noqa: E731
    out = ddim.sample(dummy_model, x, linear, steps=6, sampler=sampler, callback=cb, **kw)
    for t, copy, x_t, x0 in seen:  # what the callback was given is never overwritten afterwards
        assert torch.equal(copy, x_t)
        ref, _ = ddim.to_x0_eps(x_t, dummy_model(x_t, torch.full((2,), t)), linear.alphas_cumprod[t])
        torch.testing.assert_close(x0, ref, rtol=0, atol=1e-12)
    assert torch.equal(out, ddim.sample(dummy_model, x, linear, steps=6, sampler=sampler, **kw))
    # a model returning its input (the loop must not write into it in place)
    x0 = torch.randn(2, 6, dtype=torch.float64)
    got = ddim.sample(lambda x, t: x, x0, linear, steps=6, sampler=sampler, prediction="sample", **kw)
    ref = ddim.sample(lambda x, t: x.clone(), x0, linear, steps=6, sampler=sampler, prediction="sample", **kw)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("sampler,kw", MULTISTEP)
def test_fused_multistep_names_the_first_nonfinite_step(linear, sampler, kw, multistep_path):
    calls = []

    def nan_at_600(x, t):
        calls.append(int(t[0]))
        out = dummy_model(x, t)
        return out.fill_(float("nan")) if int(t[0]) == 600 else out

    kw = {"seeds": [0, 1]} if kw else kw
    with pytest.raises(FloatingPointError, match=r"i=1 \(timestep t=600\)"):
        ddim.sample(nan_at_600, torch.randn(2, 3), linear, steps=5, sampler=sampler, **kw)
    assert calls == [800, 600, 400, 200, 0, 800, 600]


@pytest.mark.parametrize("sampler,kw", [(s, {"seeds": [0, 1]} if k else k) for s, k in MULTISTEP])
def test_fused_multistep_never_reads_a_device_value(linear, sampler, kw, monkeypatch):
    monkeypatch.setattr(Denoiser, "finish", lambda self, plan: None)
    monkeypatch.setattr(Denoiser, "finite", lambda self, x: True)
    x = torch.empty(2, 1, 4, 4, device="meta")
    out = ddim.sample(lambda x, t, **_: x * 0.5, x, linear, steps=6, sampler=sampler, **kw)
    assert out.device.type == "meta" and out.shape == x.shape
