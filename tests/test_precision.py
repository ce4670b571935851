"""Where training runs and in what arithmetic: device choice (CUDA, MPS, CPU), the precision
decision per device (capabilities mocked), the fp16 gradient-scaler path on the CPU with exact
resume, what MPS cannot do, and the advice when a batch does not fit in memory (memory mocked)."""

import pytest
import torch
import torch.nn as nn

from helpers import precision, runinfo
from helpers.config import RecognitionConfig
from helpers.data import LoaderBatches
from helpers.engine import FitConfig, TrainingInterrupted, fit
from helpers.memory import BatchDoesNotFit, MemoryProbe, advice, fitting_batch_size, optimizer_state_mb
from helpers.objectives import CrossEntropyObjective
from helpers.optim import build_optimizer
from helpers.runinfo import Runtime, choose_precision, resolve_device
from tests.test_engine import assert_same_run, interrupt_at, run, setup, toy_model


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    monkeypatch.setattr(runinfo, "_NOTICED", set())


# ------------------------------------------------------------------------------------ devices


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == expected


def test_mps_is_accepted_where_it_exists_and_refused_clearly_where_not(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='mps' but Apple's Metal backend is not available"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="device='tpu' is not valid; choose one of auto, cpu, cuda, mps"):
        resolve_device("tpu")


# ------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize(
    "device,capability,used,says",
    [
        ("cuda", (9, 0), "bf16", "native on this GPU (compute capability 9.0 >= 8.0)"),  # H100
        ("cuda", (8, 0), "bf16", "compute capability 8.0 >= 8.0"),  # A100
        ("cuda", (8, 6), "bf16", "8.6"),  # RTX 30xx
        (
            "cuda",
            (7, 5),
            "fp16",
            "fp16 autocast with a gradient scaler (compute capability 7.5 < 8.0 has no native bf16)",
        ),  # Colab's T4
        ("cuda", (6, 0), "fp16", "6.0 < 8.0"),  # P100
        (
            "cpu",
            None,
            "fp32",
            "auto on cpu: fp32, unless a run long enough to measure finds bf16 autocast or channels_last faster",
        ),
        ("mps", None, "fp32", "auto: fp32 on mps"),
    ],
)
def test_auto_precision_per_device(device, capability, used, says):
    choice = choose_precision("auto", device, capability)
    assert (choice.setting, choice.used) == ("auto", used) and says in choice.reason


def test_the_device_capability_is_read_when_not_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert choose_precision("auto", "cuda:0").used == "fp16"


def test_explicit_precisions_are_used_as_asked_or_degrade_with_a_notice(monkeypatch, capsys):
    assert choose_precision("fp32", "cuda", (9, 0)).used == "fp32"
    assert choose_precision("fp16", "cpu").used == "fp16" and choose_precision("bf16", "cpu").used == "bf16"
    monkeypatch.setattr(runinfo, "_autocast_works", lambda device_type, used: True)
    emulated = choose_precision("bf16", "cuda", (7, 5))
    assert emulated.used == "bf16" and "emulated on this GPU (compute capability 7.5 < 8.0)" in emulated.reason
    assert "precision='bf16' on a GPU without native bf16" in capsys.readouterr().err
    monkeypatch.setattr(runinfo, "_grad_scaler_works", lambda device_type: False)  # MPS before PyTorch 2.8
    assert (
        choose_precision("fp16", "mps").used == "fp32"
        and "the fp16 gradient scaler is not available on mps" in capsys.readouterr().err
    )
    monkeypatch.setattr(runinfo, "_autocast_works", lambda device_type, used: False)  # e.g. bf16 on MPS before macOS 14
    fallback = choose_precision("bf16", "mps")
    assert fallback.used == "fp32" and "unavailable on mps" in fallback.reason
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "autocast to bf16 is not available on mps with PyTorch" in err
        and err.endswith("training in fp32\n")
    )
    choose_precision("bf16", "mps")
    assert capsys.readouterr().err == "", "a notice is shown once per process"
    with pytest.raises(ValueError, match="precision='fp8' is not valid; choose one of auto, bf16, fp16, fp32"):
        choose_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="precision='half' is not valid"):
        FitConfig(precision="half")


