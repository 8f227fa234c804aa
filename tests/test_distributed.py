"""Data-parallel meta-training under torchrun on the CPU (gloo): the same trajectory as one
process, Ctrl-C on one rank and resume, and the one-sentence errors.

Tolerance: the gradients of a 2-process meta-step equal the 1-process ones to float32 rounding
(max abs difference 1e-4 on gradients of size ~4), and after 10 SGD steps the weights agree to
1e-5. The CLI comparisons use SGD with a small step and ``device.memory_format=contiguous``:
Adam's normalisation turns the rounding of gradients whose true value is ~0 (the conv biases
that BatchNorm cancels) into steps of ±lr, and the CPU's channels_last BatchNorm computes its
float32 statistics less precisely, differently for 1 and 2 threads, so neither would show
whether the data-parallel arithmetic is right.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import HUNG, run_cli

from fewshot_cli.algorithms.maml import MAML
from fewshot_cli.algorithms.protonet import ProtoNet
from fewshot_cli.backbones.conv4 import Conv4
from fewshot_cli.data.sampler import EpisodeSampler
from fewshot_cli.data.store import ClassStore
from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.engine.distributed import Processes

SMALL = ["backbone.hidden=8", "train.queries=3", "eval.queries=3", "train.val_episodes=8",
         "eval.episodes=8", "device=cpu", "device.memory_format=contiguous",
         "train.optimizer._target_=torch.optim.SGD", "train.lr=0.01", "train.meta_batch=4"]
TINY = ["dataset=glyphs", "dataset.classes.train=20", "dataset.classes.val=8",
        "dataset.classes.test=8", *SMALL]
MAML_ARGS = ["algo=maml", "algo.inner_lr=0.1", "train.meta_batch=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    """``torchrun --nproc_per_node=2 -m fewshot_cli <args>`` on this machine."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "fewshot_cli",
               *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def finished(proc: subprocess.Popen, timeout: float = HUNG) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key].float(), wb[key].float(), atol=atol, rtol=0,
                                   msg=key)


# ---------------------------------------------------------------- gradients, in process


def _tiny(kind: str) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    algo = ProtoNet(Conv4(1, 16, hidden=8), 3) if kind == "protonet" else \
        MAML(Conv4(1, 16, hidden=8), 3, inner_lr=0.1)
    images = torch.randint(0, 256, (12, 6, 1, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    store = ClassStore(images, [str(i) for i in range(12)])
    return algo, EpisodeSampler(store, 3, 1, 2, 4, seed=0).sample()


def _rank(rank: int, port: int, kind: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                           world_size=2)
    torch.set_num_threads(1)
    algo, episode = _tiny(kind)
    procs = Processes(rank, 2, torch.device("cpu"))
    procs.prepare(algo)
    with warnings.catch_warnings():  # no deprecated collective of ours (issue 31)
        warnings.simplefilter("error", FutureWarning)
        loss, _ = algo.meta_loss(procs.shard(episode))
        loss.backward()
    procs.average_gradients(list(algo.parameters()), stop=rank == 1, bad=torch.tensor(False))
    out[rank] = ({n: p.grad.clone() for n, p in algo.named_parameters()},
                 procs.stop_agreed(False))
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["protonet", "maml"])
def test_averaged_gradients_equal_the_one_process_gradients(kind):
    torch.set_num_threads(1)
    algo, episode = _tiny(kind)
    loss, _ = algo.meta_loss(episode)
    loss.backward()
    reference = {n: p.grad for n, p in algo.named_parameters()}
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(_free_port(), kind, out), nprocs=2)
        ranks = dict(out)
    for grads, stop in ranks.values():
        assert stop, "a stop request on rank 1 did not reach every rank"
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], atol=1e-4, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- the real CLI under torchrun


def noise_folder(root: Path, classes: int = 20, images: int = 8) -> Path:
    """A folder data set of grey 28 px images: each class a fixed random pattern plus noise.

    Not glyphs: their white background makes exact ties in max-pooling, and which of two equal
    values wins is decided by float rounding, so a rounding-level difference between runs
    routes gradients elsewhere and the trajectories part after a few steps."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        pattern = torch.rand(28, 28, generator=g)
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(images):
            pixels = (0.7 * pattern + 0.3 * torch.rand(28, 28, generator=g)).mul(255).byte()
            Image.fromarray(pixels.numpy(), "L").save(root / f"c{c:02d}" / f"{i}.png")
    return root


@pytest.mark.parametrize("algo", [[], MAML_ARGS], ids=["protonet", "maml"])
def test_two_processes_follow_the_one_process_trajectory(tmp_path, algo):
    data = noise_folder(tmp_path / "data")
    args = ["train", *SMALL, "dataset=folder", f"dataset.root={data}", "dataset.image_size=28",
            "train.ways=3", "eval.ways=3", *algo, "train.steps=10", "train.val_every=5"]
    two = torchrun([*args, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    one = run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path,
                  env={"OMP_NUM_THREADS": "1"})
    code, err = finished(two)
    assert code == 0, err[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_weights(tmp_path / "two" / "last.pt", tmp_path / "one" / "last.pt")
    assert "data-parallel over 2 processes: 2 tasks each" in (tmp_path / "two" / "train.log"
                                                                ).read_text()
    assert len(list((tmp_path / "two").glob("events.out.tfevents.*"))) >= 1
    for folder in ("one", "two"):
        assert load_checkpoint(tmp_path / folder / "last.pt")["step"] == 10


def test_ctrl_c_on_one_rank_stops_all_and_resume_matches(tmp_path):
    args = ["train", *TINY, "train.steps=400", "train.val_every=400"]
    run = tmp_path / "run"
    job = torchrun([*args, f"hydra.run.dir={run}"], tmp_path)
    deadline = time.time() + 180
    while not list(run.glob("events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    workers = [p for p in psutil.Process(job.pid).children(recursive=True)
               if p.environ().get("RANK") == "1"]
    assert workers, "no rank-1 worker found"
    os.kill(workers[0].pid, signal.SIGINT)
    code, err = finished(job)
    assert code != 0
    assert "fewshot: error: interrupted at step" in err and "resume=" in err, err[-3000:]
    stopped = load_checkpoint(run / "last.pt")["step"]
    assert 0 < stopped < 400
    code, err = finished(torchrun(["train", f"resume={run / 'last.pt'}"], tmp_path))
    assert code == 0, err[-3000:]
    code, err = finished(torchrun([*args, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path))
    assert code == 0, err[-3000:]
    assert_same_weights(run / "last.pt", tmp_path / "straight" / "last.pt", atol=0)


def test_a_meta_batch_the_ranks_cannot_share_is_one_sentence(tmp_path):
    code, err = finished(torchrun(["train", *TINY, "train.meta_batch=3", "train.steps=2"],
                                  tmp_path))
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("fewshot: error:")]
    assert len(lines) == 1 and "train.meta_batch=3 cannot be split evenly over 2" in lines[0]
