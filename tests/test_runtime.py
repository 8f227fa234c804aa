"""Device-dependent choices: weight layout, evaluation batch, threads, and the host heap."""

from __future__ import annotations

import pytest
import torch

from fewshot_cli.algorithms.maml import MAML
from fewshot_cli.algorithms.protonet import ProtoNet
from fewshot_cli.backbones.conv4 import Conv4
from fewshot_cli.build import concurrent_jobs, set_threads
from fewshot_cli.engine.runtime import (
    SMALL_STEP_FLOPS,
    choose_threads,
    cpu_quota,
    episodes_per_batch,
    forward_flops,
    memory_format_for,
    native_bf16,
    pad_host_heap,
    usable_cores,
)
from fewshot_cli.errors import FewshotError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_layout_is_channels_last_on_cpu_unless_the_algorithm_declines():
    assert memory_format_for(CPU, "auto") == torch.channels_last
    assert memory_format_for(CPU, "auto", prefers_channels_last=False) == torch.contiguous_format
    assert memory_format_for(CUDA, "auto") == torch.contiguous_format
    assert memory_format_for(CUDA, "channels_last") == torch.channels_last
    assert memory_format_for(CPU, "contiguous") == torch.contiguous_format
    with pytest.raises(FewshotError, match="memory_format=nhwc is unknown"):
        memory_format_for(CPU, "nhwc")
    assert ProtoNet.prefers_channels_last and not MAML.prefers_channels_last


def test_channels_last_weights_give_the_same_embeddings():
    torch.manual_seed(0)
    net = Conv4(hidden=16).eval()
    images = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        plain = net(images)
        net.to(memory_format=torch.channels_last)
        assert net.encoder[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(net(images), plain, rtol=1e-4, atol=1e-5)
    state = net.state_dict()  # loads into a contiguous network unchanged
    fresh = Conv4(hidden=16).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), plain, rtol=1e-4, atol=1e-5)


def test_eval_batch():
    assert episodes_per_batch(CPU, "auto") == 4
    assert episodes_per_batch(CUDA, "auto") == 16
    assert episodes_per_batch(CPU, 7) == 7
    for bad in (0, "many"):
        with pytest.raises(FewshotError, match="eval.batch"):
            episodes_per_batch(CPU, bad)


def test_pad_host_heap_is_harmless():
    applied = pad_host_heap(1 << 20)
    assert isinstance(applied, bool)
    assert torch.ones(1000).sum() == 1000  # allocation still works after the change


def test_bf16_runs_on_a_cpu_with_native_bfloat16_and_is_refused_elsewhere(monkeypatch):
    from fewshot_cli.engine import runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda: True)
    with runtime.autocast_for(CPU, "bf16")():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    with pytest.raises(FewshotError, match="native bfloat16"):
        runtime.autocast_for(CPU, "bf16")
    assert runtime.autocast_for(CPU, "fp32") is not None