def test_runtime_autocast_and_scaler_follow_the_precision():
    x, w = torch.randn(4, 8), torch.randn(8, 2)
    for precision, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        runtime = Runtime("cpu", precision)
        with runtime.autocast():
            assert (x @ w).dtype == dtype, precision
        assert (runtime.grad_scaler() is not None) == (precision == "fp16")
    cfg = RecognitionConfig.build("T2", "smoke", device="cpu")
    assert cfg.precision == "auto" and Runtime.of(cfg).precision == "fp32", (
        "auto is fp32 on the CPU (the smoke metrics stay as they were)"
    )


def test_evaluation_follows_the_precision(monkeypatch):
    from helpers.data import BatchAugment, TensorBatches
    from helpers.evaluation import run_split

    images = torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8)
    source = TensorBatches(images, torch.zeros(8, dtype=torch.long), batch_size=4)
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    run_split(model, source, BatchAugment(crop="none", flip=False), Runtime("cpu", "bf16"))
    run_split(model, source, BatchAugment(crop="none", flip=False), Runtime("cpu", "fp32"))
    assert seen == [torch.bfloat16] * 2 + [torch.float32] * 2


# ------------------------------------------------------------------------------------ fp16 + GradScaler


def test_fp16_training_uses_a_gradient_scaler_that_is_checkpointed(tmp_path):
    model, result = run(tmp_path, "fp16", precision="fp16", epochs=3)
    assert all(map(torch.isfinite, (torch.tensor(h["train_loss"]) for h in result.history)))
    assert result.history[-1]["heldout_top1"] > 0.5, "the toy problem is learned in fp16 too"
    ckpt = torch.load(tmp_path / "fp16" / "last.pt", weights_only=False)
    assert ckpt["scaler"]["scale"] > 0 and "_growth_tracker" in ckpt["scaler"]
    fp32 = run(tmp_path, "fp32", precision="fp32", epochs=3)
    assert torch.load(tmp_path / "fp32" / "last.pt", weights_only=False)["scaler"] is None
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fp32[0].state_dict().values())), (
        "fp16 really ran"
    )


def start_scaler_at(monkeypatch, scale: float) -> None:
    original = torch.amp.GradScaler.__init__
    monkeypatch.setattr(
        torch.amp.GradScaler, "__init__", lambda self, *a, **k: original(self, *a, **(k | {"init_scale": scale}))
    )


@pytest.mark.parametrize("epoch,step", [(0, 3), (1, 4)])
def test_fp16_run_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, epoch, step):
    start_scaler_at(
        monkeypatch, 2.0**30
    )  # its first steps overflow and are skipped: the scale's state matters on resume
    straight = run(tmp_path, "straight", precision="fp16", epochs=3, grad_clip=1.0)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, "resumed", precision="fp16", epochs=3, grad_clip=1.0, on_step=interrupt_at(epoch, step))
    resumed = run(tmp_path, "resumed", model_seed=99, precision="fp16", epochs=3, grad_clip=1.0)
    assert resumed[1].resumed_from == {"epoch": epoch, "step": step}
    assert_same_run(straight, resumed)


def test_the_scaler_skips_steps_whose_fp16_gradients_overflow(tmp_path, monkeypatch):
    # an initial scale of 2**40 overflows fp16 gradients: the scaler halves it and skips those steps
    train, augment, cfg, evaluator = setup(tmp_path, epochs=1, precision="fp16")
    model = toy_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start_scaler_at(monkeypatch, 2.0**40)
    fit(model, train, augment, cfg, out_dir=tmp_path / "overflow", progress=False)
    scale = torch.load(tmp_path / "overflow" / "last.pt", weights_only=False)["scaler"]["scale"]
    assert scale < 2.0**40, "overflowing steps lowered the scale"
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "later steps trained"


