"""Coverage sweep: does Chase work on every torchvision classifier, detector and segmenter and on common
timm families?

For every model of ``benchmarks/coverage_models.yaml`` (all of torchvision's classification models, the
timm models listed there, and the torchvision detectors and segmenters listed there: detectors train
through their loss dicts on random boxes), with ``prune_skip`` False and True,
``chase.check.check_model`` builds it, trains a few steps on random data with channel events at S_c 0.5
and physical removal, exports the slim model, reloads it into a freshly built model with
``chase.load_slim``, and compares the outputs with the trained model's in eval mode. Each run happens in
its own process, with a time limit and a memory limit, so a model that hangs or exhausts memory is
recorded as such and the sweep goes on.

Results: ``benchmarks/results/coverage.{json,md}`` (per model and option: status, channel groups,
prunable channels, parameter and MAC ratios of the slim model, seconds, error). A status is ``pass``,
``refused`` (a clear ValueError from the library saying what is not supported), ``crash`` (anything
else, a bug), ``timeout``, ``oom`` or ``skip`` (with the reason from the YAML). Finished runs are kept
in ``--state`` (JSON lines) and not repeated, so a killed sweep continues where it stopped.

    python benchmarks/coverage.py                    # everything (an hour or more on 2 cores)
    python benchmarks/coverage.py --only resnet18,timm:resnet18d --out /tmp/cov
    python benchmarks/coverage.py --only detection:,segmentation: --name coverage_tasks
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any

import yaml

import common

HERE = pathlib.Path(__file__).resolve().parent
LIST = HERE / "coverage_models.yaml"
TIMM = "timm:"
#: prefixes of torchvision's detection and segmentation models in the sweep (issue 27).
DETECTION, SEGMENTATION = "detection:", "segmentation:"
TASKS = (DETECTION, SEGMENTATION)


def load_list(path: pathlib.Path = LIST) -> dict[str, Any]:
    """The YAML model list (one owner for the sweep and the CI test)."""
    return yaml.safe_load(path.read_text())


def entries(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(model name, options) for every swept model: torchvision's classifiers, then the timm list."""
    import torchvision

    default = {"input": spec.get("input", 64), "kwargs": {}}
    tv = spec.get("torchvision") or {}
    out = [
        (n, {**default, **tv.get(n, {})})
        for n in sorted(torchvision.models.list_models(module=torchvision.models))
    ]
    out += [(TIMM + n, {**default, **(o or {})}) for n, o in (spec.get("timm") or {}).items()]
    for prefix in TASKS:
        task = spec.get(prefix[:-1]) or {}
        out += [(prefix + n, {**default, **(o or {})}) for n, o in task.items()]
    return out


def build_fn(name: str, kwargs: dict[str, Any]):
    """A zero-argument builder of a freshly initialised model (no pretrained weights)."""
    from chase.models import get_model

    if name.startswith(TASKS):  # a torchvision detector or segmenter: no weights, backbone's either
        import torchvision

        task_name = name.partition(":")[2]
        return lambda: torchvision.models.get_model(
            task_name, weights=None, weights_backbone=None, num_classes=3, **kwargs
        )
    return lambda: get_model(name, num_classes=10, **kwargs)


def detection_loss(model: Any, inputs: Any) -> Any:
    """One training step's loss of a torchvision detector on ``inputs`` (``([image, ...],)``): the sum of
    its loss dict for two random boxes per image (with masks for Mask R-CNN, keypoints for Keypoint
    R-CNN), the same boxes for the same images."""
    import torch

    (images,) = inputs
    gen = torch.Generator().manual_seed(int(sum(im.numel() for im in images)))
    targets = []
    for im in images:
        h, w = im.shape[1:]
        corner = torch.rand(2, 2, generator=gen) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([corner, corner + 4 + torch.rand(2, 2, generator=gen) * min(h, w) / 3], 1)
        t = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        t["masks"] = masks
        xy = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2
        t["keypoints"] = torch.cat([xy.expand(2, 17, 2), torch.ones(2, 17, 1)], 2)
        targets.append(t)
    return sum(model(list(images), targets).values())


def example_inputs(name: str, size: int) -> Any:
    """What a model of the sweep is traced and trained on: two images (a detector: a list of two of
    different sizes, as detection batches are)."""
    import torch

    if name.startswith(DETECTION):
        return ([torch.randn(3, size, size + 16), torch.randn(3, size + 8, size)],)
    return torch.randn(2, 3, size, size)


def run_one(name: str, options: dict[str, Any], prune_skip: bool, steps: int = 8) -> dict[str, Any]:
    """One check in THIS process (the child's body)."""
    import torch

    from chase.check import CHECK_CHANNELS, check_model, output_loss

    torch.set_num_threads(int(os.environ.get("COVERAGE_THREADS", "2")))
    report = check_model(
        build_fn(name, options.get("kwargs") or {}),
        example_inputs(name, int(options["input"])),
        CHECK_CHANNELS.replace(prune_skip=prune_skip),
        loss=detection_loss if name.startswith(DETECTION) else output_loss,
        steps=steps,
    )
    return report.to_dict()


