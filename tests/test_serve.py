"""`ddim serve`: the HTTP API through Flask's test client, the engine's queue, and the real server process."""

from __future__ import annotations

import io
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("flask", reason="ddim serve needs the 'serve' extra (flask, waitress)")
pytest.importorskip("waitress", reason="ddim serve needs the 'serve' extra (flask, waitress)")

from PIL import Image  # noqa: E402
from serve_harness import start_server, stop_server  # noqa: E402

import ddim  # noqa: E402
from ddim.images import _png_bytes, to_uint8  # noqa: E402
from ddim.serve import Engine, QueueFull, ShuttingDown, Superseded, create_app  # noqa: E402
from ddim.serve.app import STATIC  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
    model, schedule, config = ddim.load()
    from ddim.perf import prepare

    return prepare(model, device="cpu"), schedule, config


@pytest.fixture(scope="module")
def app(loaded):
    a = create_app(loaded, warm=False)
    yield a
    a.extensions["ddim"]["engine"].close()


@pytest.fixture()
def client(app):
    return app.test_client()


def direct_png(
    loaded, *, seed=0, steps=10, eta=0.0, sampler="ddim", spacing="leading", label=-1, guidance=None, timesteps=None
):
    """What /api/sample must return: ddim.sample on the same model, as PNG bytes (guidance: the model's)."""
    model, schedule, config = loaded
    guidance = config["sampling"]["guidance"] if guidance is None else guidance
    k = model.config.num_classes
    y = torch.tensor([k if label < 0 else label])
    guided = guidance != 1.0 and label >= 0
    x = ddim.sample(
        model,
        ddim.randn((1, 1, 28, 28), [seed]),
        schedule,
        steps=steps,
        eta=eta,
        sampler=sampler,
        spacing=spacing,
        timesteps=timesteps,
        seeds=[seed],
        clip_sample=bool(config["sampling"]["clip_sample"]),
        use_clipped_model_output=bool(config["sampling"].get("use_clipped_model_output", False)),
        model_kwargs={"y": y},
        guidance_scale=guidance if guided else 1.0,
        uncond_kwargs={"y": torch.tensor([k])} if guided else None,
    )
    return _png_bytes(to_uint8(x)[0])


def png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def png_of(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- /api/sample
SETTINGS = [
    dict(seed=0, steps=10, eta=0.0, sampler="ddim", spacing="leading", label=3, guidance=2.0),
    dict(seed=7, steps=4, eta=0.5, sampler="ddim", spacing="trailing", label=-1, guidance=2.0),
    dict(seed=8, steps=3, eta=1.0, sampler="ddpm", spacing="linspace", label=5, guidance=1.0),
    dict(seed=9, steps=3, eta=0.0, sampler="plms", spacing="quadratic", label=0, guidance=3.5),
    dict(seed=10, steps=3, eta=0.0, sampler="dpmpp_2m", spacing="logsnr", label=9, guidance=0.0),
    dict(seed=11, steps=3, eta=0.0, sampler="dpmpp_3m", spacing="karras", label=1, guidance=2.0),
    dict(seed=12, steps=3, eta=1.0, sampler="dpmpp_2m_sde", spacing="leading", label=2, guidance=2.0),
    dict(seed=13, steps=3, eta=0.0, sampler="unipc", spacing="trailing", label=4, guidance=2.0),
    dict(seed=14, steps=3, eta=0.0, sampler="euler", spacing="karras", label=6, guidance=2.0),
    dict(seed=2**32 - 1, steps=3, eta=0.0, sampler="heun", spacing="leading", label=8, guidance=1.5),
]


def query(s: dict) -> str:
    q = {k: v for k, v in s.items() if k != "label"}
    q["class"] = s["label"] if s["label"] >= 0 else "none"
    return "&".join(f"{k}={v}" for k, v in q.items())


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"{s['sampler']}-{s['spacing']}")
def test_sample_is_byte_identical_to_ddim_sample(client, loaded, s):
    r = client.get(f"/api/sample?{query(s)}")
    assert r.status_code == 200, r.data
    assert r.mimetype == "image/png"
    assert r.data == direct_png(loaded, **s)
    assert int(r.headers["X-NFE"]) == ddim.nfe(s["sampler"], s["steps"])
    assert float(r.headers["X-Wall-Time"]) >= 0 and float(r.headers["X-Compute-Time"]) > 0


