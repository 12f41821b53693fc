"""Peak memory of one meta-step, per algorithm and per number of inner steps.

Each figure is measured in a fresh subprocess, so nothing another measurement
allocated or cached counts:

* CPU: the process's resident-set high-water mark (``VmHWM``), reset just
  before the meta-step (``/proc/self/clear_refs``) after a warm-up step on
  one task and ``malloc_trim``; reported as the rise over the resident set
  before the step. Where the reset is not allowed, ``ru_maxrss`` minus the
  resident set before the step (no warm-up), which over-counts one-time
  initialisation.
* CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the step.

Image families are measured on random images of the configured shape
(``data.ways`` x (``shots`` + ``queries``), 1x28x28), so no task store is
needed; memory does not depend on pixel values.

``python -m distmaml.bench_memory`` prints the table of second-order MAML's
memory against inner steps, with and without recomputation, on the Omniglot
conv4 shape, and one row per algorithm. ``distmaml bench`` can call
``measure_peak_memory`` per row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from distmaml.config import Config, config_from_dict

_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _tasks(config: Config, count: int, dtype: Any, device: Any) -> Any:
    import torch

    from distmaml.engine.shard import build_family
    from distmaml.typing import TaskBatch

    if config.data.family == "sinusoid":
        return build_family(config).sample("train", 0, range(count)).to(device, dtype)
    d = config.data
    g = torch.Generator().manual_seed(config.seed)
    n_s, n_q = d.ways * d.shots, d.ways * d.queries
    x = torch.rand(count, n_s + n_q, 1, 28, 28, generator=g)
    y_s = torch.arange(d.ways).repeat_interleave(d.shots).expand(count, -1)
    y_q = torch.arange(d.ways).repeat_interleave(d.queries).expand(count, -1)
    return TaskBatch(x[:, :n_s], y_s.contiguous(), x[:, n_s:], y_q.contiguous()).to(device, dtype)


def _child(config_dict: dict[str, Any], device_name: str) -> dict[str, Any]:
    """Runs in the subprocess: one warm-up step on one task, then the measured meta-step."""
    import ctypes
    import time

    import torch

    from distmaml.core import meta_grad
    from distmaml.engine.shard import build_algorithm, build_network, init_meta_params

    torch.set_num_threads(1)
    config = config_from_dict(config_dict)
    device = torch.device(device_name)
    model = build_network(config).to(device)
    algorithm = build_algorithm(config)
    params = {k: v.to(device) for k, v in init_meta_params(config, model).items()}
    dtype = getattr(torch, config.precision)
    batch = _tasks(config, config.meta.batch_size, dtype, device)

    def step() -> None:
        s = meta_grad(model, params, batch, algorithm, batching=config.batching)
        float(s.loss)  # waits for the device

    if device.type == "cuda":
        meta_grad(model, params, batch.slice(0, 1), algorithm, batching=config.batching)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "seconds": seconds, "method": "cuda"}
    try:
        meta_grad(model, params, batch.slice(0, 1), algorithm, batching=config.batching)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (no reset)"
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"peak_bytes": max(peak - base, 0) * 1024, "seconds": seconds, "method": method}


def measure_peak_memory(config: Config, device: str = "cpu", timeout: float = 1800) -> dict[str, Any]:
    """Peak memory of one meta-step of ``config`` (``meta.batch_size`` tasks), measured in a subprocess.

    Returns ``{"peak_bytes": int, "seconds": float, "method": str}``; ``seconds``
    is the measured step's wall time (one thread).

    Example:
        >>> cfg = load_config("sinusoid", ["inner.steps=4"])
        >>> measure_peak_memory(cfg)["peak_bytes"]
    """
    payload = json.dumps({"config": config.to_dict(), "device": device})
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "distmaml.bench_memory", "--child"],
        input=payload,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {proc.stderr.strip().splitlines()[-1:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


OMNIGLOT_SHAPE = [
    "data.family=store",
    "data.ways=5",
    "data.shots=1",
    "data.queries=15",
    "model.name=conv4",
    "model.filters=64",
    "tracking.enabled=false",
    "batching=loop",
]


def memory_rows(batch_size: int, steps: list[int], algo_steps: int) -> list[dict[str, Any]]:
    """The table's rows: MAML against inner steps (plain and recomputed), then every algorithm."""
    from distmaml.config import ALGORITHMS, load_config

    base = [*OMNIGLOT_SHAPE, f"meta.batch_size={batch_size}"]
    plan = [("maml", s, rc) for s in steps for rc in (False, True)]
    plan += [(a, algo_steps, False) for a in ALGORITHMS]
    rows = []
    for algo, n, rc in plan:
        cfg = load_config("sinusoid", [*base, f"algorithm={algo}", f"inner.steps={n}", f"inner.recompute={rc}"])
        figure = measure_peak_memory(cfg)
        rows.append({"algorithm": algo, "inner_steps": n, "recompute": rc, **figure})
        print(
            f"{algo:8s} steps {n:2d} recompute {rc!s:5s}  peak {figure['peak_bytes'] / 2**20:8.1f} MiB  "
            f"{figure['seconds']:7.2f} s/meta-step",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distmaml.bench_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=2, help="tasks per measured meta-step (default 2)")
    parser.add_argument("--steps", default="1,2,4,8", help="inner steps for the MAML rows")
    parser.add_argument("--algo-steps", type=int, default=5, help="inner steps for the per-algorithm rows")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.child:
        request = json.loads(sys.stdin.read())
        print(json.dumps(_child(request["config"], request["device"])))
        return 0
    rows = memory_rows(args.tasks, [int(s) for s in args.steps.split(",")], args.algo_steps)
    if args.json:
        from pathlib import Path

        from distmaml.checkpoint import write_json

        write_json(Path(args.json), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