def run_isolated(
    name: str, options: dict[str, Any], prune_skip: bool, timeout: float, memory_gb: float
) -> dict[str, Any]:
    """Run :func:`run_one` in a child process with a time and an address-space limit."""
    cmd = [
        sys.executable,
        str(pathlib.Path(__file__).resolve()),
        "--child",
        name,
        "--options",
        json.dumps(options),
    ]
    cmd += ["--prune-skip"] if prune_skip else []
    limit = int(memory_gb * (1 << 30))

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limits, cwd=HERE
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout:.0f} s", "seconds_total": timeout}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    oom = (
        "MemoryError" in proc.stderr or "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
    )
    return {
        "status": "oom" if oom else "crash",
        "error": " | ".join(tail) or f"exit status {proc.returncode}",
        "error_type": "child process",
        "seconds_total": time.perf_counter() - t,
    }


def markdown(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    m = payload["machine"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    done = [r for r in rows if r["status"] != "skip"]
    passed = sum(r["status"] == "pass" for r in done)
    tally = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    lines = [
        "# Coverage sweep: Chase on torchvision and timm models",
        "",
        f"{m['cpu']} ({m['torch_threads']} threads per run), torch {m['torch']}, {m['date']}. Every "
        "model with prune_skip off and on: build, 8 steps on random data with channel events at S_c 0.5 "
        "and physical removal, export, reload with `chase.load_slim` into a fresh model, outputs compared "
        "with the trained model's in eval mode (relative tolerance 1e-4). "
        f"**{passed} of {len(done)} runs pass** ({tally}).",
        "",
        "| model | input | prune_skip | status | groups (prunable) | prunable channels | params slim/dense | "
        "MACs slim/dense | seconds | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r["status"] == "pass"
        params = f"{r['params_slim'] / r['params_dense']:.3f}" if ok and r.get("params_dense") else ""
        # a detector's MACs count its RoI heads once per box it detects: not comparable between two models
        per_box = r["model"].startswith(DETECTION)
        macs = f"{r['macs_slim'] / r['macs_dense']:.3f}" if ok and r.get("macs_dense") and not per_box else ""
        groups = f"{r.get('groups', '')} ({r.get('prunable_groups', '')})" if r.get("groups") else ""
        err = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:160]
        lines.append(
            f"| {r['model']} | {r.get('input', '')} | {r['prune_skip']} | {r['status']} | {groups} | "
            f"{r.get('prunable_channels', '')} | {params} | {macs} | {r.get('seconds_total', 0):.0f} | "
            f"{err} |"
        )
    if any(r["model"].startswith(DETECTION) for r in rows):
        lines += [
            "",
            "Detectors' MACs are left out: an eval-mode forward runs the RoI heads once per detected box, "
            "and an untrained model and its slim copy detect different numbers of boxes.",
        ]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated model names, or prefixes such as detection:,segmentation: (default: all)",
    )
    ap.add_argument("--out", default=str(common.RESULTS))
    ap.add_argument("--name", default="coverage", help="result files' name (NAME.json, NAME.md)")
    ap.add_argument(
        "--state", default=None, help="JSON-lines file of finished runs (default OUT/coverage_state.jsonl)"
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    # ViT-L peaks at 15.3 GB resident in the check (more in address space): 16 stopped it
    ap.add_argument("--memory-gb", type=float, default=22.0, help="address-space limit per run")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--prune-skip", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        print(json.dumps(run_one(args.child, json.loads(args.options), args.prune_skip)), flush=True)
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = pathlib.Path(args.state) if args.state else out / f"{args.name}_state.jsonl"
    done = {}
    if state.exists():
        for line in state.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["prune_skip"])] = r
    wanted = set(filter(None, args.only.split(",")))
    prefixes = tuple(w for w in wanted if w.endswith(":"))  # detection: -> every detector
    todo = [(n, o) for n, o in entries(load_list()) if not wanted or n in wanted or n.startswith(prefixes)]
    payload: dict[str, Any] = {
        # each run's threads are its child's (COVERAGE_THREADS), not this process's
        "machine": {**common.machine("cpu"), "torch_threads": int(os.environ.get("COVERAGE_THREADS", "2"))},
        "list": str(LIST.relative_to(HERE.parent)),
        "rows": [],
    }
    for name, options in todo:
        for skip in (False, True):
            key = (name, skip)
            if key not in done:
                if options.get("skip"):
                    row = {"status": "skip", "error": options["skip"]}
                else:
                    row = run_isolated(name, options, skip, args.timeout, args.memory_gb)
                row.update(model=name, prune_skip=skip, input=options["input"])
                with state.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done[key] = row
                print(f"{name} prune_skip={skip}: {row['status']} {row.get('error', '')[:120]}", flush=True)
            payload["rows"].append(done[key])
        common.write(args.name, payload, markdown(payload), folder=out)
    common.write(args.name, payload, markdown(payload), folder=out)
    print(markdown(payload).split("\n\n")[1])


if __name__ == "__main__":
    main()