def test_identical_parameters_identical_bytes_cached_or_not(client, loaded):
    first = client.get("/api/sample?seed=21&steps=5&class=2")
    again = client.get("/api/sample?class=2&steps=5&seed=21")  # order does not matter
    assert first.headers["X-Cache"] == "miss" and first.headers["X-Network-Calls"] == "5"
    assert again.headers["X-Cache"] == "hit" and again.headers["X-Network-Calls"] == "0"
    assert again.data == first.data
    # without any cache the work is redone and gives the same bytes
    nocache = create_app(loaded, cache_size=0, warm=False)
    try:
        c = nocache.test_client()
        r1, r2 = c.get("/api/sample?seed=21&steps=5&class=2"), c.get("/api/sample?seed=21&steps=5&class=2")
        assert r1.headers["X-Cache"] == r2.headers["X-Cache"] == "miss"
        assert r1.data == r2.data == first.data
    finally:
        nocache.extensions["ddim"]["engine"].close()


def test_defaults_are_the_models(client, loaded):
    # absent: seed 0, 10 steps, η 0, ddim, the model's spacing and guidance, unconditional
    assert client.get("/api/sample").data == direct_png(loaded, steps=10, label=-1)
    guidance = loaded[2]["sampling"]["guidance"]
    assert client.get("/api/sample?class=3").data == direct_png(loaded, steps=10, label=3, guidance=guidance)
    assert client.get("/api/sample?class=3&eta=-0").data == client.get("/api/sample?class=3").data


def test_spacing_optimized_serves_the_models_own_lists(client, loaded):
    """The embedded model ships 5- and 10-step lists: "optimized" samples on them (byte-identical to
    ddim.sample with that list), refuses other step counts before any work, and the edits (which take a
    spacing name) use the fallback "trailing"; a model whose OWN spacing is "optimized" falls back."""
    info = client.get("/api/info").get_json()
    assert "optimized" in info["spacings"]
    ts = loaded[2]["sampling"]["optimized_timesteps"]["5"]
    r = client.get("/api/sample?seed=3&steps=5&spacing=optimized&class=4")
    assert r.status_code == 200, r.data
    assert r.data == direct_png(loaded, seed=3, steps=5, label=4, guidance=1.5, timesteps=ts)
    assert r.data != direct_png(loaded, seed=3, steps=5, label=4, guidance=1.5, spacing="trailing")
    r = client.get("/api/sample?steps=6&spacing=optimized")
    assert r.status_code == 400 and "optimised timesteps for steps 5, 10, not 6" in r.get_data(as_text=True)
    model, schedule, config = loaded
    own = {**config, "sampling": {**config["sampling"], "spacing": "optimized"}}
    a = create_app((model, schedule, own), warm=False)
    try:
        c = a.test_client()
        assert c.get("/api/info").get_json()["default_spacing"] == "optimized"
        assert c.get("/api/sample?seed=3&steps=5&class=4").data == direct_png(
            loaded, seed=3, steps=5, label=4, guidance=1.5, timesteps=ts
        )
        # 6 steps: no list, the fallback ("trailing")
        assert c.get("/api/sample?seed=3&steps=6&class=4").data == direct_png(
            loaded, seed=3, steps=6, label=4, guidance=1.5, spacing="trailing"
        )
    finally:
        a.extensions["ddim"]["engine"].close()


BAD = [
    ("steps=0", "steps must be an int in 1..200"),
    ("steps=201", "steps must be an int in 1..200"),
    ("steps=100000000000000000000", "steps must be an int"),
    ("steps=ten", "steps must be an int"),
    ("steps=3.5", "steps must be an int"),
    ("steps=1&steps=2", "steps is given 2 times"),
    ("seed=-1", "seed must be an int"),
    ("seed=4294967296", "seed must be an int"),  # 2**32 would give seed 0's image
    ("seed=x", "seed must be an int"),
    ("eta=-0.1", "eta must be a number in [0, 1]"),
    ("eta=nan", "eta must be a number"),
    ("eta=inf", "eta must be a number"),
    ("eta=abc", "eta must be a number"),
    ("sampler=dpm", "unknown sampler 'dpm'"),
    ("sampler=ddpm&eta=0.5", "eta is fixed at 1 by sampler ddpm"),
    ("spacing=cosine", "unknown spacing 'cosine'"),
    ("class=10", "class must be an int in 0..9"),
    ("class=three", "class must be an int in 0..9"),
    ("guidance=-1", "guidance must be a number in [0, 20]"),
    ("guidance=1e9", "guidance must be a number"),
    ("model=/etc/passwd", "unknown parameter 'model'"),
    ("path=../../x", "unknown parameter 'path'"),
]


