"""What verifying a decoded cache by content costs at load: ``ClassStore.load`` (memory-mapped,
then the blake2b checksum over every byte) against the same load without the check, on the
Omniglot 28 px caches.

    python scripts/bench_cache_check.py [--root $FEWSHOT_DATA/omniglot] [--runs 7]

The caches are built first when absent (in ``$FEWSHOT_CACHE`` when set). Each run loads each
cache both ways in turn, the file warm in the page cache (as at every start after the first):
"unchecked" is torch.load with mmap alone (no page read yet), "checked" is ``ClassStore.load``,
which reads every byte for the checksum; "checksum" times the checksum alone, and the last
columns hash the same bytes with other functions, for the choice of sha1. Figures are medians
over the runs; the ratio is the median of the per-run ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from pathlib import Path

import torch

from fewshot_cli.data.omniglot import FULL, Omniglot
from fewshot_cli.data.store import ClassStore, cache_file, checksum

HASHES = ("sha1", "blake2b", "sha256")


def unchecked(path: Path) -> float:
    start = time.perf_counter()
    torch.load(path, mmap=True, weights_only=True)
    return time.perf_counter() - start


def checksum_only(path: Path) -> float:
    payload = torch.load(path, mmap=True, weights_only=True)
    start = time.perf_counter()
    checksum(payload)
    return time.perf_counter() - start


def hashing(path: Path, name: str) -> float:
    """Seconds to hash the images' bytes with ``name`` (hashlib)."""
    images = torch.load(path, mmap=True, weights_only=True)["images"]
    start = time.perf_counter()
    hashlib.new(name, memoryview(images.numpy()).cast("B")).digest()
    return time.perf_counter() - start


def checked(path: Path) -> float:
    start = time.perf_counter()
    ClassStore.load(path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(os.environ.get("FEWSHOT_DATA", "~/.cache/"
                                                                  "fewshot")) / "omniglot"))
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    data = Omniglot(args.root, split="lake", image_size=28, download=False)
    rows = []
    for name in FULL:
        data._store(name)  # build the cache once
        source = data._source(name)
        path = cache_file(data.root, {"reader": "omniglot", "source": name, "image_size": 28,
                                      "resample": "lanczos", "fingerprint": source.fingerprint()})
        payload = torch.load(path, mmap=True, weights_only=True)
        assert payload["checksum"] == checksum(payload), f"{path} is not the cache in use"
        times = [(unchecked(path), checked(path), checksum_only(path),
                  *(hashing(path, h) for h in HASHES)) for _ in range(args.runs)]
        plain, check, alone, *others = (statistics.median(t[i] for t in times)
                                        for i in range(3 + len(HASHES)))
        ratio = statistics.median(t[1] / t[0] for t in times)
        size = path.stat().st_size / 2**20
        rows.append((name, size, plain, check, alone, ratio, others))
    print(f"median of {args.runs} runs, warm page cache; MiB/s of hashing the images alone")
    print("| cache (28 px) | MiB | unchecked load (ms) | checked load (ms) | checksum (ms) "
          "| checked / unchecked | " + " | ".join(f"{h} MiB/s" for h in HASHES) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(HASHES))
    for name, size, plain, check, alone, ratio, others in rows:
        speeds = " | ".join(f"{size / t:.0f}" for t in others)
        print(f"| {name} | {size:.1f} | {plain * 1e3:.1f} | {check * 1e3:.1f} | {alone * 1e3:.1f} "
              f"| {ratio:.1f}x | {speeds} |")


if __name__ == "__main__":
    main()
