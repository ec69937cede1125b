"""Self-Flow against plain rectified flow, trained side by side: validation loss curve, FID, attribute accuracy.

    .venv/bin/python bench/self_flow.py runs/selfflow/plain runs/selfflow/self-flow --n 256 --score-every 2

Each run is a `kinema.train.flow` folder with EMA snapshots (`--snapshot-every`), the two trained from the same
seed on the same batches (the Self-Flow draws come after the plain run's). Every snapshot gets the validation
flow-matching loss (SD3 protocol, `kinema eval flow-loss`: val split, fixed t grid and noise); every
`--score-every`-th one and the last are sampled (test-split prompts, seeds, steps and CFG the same for both) for
FID against the cached 2,000-render reference and the probe's colour+shape and relation accuracy.

Compute is not equal per step: Self-Flow adds the EMA teacher's forward pass and per-token modulations. The cost
of a step of each is timed here, alone, on the same data (`--time-steps`), and the plain run's snapshot nearest
to the Self-Flow run's last step times that ratio is its equal-compute point. Writes bench/results/self_flow.*.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def snapshots(run: Path) -> list[tuple[Path, dict]]:
    from kinema.nn.checkpoint import read_metadata

    found = [(p, read_metadata(p)["counters"]) for p in (run / "snapshots").glob("ema-*.safetensors")]
    return sorted(found, key=lambda pc: pc[1]["step"])


def step_seconds(run: Path, steps: int, models: Path) -> float:
    """Seconds per training step of the run's config, timed alone over `steps` steps on its cached data."""
    from kinema.train import flow
    from kinema.train.self_flow import SelfFlowConfig

    raw = json.loads((run / "config.json").read_text())
    sf = raw.pop("self_flow")
    cfg = flow.FlowTrainConfig(**{**raw, "steps": steps, "checkpoint_every": 10**9, "snapshot_every": 10**9},
                               self_flow=SelfFlowConfig(**sf) if sf else None)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        flow.train(cfg, Path(tmp), models)
        rows = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
    # From the first logged row on: the first steps pay one-off allocations.
    first, last = rows[0], rows[-1]
    return (last["seconds"] - first["seconds"]) / (last["step"] - first["step"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("plain", type=Path, help="the plain rectified-flow run")
    ap.add_argument("self_flow", type=Path, help="the Self-Flow run")
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--n", type=int, default=256, help="test prompts sampled per scored snapshot")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps (Euler, CFG --guidance)")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--val-n", type=int, default=256, help="val latents of the validation loss")
    ap.add_argument("--score-every", type=int, default=2, help="sample every k-th snapshot (and the last)")
    ap.add_argument("--time-steps", type=int, default=100, help="steps timed per config (0 = skip)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "self_flow")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kinema.eval.generation import evaluate_text_to_image, validation_flow_loss, validation_set
    from kinema.pipelines.local import LocalAutoencoder, LocalDenoiser
    from kinema.repository import load_autoencoder, load_denoiser, load_text_encoder_default

    text_encoder = load_text_encoder_default()
    autoencoder, ae_sha = load_autoencoder(args.models)
    local_ae = LocalAutoencoder(autoencoder, ae_sha)
    val_data = validation_set(autoencoder, text_encoder, args.val_n)  # encoded once, scored by every snapshot
    runs = {"plain": args.plain, "self_flow": args.self_flow}
    curves: dict[str, list[dict]] = {}
    fid_floor = None
    settings = {"n": args.n, "steps": args.steps, "guidance": args.guidance, "val_n": args.val_n}
    for arm, run in runs.items():
        snaps = snapshots(run)
        curves[arm] = []
        # Points already measured with these settings are read back (a rerun scores only new snapshots).
        cache = run / "self_flow_bench.jsonl"
        done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
        for i, (snap, counters) in enumerate(snaps):
            sample = i % args.score_every == args.score_every - 1 or i == len(snaps) - 1
            hit = [d["point"] for d in done if d["snapshot"] == snap.name and d["settings"] == settings
                   and (not sample or "fid" in d["point"])]  # fmt: skip
            if hit:
                curves[arm].append(hit[-1])
                fid_floor = hit[-1].get("fid_floor", fid_floor)
                continue
            model, sha = load_denoiser(args.models, snap)
            with torch.inference_mode():
                val = validation_flow_loss(model, autoencoder, text_encoder, data=val_data)
            point = {"step": counters["step"], "samples": counters["samples"],
                     "train_minutes": round(counters["seconds"] / 60, 1),
                     "val_loss": round(val["loss"], 5)}  # fmt: skip
            if sample:
                r = evaluate_text_to_image(text_encoder, LocalDenoiser(model, sha), local_ae, n=args.n,
                                           steps=args.steps, guidance=args.guidance)  # fmt: skip
                point |= {"fid": round(r["fid"], 2), "colour_shape": round(r["accuracy"]["colour_shape"], 3),
                          "relation": round(r["accuracy"]["relation"], 3)}  # fmt: skip
                fid_floor = point["fid_floor"] = r["fid_real_renders_same_n"]
            curves[arm].append(point)
            with cache.open("a") as f:
                f.write(json.dumps({"snapshot": snap.name, "settings": settings, "point": point}) + "\n")
            print(json.dumps({"arm": arm, **point}), flush=True)

    configs = {arm: json.loads((run / "config.json").read_text()) for arm, run in runs.items()}
    result: dict = {"curves": curves, "fid_real_renders_same_n": fid_floor, "config": configs}
    last_sf = curves["self_flow"][-1]
    scored_plain = [p for p in curves["plain"] if "fid" in p]
    equal_steps = min(scored_plain, key=lambda p: abs(p["step"] - last_sf["step"]))
    result["equal_steps"] = {"self_flow": last_sf, "plain": equal_steps}
    if args.time_steps:
        cost = {arm: step_seconds(run, args.time_steps, args.models) for arm, run in runs.items()}
        ratio = cost["self_flow"] / cost["plain"]
        target = last_sf["step"] * ratio
        result["step_seconds"] = {arm: round(s, 4) for arm, s in cost.items()} | {"ratio": round(ratio, 3)}
        result["equal_compute"] = {"self_flow": last_sf, "plain_step_target": round(target),
                                   "plain": min(scored_plain, key=lambda p: abs(p["step"] - target))}  # fmt: skip

    command = "python bench/self_flow.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"results": result, "command": command, "timestamp_utc": now}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result, command, now))
    print(args.out.with_suffix(".md"))


def markdown(result: dict, command: str, now: str) -> str:
    cols = ["step", "samples", "train_minutes", "val_loss", "fid", "colour_shape", "relation"]
    lines = ["# Self-Flow against plain rectified flow (same seed, same batches)", ""]
    for arm, curve in result["curves"].items():
        lines += [f"## {arm}", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(str(p.get(c, "")) for c in cols) + " |" for p in curve]
        lines.append("")
    if "step_seconds" in result:
        s = result["step_seconds"]
        lines.append(f"Seconds per step, timed alone: plain {s['plain']}, Self-Flow {s['self_flow']} "
                     f"(ratio {s['ratio']}).")  # fmt: skip
    lines += ["", f"FID floor (the same n of real renders): {result['fid_real_renders_same_n']}", "",
              f"Command: `{command}`", "", f"UTC: {now}", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