@pytest.mark.parametrize("q,message", BAD, ids=[b[0] for b in BAD])
def test_bad_parameters_get_400_with_one_line(client, q, message):
    r = client.get(f"/api/sample?{q}")
    assert r.status_code == 400
    text = r.get_data(as_text=True)
    assert text.startswith("error: ") and text.count("\n") == 1 and message in text, text
    assert client.get("/api/sample?steps=2").status_code == 200  # and the server keeps serving


def test_other_bad_requests(client, app):
    assert client.get("/api/nothing").status_code == 404
    assert client.post("/api/sample").status_code == 405
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/%2e%2e/app.py").status_code == 404
    assert client.get("/api/sample", headers={"Host": "evil.example:7860"}).status_code == 400  # DNS rebinding
    assert client.get("/api/sample?steps=2", headers={"Host": "localhost:7860"}).status_code == 200
    assert client.get("/api/interpolate?frames=1").status_code == 400
    assert client.get("/api/interpolate?frames=34").status_code == 400
    assert client.get("/api/interpolate?frames=3&frame=3").status_code == 400
    r = client.get("/api/interpolate?sampler=ddpm")
    assert r.status_code == 400 and "deterministic sampler" in r.get_data(as_text=True)


def test_page_and_assets_are_local(client):
    page = client.get("/")
    assert page.status_code == 200 and b"/static/app.js" in page.data
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f"{name} refers to another site"
        assert client.get(f"/static/{name}").status_code == 200
    info = client.get("/api/info").get_json()
    assert info["num_classes"] == 10 and "ddim" in info["samplers"] and info["max_steps"] == 200
    assert "ddpm" not in info["deterministic_samplers"]


# ---------------------------------------------------------------------------------------------- interpolation
def test_interpolation_frames_computed_once(client, loaded):
    q = "seed_a=3&seed_b=4&frames=5&steps=4&class=7&guidance=2"
    first = client.get(f"/api/interpolate?{q}&frame=0")
    assert first.status_code == 200 and first.headers["X-Cache"] == "miss"
    frames = [first.data] + [client.get(f"/api/interpolate?{q}&frame={k}").data for k in range(1, 5)]
    for k in range(1, 5):
        assert client.get(f"/api/interpolate?{q}&frame={k}").headers["X-Cache"] == "hit"
    strip = client.get(f"/api/interpolate?{q}")
    assert png_array(strip.data).shape == (28, 5 * 28)
    assert np.array_equal(png_array(strip.data)[:, 2 * 28 : 3 * 28], png_array(frames[2]))
    # frame k is the slerp of the two seeds' noises at k/4, decoded: exactly ddim.sample's output
    model, schedule, config = loaded
    za, zb = ddim.randn((1, 1, 28, 28), [3]), ddim.randn((1, 1, 28, 28), [4])
    for k in (0, 2, 4):
        x_T = ddim.slerp(za[0], zb[0], torch.linspace(0, 1, 5)[k : k + 1])
        x = ddim.sample(model, x_T, schedule, steps=4, clip_sample=True, model_kwargs={"y": torch.tensor([7])},
                        guidance_scale=2.0, uncond_kwargs={"y": torch.tensor([10])},
                        use_clipped_model_output=config["sampling"]["use_clipped_model_output"])  # fmt: skip
        assert frames[k] == _png_bytes(to_uint8(x)[0])
    assert not np.array_equal(png_array(frames[0]), png_array(frames[4]))


# ---------------------------------------------------------------------------------------------- uploads and edits
@pytest.fixture(scope="module")
def digit(loaded) -> bytes:
    """A digit the model drew (class 7), as an uploaded PNG would be."""
    model, schedule, _ = loaded
    x = ddim.sample(model, ddim.randn((1, 1, 28, 28), [5]), schedule, steps=20, model_kwargs={"y": torch.tensor([7])})
    return _png_bytes(to_uint8(x)[0])