@pytest.mark.skipif(not native_bf16(),
                    reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
def test_a_bf16_protonet_step_on_the_cpu_keeps_float32_weights_and_learns():
    from fewshot_cli.engine.runtime import autocast_for
    from fewshot_cli.episode import Episode

    torch.manual_seed(0)
    algo = ProtoNet(Conv4(hidden=16), ways=5).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(algo.parameters(), 1e-2)
    # five well-separated "classes": constant images at five grey levels, plus noise
    levels = torch.linspace(0, 1, 5).view(1, 5, 1, 1, 1, 1)
    noisy = lambda per: (levels + 0.05 * torch.randn(1, 5, per, 1, 28, 28)).flatten(1, 2)
    labels = lambda per: torch.arange(5).repeat_interleave(per)[None]
    losses = []
    for _ in range(20):
        tasks = Episode(noisy(1), labels(1), noisy(3), labels(3), 5, 1, 3)
        with autocast_for(CPU, "bf16")():
            loss, metrics = algo.meta_loss(tasks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(p.dtype == torch.float32 for p in algo.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


def test_conv4_pools_before_its_relu_with_the_same_values_and_gradients():
    """Pooling first (4x less ReLU work) gives what the textbook order gives, bit for bit, also
    where a whole pooling window is negative."""
    torch.manual_seed(0)
    net = Conv4(hidden=8)
    order = [type(m).__name__ for m in net.encoder[0]]
    assert order == ["Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU"]
    textbook = Conv4(hidden=8)
    textbook.load_state_dict(net.state_dict())  # the parameter names did not change
    for block in textbook.encoder:
        block[2], block[3] = block[3], block[2]
    images = torch.randn(10, 1, 28, 28)
    out, ref = net(images), textbook(images)
    assert torch.equal(out, ref) and (ref == 0).any()  # some windows were all negative
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), list(net.parameters()))
    ref_grads = torch.autograd.grad((ref * weights).sum(), list(textbook.parameters()))
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.equal(g, r)


# ---------------------------------------------------------------- device.threads


def test_cgroup_quotas_of_both_versions_are_read(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(str(v2)) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(str(v2)) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(str(tmp_path / "v1")) == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(str(tmp_path / "v1")) is None
    assert cpu_quota(str(tmp_path / "none")) is None


def test_auto_threads_share_the_cores_and_give_small_models_one(monkeypatch):
    monkeypatch.setattr("fewshot_cli.engine.runtime.usable_cores", lambda: 8)
    big = 10 * SMALL_STEP_FLOPS
    assert choose_threads("auto", CPU, 1, big)[0] == 8
    assert choose_threads("auto", CPU, 2, big)[0] == 4      # two torchrun ranks, or joblib jobs
    assert choose_threads("auto", CPU, 16, big)[0] == 1     # more jobs than cores: one each
    threads, why = choose_threads("auto", CPU, 1, SMALL_STEP_FLOPS / 10)
    assert threads == 1 and "small model" in why
    assert choose_threads("auto", CUDA, 1, 0.0)[0] == 8     # the host side of a GPU run
    assert choose_threads(3, CPU, 4, big) == (3, "device.threads=3")
    for bad in (0, -1, 2000, "many", True, 2.5):
        with pytest.raises(FewshotError, match="device.threads="):
            choose_threads(bad, CPU, 1, big)
    assert 1 <= usable_cores()


def test_flops_of_a_convolutional_backbone_leave_its_statistics_alone():
    net = Conv4(in_channels=1, hidden=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flops = forward_flops(net, torch.zeros(1, 1, 28, 28))
    assert flops > 0 and net.training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_set_threads_counts_the_step_and_keeps_omp_num_threads(monkeypatch):
    net = ProtoNet(Conv4(in_channels=1, hidden=8), ways=5)
    inputs = {"in_channels": 1, "image_size": 28}
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr("fewshot_cli.engine.runtime.usable_cores", lambda: 2)
        assert set_threads("auto", CPU, net, inputs, 10) == (
            "CPU threads: 1 (auto: 2 usable cores, 1 process at once, a small model "
            f"({3 * 10 * forward_flops(net.backbone, torch.zeros(1, 1, 28, 28)) / 1e9:.2g} "
            "GFLOP a step))")
        assert torch.get_num_threads() == 1
        assert set_threads("auto", CPU, net, inputs, 10 ** 6).startswith("CPU threads: 2 (")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads("auto", CPU, net, inputs, 10 ** 6) == (
            f"CPU threads: {torch.get_num_threads()} (OMP_NUM_THREADS=1)")
    finally:
        torch.set_num_threads(threads)


def test_torchrun_ranks_on_one_machine_share_it(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert concurrent_jobs() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert concurrent_jobs() == 1


def test_waiting_threads_sleep_on_a_shared_machine_and_spin_on_an_idle_one(monkeypatch):
    """OpenMP's default wait policy spins: beside busy processes the spinning threads took most
    of the CPU (scripts/bench_threads.py), while on an idle machine spinning is faster. The
    command sets the sleeping policy before torch loads where the machine is shared (a sweep,
    torchrun's ranks, a load that fills the cores), and keeps a user's own policy."""
    import os

    from fewshot_cli.cli import machine_is_shared, set_wait_policy

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert not machine_is_shared(["train"], "0.00 0.00 0.00 1/300 1")
    assert machine_is_shared(["train"], f"{cores}.50 1.00 1.00 1/300 1")     # the last minute
    assert machine_is_shared(["train"], f"0.10 0.10 0.10 {cores + 1}/300 1")  # runnable now
    assert machine_is_shared(["train", "-m", "seed=0,1"], "0.00 0.00 0.00 1/300 1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert machine_is_shared(["train"], "0.00 0.00 0.00 1/300 1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    set_wait_policy(["train", "-m"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    set_wait_policy(["train", "-m"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
