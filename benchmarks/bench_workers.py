"""Benchmark of more processes on one machine: stage 1 over workers, and two runs side by side.

Run ``python benchmarks/bench_workers.py`` (about 6 minutes on 2 cores; ``--quick``: section 1 at
the smoke scale, about 3 minutes; section 2 alone, ``--only side_by_side``, about 3 minutes). Nothing is hard-coded: every number comes from this run, and the machine
should be otherwise idle (both sections time whole processes).

1. **Stage 1, ``--workers 2`` against ``--workers 1``.** The packaged digits config (or its smoke
   scale with ``--quick``), methods single IMP and RTL, one torch thread per process: the wall
   time of stage 1 (the single-mask IMP run and the K per-context IMP runs, spawn and start-up of
   the workers included) in fresh run directories, 1 worker then 2 workers; the rounds on disk are
   compared bit for bit. Target: <= 0.6x. The plan's expected speed-up (total steps / the most
   loaded worker's) is printed beside it.
2. **Two runs at once against one alone.** ``rtl demo --scale smoke`` as a subprocess with the
   library's default thread settings (no ``OMP_NUM_THREADS``: the machine-wide thread budget of
   ``routing_lottery.threads`` decides): alone, then two started together, then two with the second
   started a quarter of the solo time later (the first must give up a thread as it runs), then
   alone again; the slower of each pair against the mean of the two solo times, and each run's
   ``threads:`` log lines. Target: <= 2.2x (two runs on two cores cannot beat 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from routing_lottery.cli import packaged_config
from routing_lottery.config import load_config
from routing_lottery.run import make_runner
from routing_lottery.run.workers import balance, run_stage_one, stage_one_costs

RESULTS: list[dict[str, Any]] = []


def report(name: str, ratio: float, target: float | None, **detail: Any) -> None:
    verdict = "" if target is None else ("PASS" if ratio <= target else "FAIL")
    target_text = "reference" if target is None else f"target <= {target:.2f}x"
    print(f"  {name}: {ratio:.2f}x ({target_text})  {verdict}", flush=True)
    RESULTS.append({"name": name, "ratio": round(ratio, 4), "target": target, **detail})


def stage_one_seconds(config: Any, out: Path) -> float:
    """Wall time of stage 1 of ``config`` in a fresh directory ``out`` (workers per ``config.workers``)."""
    experiment = make_runner(config, out)
    start = time.perf_counter()
    with experiment.run.locked():
        if config.workers > 1:
            run_stage_one(experiment, config.workers)
        experiment.single_rounds()
        experiment.context_masks()
    return time.perf_counter() - start


def rounds(out: Path) -> dict[str, dict]:
    return {str(p.relative_to(out)): load_file(p) for p in sorted((out / "imp").rglob("*.safetensors"))}


def bench_stage_one(quick: bool) -> None:
    print("\n[1] stage 1 of the digits config: 2 workers vs 1 (one thread each)", flush=True)
    overrides = {"methods": ["single_imp", "rtl"], "threads": 1}
    config = load_config(packaged_config("digits"), "smoke" if quick else None, overrides)
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        plan = balance(stage_one_costs(make_runner(config, Path(one))), 2)
        alone = stage_one_seconds(config, Path(one))
        paired = stage_one_seconds(config.replace(workers=2), Path(two))
        a, b = rounds(Path(one)), rounds(Path(two))
        same = a.keys() == b.keys() and all(all((x[k] == b[f][k]).all() for k in x) for f, x in a.items())
    print(f"  1 worker {alone:.1f} s, 2 workers {paired:.1f} s; {len(a)} rounds on disk, bit-identical: {same}; "
          f"plan: worker steps {list(plan.steps)}, expected speed-up {plan.speedup:.2f}x")
    report("stage 1, 2 workers / 1 worker", paired / alone, 0.6, one_worker_s=alone, two_workers_s=paired,
           identical=same, expected_speedup=plan.speedup)


def bench_side_by_side(quick: bool) -> None:
    print("\n[2] two `rtl demo --scale smoke` at once vs one alone (default thread settings)", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}

    with tempfile.TemporaryDirectory() as tmp:

        def launch(name: str, delay: float = 0.0) -> tuple[str, subprocess.Popen, float]:
            time.sleep(delay)
            with (Path(tmp) / f"{name}.log").open("w") as log:  # the child holds its own copy of the handle
                process = subprocess.Popen([sys.executable, "-m", "routing_lottery.cli", "demo", "--scale", "smoke",
                                            "--out", str(Path(tmp) / name)], stdout=log, stderr=subprocess.STDOUT,
                                           env=env)
            return name, process, time.perf_counter()

        def finish(*started: tuple[str, subprocess.Popen, float]) -> list[float]:
            seconds = []
            for name, process, start in started:
                code = process.wait()
                seconds.append(time.perf_counter() - start)
                log = (Path(tmp) / f"{name}.log").read_text()
                if code != 0:
                    raise RuntimeError(f"{name} failed:\n{log[-2000:]}")
                budget = [line.split("] ", 1)[-1] for line in log.splitlines() if "threads:" in line]
                print(f"    {name}: {seconds[-1]:.1f} s; {'; '.join(budget)}", flush=True)
            return seconds

        alone = finish(launch("solo"))[0]
        together = finish(launch("pair0"), launch("pair1"))
        # the second starts once the first is well under way: the first must give up a thread as it goes
        staggered = finish(launch("staggered0"), launch("staggered1", delay=alone / 4))
        again = finish(launch("solo2"))[0]
    solo = (alone + again) / 2
    print(f"  alone {alone:.1f} s and {again:.1f} s (mean {solo:.1f} s); started together {together[0]:.1f} s and "
          f"{together[1]:.1f} s; the second {alone / 4:.1f} s later {staggered[0]:.1f} s and {staggered[1]:.1f} s")
    report("two runs started together / alone (slower)", max(together) / solo, 2.2, alone_s=[alone, again],
           side_by_side_s=together)
    report("two runs, second started later / alone (slower)", max(staggered) / solo, 2.2,
           staggered_s=staggered, delay_s=alone / 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke scale in section 1 (about a minute)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--only", nargs="*", choices=["stage1", "side_by_side"], help="run only these sections")
    args = parser.parse_args(argv)
    print(f"routing-lottery worker benchmarks ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs")
    for name, fn in (("stage1", bench_stage_one), ("side_by_side", bench_side_by_side)):
        if args.only is None or name in args.only:
            fn(args.quick)
    print("\nsummary")
    for r in RESULTS:
        target = "-" if r["target"] is None else f"<= {r['target']:.2f}x"
        verdict = "ref" if r["target"] is None else ("PASS" if r["ratio"] <= r["target"] else "FAIL")
        print(f"  {r['name']:<55} {r['ratio']:>6.2f}x  {target:>9}  {verdict}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(RESULTS, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