def upload(client, endpoint, q, image, mask=None):
    data = {"image": (io.BytesIO(image), "digit.png")}
    if mask is not None:
        data["mask"] = (io.BytesIO(mask), "mask.png")
    return client.post(f"/api/{endpoint}?{q}", data=data, content_type="multipart/form-data")


def test_reconstruct_swap_sdedit_inpaint(client, digit):
    original = png_array(digit).astype(int)
    rec = upload(client, "reconstruct", "steps=20&class=7", digit)
    assert rec.status_code == 200, rec.data
    assert float(rec.headers["X-Mse"]) < 0.01
    assert rec.headers["X-Network-Calls"] == "40"  # inversion + decoding
    assert np.abs(png_array(rec.data).astype(int) - original).mean() < 10
    # the swap to the same class, unguided, decodes the same (cached) latents: the reconstruction itself
    same = upload(client, "swap", "steps=20&source=7&target=7&guidance=1", digit)
    assert same.data == rec.data and same.headers["X-Network-Calls"] == "20"
    other = upload(client, "swap", "steps=20&source=7&target=1&guidance=2", digit)
    assert other.status_code == 200 and other.data != rec.data
    # SDEdit: a little strength keeps the image, full strength makes a new one
    weak = upload(client, "sdedit", "strength=0.1&steps=20&class=7&seed=3", digit)
    strong = upload(client, "sdedit", "strength=1&steps=20&class=1&seed=3", digit)
    assert weak.headers["X-NFE"] == strong.headers["X-NFE"] == "20"  # exactly the steps asked for, any strength
    d_weak = np.abs(png_array(weak.data).astype(int) - original).mean()
    d_strong = np.abs(png_array(strong.data).astype(int) - original).mean()
    assert d_weak < 10 < d_strong
    # inpainting: outside the mask the upload's pixels exactly, inside something new
    m = np.zeros((28, 28), np.uint8)
    m[:, 14:] = 255
    inp = upload(client, "inpaint", "steps=10&class=1&seed=2", digit, png_of(m))
    assert inp.status_code == 200 and inp.headers["X-Masked"] == str(28 * 14)
    got = png_array(inp.data).astype(int)
    assert np.array_equal(got[:, :14], original[:, :14])
    assert not np.array_equal(got[:, 14:], original[:, 14:])
    again = upload(client, "inpaint", "class=1&seed=2&steps=10", digit, png_of(m))
    assert again.data == inp.data and again.headers["X-Cache"] == "hit"
    # spacing "optimized" (the page's choice for sampling): the edits take the fallback spacing name
    for endpoint, q in (("sdedit", "strength=0.5&steps=7&class=7&seed=3"), ("reconstruct", "steps=7&class=7")):
        opt = upload(client, endpoint, f"{q}&spacing=optimized", digit)
        assert opt.status_code == 200, opt.data
        assert opt.data == upload(client, endpoint, f"{q}&spacing=trailing", digit).data


def test_bad_uploads(client, app, digit):
    def text(r):
        return r.get_data(as_text=True)

    r = upload(client, "reconstruct", "", b"this is not an image")
    assert r.status_code == 400 and "image: not a readable image" in text(r) and text(r).count("\n") == 1
    r = upload(client, "reconstruct", "", b"")
    assert r.status_code == 400 and "empty" in text(r)
    r = client.post("/api/reconstruct", data=digit, content_type="image/png")  # not a multipart form
    assert r.status_code == 400 and "multipart form field 'image'" in text(r)
    huge = png_of(np.zeros((4200, 4200), np.uint8))  # small file, too many pixels
    r = upload(client, "reconstruct", "", huge)
    assert r.status_code == 413 and "too large" in text(r)
    big = digit + b"\0" * (app.config["MAX_CONTENT_LENGTH"] + 1)
    r = upload(client, "reconstruct", "", big)
    assert r.status_code == 413 and "larger than" in text(r)
    r = upload(client, "inpaint", "", digit)  # no mask
    assert r.status_code == 400 and "mask" in text(r)
    r = upload(client, "swap", "source=7", digit)
    assert r.status_code == 400 and "target is required" in text(r)
    r = upload(client, "swap", "source=10&target=1", digit)
    assert r.status_code == 400 and "source must be an int in 0..9" in text(r)
    r = upload(client, "sdedit", "strength=0", digit)
    assert r.status_code == 400 and "strength" in text(r)
    r = upload(client, "sdedit", "strength=1.5", digit)
    assert r.status_code == 400 and "strength" in text(r)
    assert upload(client, "reconstruct", "steps=3", digit).status_code == 200  # still serving