def test_resuming_in_another_precision_says_so(tmp_path, capsys):
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, "moved", epochs=2, on_step=interrupt_at(0, 2))
    path = tmp_path / "moved" / "last.pt"
    state = torch.load(path, weights_only=False)
    assert state["precision"] == "fp32"
    torch.save(
        state | {"precision": "bf16", "precision_choice": None}, path
    )  # as if written by precision "auto" on an A100
    capsys.readouterr()
    run(tmp_path, "moved", epochs=2)
    assert "was trained in bf16 and continues in fp32" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_cpu_optimizer_is_fused_and_steps_as_the_plain_one_does(name):
    """fused=True on the CPU: PyTorch's fused kernel (2.4 on; an older one falls back to the plain
    loop), the same update as the per-parameter loop to float32 rounding, both decay groups."""
    torch.manual_seed(0)
    weights = [torch.randn(16, 8), torch.randn(8)]
    grads = [torch.randn_like(w) for w in weights]
    after = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        groups = [{"params": params[:1], "weight_decay": 5e-4}, {"params": params[1:], "weight_decay": 0.0}]
        optimizer = build_optimizer(groups, FitConfig(optimizer=name, lr=0.1, fused=fused), torch.device("cpu"))
        if not fused:  # (PyTorch's CPU default is the per-parameter loop)
            assert not optimizer.defaults.get("fused") and not optimizer.defaults.get("foreach")
        elif "cpu" in torch.utils._foreach_utils._get_fused_kernels_supported_devices():
            assert optimizer.defaults["fused"]
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
        after[fused] = [p.detach() for p in params]
    assert not torch.equal(after[True][0], weights[0])
    for fused_p, plain_p in zip(after[True], after[False]):
        torch.testing.assert_close(fused_p, plain_p, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ MPS


def test_what_mps_cannot_do_degrades_with_a_one_line_notice(capsys):
    from helpers.engine import wants_compile

    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = build_optimizer([{"params": params}], FitConfig(optimizer="adam", fused=True), torch.device("mps"))
    assert not optimizer.defaults.get("fused")
    assert "fused optimizer kernels are used on CUDA and the CPU only" in capsys.readouterr().err
    assert not wants_compile(FitConfig(compile=True), torch.device("mps"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch.compile is not used on MPS" in err
    assert wants_compile(FitConfig(compile=True), torch.device("cpu")) and not wants_compile(
        FitConfig(), torch.device("mps")
    )
    images, labels = torch.zeros(4, 8, 8, 3, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    loader = LoaderBatches(
        torch.utils.data.TensorDataset(images.permute(0, 3, 1, 2), labels),
        batch_size=2,
        device="mps",
        labels=labels.tolist(),
    )
    assert loader.loader.pin_memory is False, "pinned memory is for CUDA copies only"


# ------------------------------------------------------------------------------------ out of memory


def test_fitting_batch_size_from_a_probe():
    probe = MemoryProbe(batch=64, static_mb=1000, peak_mb=1000 + 64 * 20, total_mb=16000)
    assert probe.per_image_mb == 20
    assert fitting_batch_size(probe, 1024) == 8 * int((16000 * 0.9 - 1000) / 20 // 8)  # 670 -> 664
    assert fitting_batch_size(probe, 256) == 255 - 255 % 8, "never the batch size that failed"
    assert fitting_batch_size(probe, 1024, extra_static_mb=400) == 648
    assert fitting_batch_size(MemoryProbe(1, 1000, 15000, 16000), 4) == 0
    assert fitting_batch_size(MemoryProbe(4, 1000, 1040, 16000), 6) == 5, "below 8 no rounding"
    text = advice("T2_resnet18", "CUDA", 1024, 0.4, probe, 664)
    assert (
        "A batch that fits: batch_size (or pk_classes x pk_images for P x K batches) = 664, with the learning rate scaled "
        "linearly with the batch: 0.4 x 664/1024 = 0.2594." in text
    )
    assert "each image about 20.0 MiB" in text and "peak 2.23 GiB" in text
    assert "not even one image fits" in advice("x", "CUDA", 4, 0.1, MemoryProbe(1, 1000, 15000, 16000), 0)
    assert "(not measured on this device). Try batch_size (or pk_classes x pk_images for P x K batches) = 16" in advice(
        "x", "MPS", 32, 0.1, None, 0
    )


def test_optimizer_state_not_yet_created_is_counted():
    params = [torch.nn.Parameter(torch.zeros(2**18))]  # 1 MiB of fp32
    assert optimizer_state_mb(torch.optim.Adam(params)) == 2.0
    assert optimizer_state_mb(torch.optim.SGD(params, lr=0.1, momentum=0.9)) == 1.0
    assert optimizer_state_mb(torch.optim.SGD(params, lr=0.1)) == 0.0
    optimizer = torch.optim.Adam(params)
    params[0].grad = torch.zeros_like(params[0])
    optimizer.step()
    assert optimizer_state_mb(optimizer) == 0.0


class FakeMemory:
    """A 1 GiB device: 100 MiB of weights, `per_image` MiB per image."""

    def __init__(self, per_image=4.0):
        self.peak = self.now = 100.0
        self.per_image = per_image
        self.released = 0

    def release(self):
        self.released += 1
        self.peak = self.now

    def allocated_mb(self):
        return self.now

    def peak_mb(self):
        return self.peak

    def total_mb(self):
        return 1024.0

    def use(self, batch):
        if self.now + self.per_image * batch > 1024:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.peak = max(self.peak, self.now + self.per_image * batch)


def fit_out_of_memory(tmp_path, memory, batch_size, error=torch.OutOfMemoryError):
    import helpers.engine as engine
    from helpers.data import BatchAugment, TensorBatches
    from helpers.objectives import CrossEntropyObjective

    class Hungry(CrossEntropyObjective):
        def forward(self, model, x, targets):
            try:
                memory.use(x.shape[0])
            except torch.OutOfMemoryError as exc:
                raise error(str(exc)) from None
            return super().forward(model, x, targets)

    images = torch.randint(0, 256, (2 * batch_size, 8, 8, 3), dtype=torch.uint8)
    train = TensorBatches(
        images, torch.randint(0, 4, (2 * batch_size,)), batch_size=batch_size, shuffle=True, drop_last=True
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "device_memory", lambda device: memory)
        with pytest.raises(BatchDoesNotFit) as info:
            fit(
                toy_model(),
                train,
                BatchAugment(crop="none", flip=False),
                FitConfig(epochs=1, lr=0.2, monitor=""),
                objective=Hungry(),
                out_dir=tmp_path / "oom",
                progress=False,
                name="T2_resnet18",
            )
    assert info.value.__cause__ is None and info.value.__suppress_context__, "no raw CUDA traceback chained"
    assert not (tmp_path / "oom" / "last.pt").exists(), "nothing partial is saved"
    return str(info.value)


def test_out_of_memory_in_a_step_gives_one_clear_message_with_a_batch_that_fits(tmp_path):
    message = fit_out_of_memory(tmp_path, FakeMemory(per_image=4.0), 256)
    # probe: 64 images -> 4 MiB each; (0.9 * 1024 - 100 - the SGD momentum buffers (a few KiB)) / 4 -> 205 -> 200
    assert message.startswith("T2_resnet18 (epoch 1, step 1): out of CPU memory at a batch of 256 images."), (
        "(the CUDA counters are mocked on the CPU)"
    )
    assert "each image about 4.0 MiB more (measured on 64 images" in message
    assert "= 200, with the learning rate scaled linearly with the batch: 0.2 x 200/256 = 0.1562." in message


def test_a_probe_that_runs_out_of_memory_too_is_repeated_smaller(tmp_path):
    # 16 MiB per image: 128 images (a quarter of 512) do not fit, 32 do -> (921.6 - 100) / 16 = 51 -> 48
    message = fit_out_of_memory(tmp_path, FakeMemory(per_image=16.0), 512)
    assert "measured on 32 images" in message and "= 48, with the learning rate" in message


def test_mps_out_of_memory_is_recognised_too(tmp_path):
    message = fit_out_of_memory(
        tmp_path,
        FakeMemory(per_image=16.0),
        512,
        error=lambda text: RuntimeError("MPS backend out of memory (MPS allocated: 8 GiB)"),
    )
    assert "measured on 32 images" in message


# ------------------------------------------------------------------------------------ precision "auto" on the CPU, measured


@pytest.mark.parametrize(
    "timings, expected",
    [
        (
            {"fp32": 0.30, "bf16": 0.20, "bf16 + channels_last": 0.12},
            ("bf16", True),
        ),  # AMX-like: bf16 + channels_last 2.5x
        ({"fp32": 0.30, "bf16": 0.20, "bf16 + channels_last": 0.25}, ("bf16", False)),
        (
            {"fp32": 0.10, "bf16": 0.095, "bf16 + channels_last": 0.097},
            ("fp32", False),
        ),  # 5 % faster is not enough to round activations
        (
            {"fp32": 0.10, "bf16": 0.17, "bf16 + channels_last": 0.16},
            ("fp32", False),
        ),  # 32 px, ImageNet stem on a Xeon: bf16 0.6x
        ({"fp32": 0.10}, ("fp32", False)),  # no bf16 autocast on this CPU
        ({"fp32": 0.509, "fp32 + channels_last": 0.452}, ("fp32", True)),  # AVX2 EPYC, 32 px, batch 128: 1.13x
        ({"fp32": 0.100, "fp32 + channels_last": 0.098}, ("fp32", False)),  # 2 %: a tie keeps the usual layout
        ({"fp32": 0.10, "fp32 + channels_last": 0.12}, ("fp32", False)),
        # bf16 must beat the FASTEST fp32 by 10 %: 1.14x plain fp32, but only 1.02x fp32 + channels_last
        ({"fp32": 0.40, "fp32 + channels_last": 0.36, "bf16": 0.40, "bf16 + channels_last": 0.35}, ("fp32", True)),
        ({"fp32": 0.40, "fp32 + channels_last": 0.36, "bf16": 0.40, "bf16 + channels_last": 0.30}, ("bf16", True)),
    ],
)
def test_the_fastest_measured_precision_is_chosen_bf16_only_when_clearly_faster(timings, expected):
    used, channels_last, reason = precision.choose(timings)
    assert (used, channels_last) == expected
    assert reason.startswith("auto on cpu, measured per step: fp32 ") and f"{1000 * timings['fp32']:.0f} ms" in reason


def test_the_candidates_are_timed_in_turns_and_each_keeps_its_fastest_step(monkeypatch):
    """A cold first step (or a busy moment) must not decide: every candidate is warmed, then they take
    turns, and each keeps its fastest round."""
    monkeypatch.setattr(precision, "_autocast_works", lambda device, dtype: True)
    monkeypatch.setattr(precision, "no_fast_bf16", lambda: "")
    order, calls = [], []

    def fake_step(runtime, *args):
        name = precision.label(runtime.precision, runtime.channels_last)
        return lambda: calls.append(name)

    # the warm steps, then fp32 cold first, then a busy bf16 round
    readings = iter([0.90, 0.95, 0.80, 0.85, 0.30, 0.12, 0.20, 0.25, 0.10, 0.13, 0.21, 0.24, 0.11, 0.14, 0.50, 0.26])

    def fake_time(step, steps=3, clock=None, warm=True):
        step()
        order.append(calls[-1])
        return next(readings)

    monkeypatch.setattr(precision, "_training_step", fake_step)
    monkeypatch.setattr(precision, "time_step", fake_time)
    timings = precision.measure(toy_model(), CrossEntropyObjective(0.0), torch.randn(2, 3, 8, 8), torch.zeros(2).long())
    names = ["fp32", "fp32 + channels_last", "bf16", "bf16 + channels_last"]
    assert calls[:4] == names, "each candidate is warmed first"
    assert order == names * 4, "then they take turns"
    assert timings == {"fp32": 0.10, "fp32 + channels_last": 0.12, "bf16": 0.20, "bf16 + channels_last": 0.24}
    assert precision.choose(timings)[:2] == ("fp32", False), "fp32's cold first reading (0.30) did not count"


def test_a_bf16_candidate_whose_warm_step_is_far_slower_is_not_timed_again(monkeypatch):
    """An emulated bf16 path (25x slower on an AVX2 EPYC) must not cost rounds of minutes."""
    monkeypatch.setattr(precision, "_autocast_works", lambda device, dtype: True)
    monkeypatch.setattr(precision, "no_fast_bf16", lambda: "")
    timed = []

    def fake_step(runtime, *args):
        return lambda: precision.label(runtime.precision, runtime.channels_last)

    # 25x, and 3.5x (still timed)
    warm_readings = {"fp32": 0.10, "fp32 + channels_last": 0.09, "bf16": 2.5, "bf16 + channels_last": 0.35}
    later = {"fp32": 0.08, "fp32 + channels_last": 0.085, "bf16 + channels_last": 0.30}

    def fake_time(step, steps=3, clock=None, warm=True):
        name = step()
        timed.append(name)
        return later[name] if timed.count(name) > 1 else warm_readings[name]

    monkeypatch.setattr(precision, "_training_step", fake_step)
    monkeypatch.setattr(precision, "time_step", fake_time)
    timings = precision.measure(toy_model(), CrossEntropyObjective(0.0), torch.randn(2, 3, 8, 8), torch.zeros(2).long())
    assert timed.count("bf16") == 1
    assert all(timed.count(name) == 1 + precision.ROUNDS for name in later)
    assert timings == {"fp32": 0.08, "fp32 + channels_last": 0.085, "bf16": 2.5, "bf16 + channels_last": 0.30}
    assert precision.choose(timings)[:2] == ("fp32", False)


@pytest.mark.parametrize(
    "machine,capability,fast",
    [("x86_64", "AVX512", True), ("x86_64", "AVX2", False), ("AMD64", "DEFAULT", False), ("aarch64", "SVE256", True)],
)
def test_an_x86_cpu_without_avx512_times_only_the_fp32_layouts(tmp_path, monkeypatch, machine, capability, fast):
    """Measured on an AMD EPYC with AVX2 only: bf16 autocast works, and one ResNet-18 step at 64 px
    took 150 s against 5.7 s in fp32. Timing it would cost minutes, so such a CPU times fp32 with
    and without channels_last only (1.13x for channels_last there at 32 px, batch 128)."""
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    monkeypatch.setattr(precision, "cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "_autocast_works", lambda device, dtype: True)
    why = precision.no_fast_bf16()
    assert (why == "") == fast and (fast or capability in why)
    labels = [precision.label(*c) for c in precision.candidates()]
    assert labels == ["fp32", "fp32 + channels_last"] + (["bf16", "bf16 + channels_last"] if fast else [])
    assert precision.candidates(channels_last=False) == [("fp32", False)] + ([("bf16", False)] if fast else [])
    assert precision.candidates(images=False)[0] == ("fp32", False) and not any(
        layout for _, layout in precision.candidates(images=False)
    ), "a batch that is not (B, C, H, W) has no channels_last"
    if fast:
        return
    monkeypatch.setattr(precision, "MIN_STEPS", 10)  # (the toy run has 16 steps: long enough to measure)
    measured = []

    def measure(model, objective, x, y, channels_last=True, **kwargs):
        measured.append(channels_last)
        return {"fp32": 0.3, "fp32 + channels_last": 0.2}

    monkeypatch.setattr(precision, "measure", measure)
    _, result = run(tmp_path, "avx2", precision="auto")
    assert measured == [True] and result.precision["used"] == "fp32" and result.precision["channels_last"]
    assert (
        capability in result.precision["reason"] and "fp32 + channels_last is 1.50x fp32" in result.precision["reason"]
    )
    _, plain = run(tmp_path, "avx2-plain", precision="auto", channels_last=False)  # nothing to choose between
    assert measured == [True] and plain.precision["used"] == "fp32" and not plain.precision["channels_last"]
    assert capability in plain.precision["reason"] and not plain.precision["timings"]
    cfg = RecognitionConfig.build("T2", "smoke", precision="auto", channels_last=False)
    assert precision.probe(toy_model(), CrossEntropyObjective(0.0), None, None, cfg, "cpu") == (1.0, 0.0)


def test_the_measurement_runs_for_real_on_this_cpu():
    model = toy_model()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    timings = precision.measure(model, CrossEntropyObjective(0.0), x, y, rounds=1)
    assert "fp32" in timings and all(t > 0 for t in timings.values())
    assert (
        {"fp32", "fp32 + channels_last"}
        <= set(timings)
        <= {"fp32", "fp32 + channels_last", "bf16", "bf16 + channels_last"}
    )
    assert all(p.grad is None for p in model.parameters()), "the model itself is not touched"


def test_a_long_enough_cpu_run_trains_in_the_measured_choice_and_its_resume_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "MIN_STEPS", 10)  # (the toy run has 4 x 4 = 16 steps)
    monkeypatch.setattr(precision, "no_fast_bf16", lambda: "")  # (any CPU: the timings are mocked)
    calls = []
    monkeypatch.setattr(
        precision, "measure", lambda *a, **k: calls.append(1) or {"fp32": 0.3, "bf16": 0.2, "bf16 + channels_last": 0.1}
    )
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, "auto", on_step=interrupt_at(1, 2), precision="auto")
    saved = torch.load(tmp_path / "auto" / "last.pt", weights_only=False)
    assert saved["precision"] == "bf16" and saved["precision_choice"]["channels_last"] and calls == [1]
    model, result = run(tmp_path, "auto", precision="auto")  # resumed: the checkpoint's choice, not measured again
    assert (
        calls == [1] and result.precision["used"] == "bf16" and result.record()["precision"]["timings"]["fp32"] == 0.3
    )
    assert result.resumed_from == {"epoch": 1, "step": 2}
    monkeypatch.setattr(precision, "MIN_STEPS", 10**6)
    _, short = run(tmp_path, "short", precision="auto")
    assert short.precision["used"] == "fp32" and "too short to measure" in short.precision["reason"] and calls == [1]
    _, asked = run(tmp_path, "asked", precision="fp32")  # an explicit precision is not measured
    assert asked.precision is None and calls == [1]


def test_the_measurement_leaves_the_random_state_and_restores_the_usual_layout():
    """Dropout in the timed steps must not shift the training's draws; a copy of a model trained in
    channels_last (T4's stage 2 copies stage 1's backbone) is timed as fp32 in the usual layout."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(4))
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    model(x)
    precision.set_layout(model, True)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    real = precision._training_step

    def recording(runtime, probe, *args):
        seen.append((precision.label(runtime.precision, runtime.channels_last), probe[0].weight.is_contiguous()))
        return real(runtime, probe, *args)

    torch.manual_seed(0)
    before = torch.get_rng_state()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precision, "_training_step", recording)
        precision.measure(model, CrossEntropyObjective(0.0), x, y, rounds=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert seen[:2] == [("fp32", True), ("fp32 + channels_last", False)]
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last), "the model itself keeps its layout"
    assert precision.set_layout(model, False)[0].weight.is_contiguous()


def test_a_budget_too_short_for_the_measurement_to_pay_keeps_fp32(monkeypatch):
    """Channels_last wins 5-13 %; a budget of fewer than MIN_STEPS steps cannot win back the ~8
    steps the measurement takes: after fp32's warm step nothing more is timed."""
    timed = []
    monkeypatch.setattr(precision, "_training_step", lambda runtime, *a: lambda: None)

    def fake_time(step, steps=3, clock=None, warm=True):
        timed.append(1)
        return 0.5

    monkeypatch.setattr(precision, "time_step", fake_time)
    x, y = torch.randn(2, 3, 8, 8), torch.zeros(2).long()
    timings = precision.measure(toy_model(), CrossEntropyObjective(0.0), x, y, budget_s=0.5 * precision.MIN_STEPS - 1)
    assert timings == {"fp32": 0.5} and timed == [1]
    used, channels_last, reason = precision.choose(timings, budget_s=0.5 * precision.MIN_STEPS - 1)
    assert (used, channels_last) == ("fp32", False) and "too short to measure" in reason
    timed.clear()
    timings = precision.measure(toy_model(), CrossEntropyObjective(0.0), x, y, budget_s=0.5 * precision.MIN_STEPS + 1)
    assert "fp32 + channels_last" in timings and len(timed) > 2