# ---------------------------------------------------------------------------------------------- load
def test_16_parallel_requests_correct_and_identical_to_ddim_sample(app, loaded):
    settings = [
        dict(seed=100 + i, steps=2 + i % 3, eta=[0.0, 0.3][i % 2], sampler=["ddim", "dpmpp_2m", "euler", "ddim"][i % 4],
             spacing=["leading", "trailing"][i % 2], label=i % 10 if i % 5 else -1, guidance=[2.0, 1.0, 3.0][i % 3])
        for i in range(16)
    ]  # fmt: skip
    for s in settings:
        if s["sampler"] != "ddim":
            s["eta"] = 0.0
    results: list = [None] * 16
    barrier = threading.Barrier(16)

    def ask(i):
        c = app.test_client()
        barrier.wait()
        results[i] = c.get(f"/api/sample?{query(settings[i])}")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 16
    for r, s in zip(results, settings, strict=True):
        assert r.data == direct_png(loaded, **s), s


def test_full_queue_gets_503_and_same_client_is_superseded(loaded):
    small = create_app(loaded, queue_size=1, warm=False)
    engine = small.extensions["ddim"]["engine"]
    release = threading.Event()
    try:
        hold = threading.Thread(target=engine.run, args=("hold", lambda: (release.wait(30), {})))
        hold.start()
        while engine._running is None:  # until the worker has taken the holding job
            time.sleep(0.01)
        c = small.test_client()
        first: dict = {}
        t = threading.Thread(
            target=lambda: first.update(r=c.get("/api/sample?seed=1&steps=2", headers={"X-Client": "page:main"}))
        )
        t.start()
        while engine.queued < 1:
            time.sleep(0.01)
        full = small.test_client().get("/api/sample?seed=2&steps=2")
        assert full.status_code == 503 and full.headers["Retry-After"] == "1"
        assert "queued" in full.get_data(as_text=True)
        # the same client asks again: its queued request gives way to the new one
        second: dict = {}
        t2 = threading.Thread(
            target=lambda: second.update(r=c.get("/api/sample?seed=3&steps=2", headers={"X-Client": "page:main"}))
        )
        t2.start()
        t.join(10)
        assert first["r"].status_code == 409 and "superseded" in first["r"].get_data(as_text=True)
        release.set()
        t2.join(30)
        assert second["r"].status_code == 200
        assert second["r"].data == direct_png(loaded, seed=3, steps=2)
    finally:
        release.set()
        engine.close()


# ---------------------------------------------------------------------------------------------- the engine
def test_engine_queue_cache_and_close():
    e = Engine(queue_size=2, cache_size=2)
    gate = threading.Event()
    calls = []

    def job(name, wait=False):
        def fn():
            if wait:
                gate.wait(10)
            calls.append(name)
            return name.upper(), {"nfe": 1}

        return fn

    out: dict = {}
    threads = [threading.Thread(target=lambda: out.update(a=e.run("a", job("a", wait=True))))]
    threads[0].start()
    while not (e._running is not None):
        time.sleep(0.005)
    # two identical waiting requests share one job; a third distinct one fills the queue
    for name in ("b", "b2"):
        key = "b"
        threads.append(threading.Thread(target=lambda n=name, k=key: out.update({n: e.run(k, job("b"))})))
        threads[-1].start()
    threads.append(threading.Thread(target=lambda: out.update(c=e.run("c", job("c")))))
    threads[-1].start()
    while e.queued < 2:
        time.sleep(0.005)
    with pytest.raises(QueueFull):
        e.run("d", job("d"))
    gate.set()
    for t in threads:
        t.join(10)
    assert calls == ["a", "b", "c"]  # in order, b once
    assert out["b"][0] == out["b2"][0] == "B"
    value, info = e.run("c", job("c"))  # cached
    assert value == "C" and info.cached and calls == ["a", "b", "c"]
    e.run("d", job("d"))  # evicts the least recently used ("b"; "c" was just used)
    assert e.cached("b") is None and e.cached("c") is not None and e.cached("d") is not None

    def boom():
        raise ValueError("bad setting")

    with pytest.raises(ValueError, match="bad setting"):
        e.run("x", boom)
    assert e.cached("x") is None
    e.close()
    with pytest.raises(ShuttingDown):
        e.run("y", job("y"))


def test_engine_supersedes_only_the_same_clients_waiting_job():
    e = Engine(queue_size=4)
    gate = threading.Event()
    out: dict = {}
    hold = threading.Thread(target=lambda: e.run("hold", lambda: (gate.wait(10), {})))
    hold.start()
    while e._running is None:
        time.sleep(0.005)

    def ask(name, key, client):
        try:
            out[name] = e.run(key, lambda: (key, {}), client=client)[0]
        except Superseded:
            out[name] = "superseded"

    t1 = threading.Thread(target=ask, args=("old", "k1", "me"))
    t1.start()
    t3 = threading.Thread(target=ask, args=("other", "k1", "you"))  # another client wants the same result
    t3.start()
    while e._pending == [] or len(e._pending[0].clients) < 2:
        time.sleep(0.005)
    t2 = threading.Thread(target=ask, args=("new", "k2", "me"))
    t2.start()
    t1.join(10)
    assert out["old"] == "superseded"
    gate.set()
    for t in (t2, t3, hold):
        t.join(10)
    assert out["new"] == "k2" and out["other"] == "k1"  # k1 still ran for the other client
    e.close()


# ---------------------------------------------------------------------------------------------- the process
def test_cli_serves_on_loopback_and_stops_on_ctrl_c(loaded):
    proc, url = start_server("--threads", "1")
    try:
        with urllib.request.urlopen(url + "api/sample?seed=4&steps=3&class=2", timeout=60) as r:
            data, headers = r.read(), r.headers
        assert data == direct_png(loaded, seed=4, steps=3, label=2)
        assert headers["X-NFE"] == "3" and float(headers["X-Wall-Time"]) > 0
        try:
            urllib.request.urlopen(url + "api/sample?steps=0", timeout=30)
        except urllib.error.HTTPError as e:
            assert e.code == 400 and b"steps" in e.read()
        else:
            raise AssertionError("steps=0 was accepted")
        # Ctrl-C during a long request: it gets 503, the process stops at the model's next step, exit 0
        answer: dict = {}

        def long_request():
            try:
                urllib.request.urlopen(url + "api/sample?seed=5&steps=200&class=1", timeout=60)
            except urllib.error.HTTPError as e:
                answer["r"] = (e.code, e.read().decode())

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(1.0)
    finally:
        tic = time.monotonic()
        err = stop_server(proc)
        stopped_in = time.monotonic() - tic
    t.join(30)
    assert "ddim serve: stopped" in err
    assert answer["r"][0] == 503 and "shutting down" in answer["r"][1]
    print(f"stopped in {stopped_in:.2f} s")


def test_cli_usage_errors():
    from ddim.cli import run

    assert run(["serve", "--port", "70000"]) == 2
    assert run(["serve", "--queue", "0"]) == 2
    assert run(["serve", "--model", "/nonexistent/model"]) == 2
    assert run(["serve", "--host", "no-such-host.invalid"]) == 2
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert run(["serve", "--port", str(taken.getsockname()[1])]) == 2


def test_engine_runs_drafts_before_slower_work():
    e = Engine(queue_size=4)
    gate, order = threading.Event(), []
    hold = threading.Thread(target=lambda: e.run("hold", lambda: (gate.wait(10), {})))
    hold.start()
    while e._running is None:
        time.sleep(0.005)
    threads = []
    for key, prio in (("frame", 2), ("edit", 1), ("draft", 0)):
        threads.append(
            threading.Thread(target=e.run, args=(key, lambda k=key: (order.append(k), {})), kwargs={"priority": prio})
        )
        threads[-1].start()
        while e.queued < len(threads):
            time.sleep(0.005)
    gate.set()
    for t in (*threads, hold):
        t.join(10)
    assert order == ["draft", "edit", "frame"]
    e.close()


@pytest.mark.parametrize(
    "kwargs", [{"max_steps": 0}, {"max_frames": 1}, {"queue_size": 0}, {"cache_size": -1}, {"max_upload_bytes": True}]
)
def test_create_app_checks_its_arguments_before_loading(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        create_app("/nonexistent/model", **kwargs)  # refused before the (missing) model is looked for
