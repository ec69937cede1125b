"""LADD students against their teacher on the same held-out prompts and seeds: FID, attribute accuracy, wall time.

    .venv/bin/python bench/distill.py --student models/denoiser_4step --n 500 [--threads 1] [--update-card]

The teacher samples with 28 Euler steps and CFG 4 (the shipped default, as `kinema eval t2i`); the student with
1, 2 and 4 steps over its trained times without CFG (`kinema.sampling.student`: deterministic Euler, which the
served pipeline runs with guidance 1; `--fresh-noise` adds rows re-noised with fresh noise, ADD style).
Prompt i of the test split is drawn from seed + i for every row. Wall time is timed apart from the quality pass,
on one batch of `--time-batch` prompts, repeated `--reps` times with the rows interleaved (median), end to end
(text encoder, sampling, decoder) and for the sampling loop alone. Goals (issue 7): 4-step FID <= 1.25x the
teacher's, >= 6x faster. Writes bench/results/distill.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Row:
    name: str
    model: str  # "teacher", "student" or "undistilled" (the teacher's weights sampled like a student)
    steps: int
    guidance: float
    fresh_noise: bool = False


class TimedDenoiser:
    """A Denoiser that adds the seconds spent in its sampling loop to `seconds`."""

    def __init__(self, inner) -> None:
        self.inner, self.latent_channels, self.seconds = inner, inner.latent_channels, 0.0

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def sample(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.inner.sample(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


class FreshNoiseStudent:
    """A student's sampling loop re-noising with fresh noise (`sample_student` with a generator), no CFG."""

    def __init__(self, model, sha256: str, seed: int) -> None:
        self.model, self.latent_channels, self._sha256, self.seed = model, model.params.in_channels, sha256, seed

    def fingerprint(self) -> str:
        return self._sha256

    @torch.inference_mode()
    def sample(self, noise, cond, uncond, spec, callback, **kwargs):
        from kinema.sampling.student import sample_student, student_schedule

        def velocity(x, t):
            return self.model(x, t, cond.tokens, cond.pooled, cond.mask)

        generator = torch.Generator().manual_seed(self.seed)
        return sample_student(velocity, noise, student_schedule(spec.steps), callback=callback, generator=generator)


def denoisers(rows: list[Row], models: Path, student_dir: Path, seed: int) -> dict[str, object]:
    from kinema.pipelines.local import LocalDenoiser
    from kinema.repository import load_denoiser

    teacher_model, teacher_sha = load_denoiser(models)
    teacher = LocalDenoiser(teacher_model, teacher_sha)
    student_model, student_sha = load_denoiser(models, student_dir / "1" / "mmdit.safetensors")
    out = {}
    for r in rows:
        if r.model in ("teacher", "undistilled"):
            out[r.name] = teacher
        elif r.fresh_noise:
            out[r.name] = FreshNoiseStudent(student_model, student_sha, seed)
        else:
            out[r.name] = LocalDenoiser(student_model, student_sha)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", type=Path, default=Path("models/denoiser_4step"), help="student model folder")
    ap.add_argument("--models", type=Path, default=Path("models"), help="repository with the teacher and autoencoder")
    ap.add_argument("--n", type=int, default=500, help="held-out prompts per row (FID and accuracy)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="student step counts")
    ap.add_argument("--teacher-steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=4.0, help="the teacher's CFG scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh-noise", action="store_true", help="also the students re-noised with fresh noise")
    ap.add_argument("--undistilled", type=int, nargs="*", default=[], metavar="STEPS",
                    help="also the teacher's weights at these steps without CFG (what LADD starts from)")  # fmt: skip
    ap.add_argument("--no-fid", action="store_true")
    ap.add_argument("--time-batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "distill")
    ap.add_argument("--update-card", action="store_true", help="add the results to the student's model card")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kinema.eval.generation import generate_images, held_out_prompts
    from kinema.eval.probe import Probe
    from kinema.eval.scoring import evaluate
    from kinema.pipelines.local import LocalAutoencoder
    from kinema.repository import load_autoencoder, load_text_encoder_default

    rows = [Row(f"teacher {args.teacher_steps} steps, CFG {args.guidance:g}", "teacher", args.teacher_steps,
                args.guidance)]  # fmt: skip
    rows += [Row(f"student {k} step{'s' * (k > 1)}", "student", k, 1.0) for k in args.steps]
    if args.fresh_noise:
        rows += [Row(f"student {k} steps, fresh noise", "student", k, 1.0, True) for k in args.steps if k > 1]
    rows += [
        Row(f"undistilled teacher {k} step{'s' * (k > 1)}, no CFG", "undistilled", k, 1.0) for k in args.undistilled
    ]
    dens = denoisers(rows, args.models, args.student, args.seed)
    encoder, autoencoder = load_text_encoder_default(), LocalAutoencoder(*load_autoencoder(args.models))
    prompts, truths = held_out_prompts(args.n)
    probe = Probe.from_file()
    if not args.no_fid:
        from kinema.eval.fid import fid_against, real_floor, reference_stats

        reference = reference_stats(split="test", n=2000)

    results = []
    for r in rows:
        t0 = time.perf_counter()
        images = generate_images(prompts, encoder, dens[r.name], autoencoder, steps=r.steps, guidance=r.guidance,
                                 seed=args.seed)  # fmt: skip
        gen_s = time.perf_counter() - t0
        acc = evaluate(probe, images, truths)
        res = {"row": r.name, "model": r.model, "steps": r.steps, "guidance": r.guidance, "fresh_noise": r.fresh_noise,
               "colour": acc["colour"], "colour_shape": acc["colour_shape"], "relation": acc["relation"],
               "count_exact": acc.get("count_exact"), "quality_pass_seconds": round(gen_s, 1)}  # fmt: skip
        if not args.no_fid:
            res["fid"] = fid_against(images, reference)
        results.append(res)
        print(json.dumps(res), flush=True)

    # Wall time apart, interleaved so that load from other processes falls on every row alike.
    batch = prompts[: args.time_batch]
    walls: dict[str, list[float]] = {r.name: [] for r in rows}
    loops: dict[str, list[float]] = {r.name: [] for r in rows}
    for rep in range(args.reps + 1):  # the first round warms up and is dropped
        for r in rows:
            timed = TimedDenoiser(dens[r.name])
            t0 = time.perf_counter()
            generate_images(batch, encoder, timed, autoencoder, steps=r.steps, guidance=r.guidance, seed=args.seed,
                            batch=len(batch))  # fmt: skip
            if rep:
                walls[r.name].append((time.perf_counter() - t0) / len(batch))
                loops[r.name].append(timed.seconds / len(batch))
    teacher_wall, teacher_loop = statistics.median(walls[rows[0].name]), statistics.median(loops[rows[0].name])
    for res in results:
        wall, loop = statistics.median(walls[res["row"]]), statistics.median(loops[res["row"]])
        res |= {"ms_per_image": round(1000 * wall, 2), "sampling_ms_per_image": round(1000 * loop, 2),
                "speedup": round(teacher_wall / wall, 2),
                "sampling_speedup": round(teacher_loop / loop, 2)}  # fmt: skip

    command = "python bench/distill.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    doc = summary(results, args, command)
    if not args.no_fid:
        doc["fid_real_renders_same_n"] = real_floor(args.n)
    write(args.out, doc)
    if args.update_card:
        update_card(args.student, doc)


def summary(results: list[dict], args: argparse.Namespace, command: str) -> dict:
    from kinema.eval.report import machine_info

    teacher = results[0]
    four = next((r for r in results if r["model"] == "student" and r["steps"] == 4 and not r["fresh_noise"]), None)
    goals = {}
    if four is not None:
        if "fid" in four:
            ratio = four["fid"] / teacher["fid"]
            goals["fid_ratio_4_steps"] = {"value": round(ratio, 3), "goal": "<= 1.25", "met": ratio <= 1.25}
        goals["speedup_4_steps"] = {"value": four["speedup"], "goal": ">= 6", "met": four["speedup"] >= 6}
    return {"results": results, "goals": goals, "n": args.n, "seed": args.seed, "split": "test",
            "fid_reference": "2000 test-split renders", "time_batch": args.time_batch, "reps": args.reps,
            "student": str(args.student), "command": command, "machine": machine_info(),
            "timestamp_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip


def write(stem: Path, doc: dict) -> None:
    from kinema.eval.report import markdown_table

    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    rows = [{**r, "fid": round(r["fid"], 2) if "fid" in r else None} for r in doc["results"]]
    columns = ["row", "fid", "colour", "colour_shape", "relation", "ms_per_image", "speedup", "sampling_ms_per_image",
               "sampling_speedup"]  # fmt: skip
    goals = "\n".join(f"- {k}: {v['value']} (goal {v['goal']}): {'met' if v['met'] else 'NOT met'}"
                      for k, v in doc["goals"].items())  # fmt: skip
    floor = doc.get("fid_real_renders_same_n")
    md = (f"# LADD students against the teacher\n\n{markdown_table(rows, columns)}\n"
          f"n = {doc['n']} held-out test prompts per row, prompt i drawn from seed {doc['seed']} + i in every row; "
          f"FID against {doc['fid_reference']}"
          + (f" (the same n of real renders scores {floor:.2f})" if floor is not None else "")
          + f". Times: median of {doc['reps']} interleaved batches of {doc['time_batch']} prompts, per image; "
          "`ms_per_image` end to end (text encoder, sampling, decoder), `sampling_*` the denoiser loop alone.\n\n"
          f"Goals:\n\n{goals}\n\nCommand:\n\n```\n{doc['command']}\n```\n\nUTC: {doc['timestamp_utc']}\n\n"
          "Machine: " + ", ".join(f"{k} {v}" for k, v in doc["machine"].items()) + "\n")  # fmt: skip
    stem.with_suffix(".md").write_text(md)
    print(stem.with_suffix(".md"))


def update_card(student_dir: Path, doc: dict) -> None:
    """Rewrite the student's README with the card in its weights' metadata plus these results (weights untouched)."""
    from kinema.nn.checkpoint import read_metadata
    from kinema.train.card import write_model_card

    weights = student_dir / "1" / "mmdit.safetensors"
    card = dict(read_metadata(weights)["card"])
    card["bench"] = {r["row"]: {k: (round(r[k], 4) if isinstance(r[k], float) else r[k])
                                for k in ("fid", "colour_shape", "relation", "ms_per_image", "speedup") if k in r}
                     for r in doc["results"]}  # fmt: skip
    card["bench_command"] = doc["command"]
    readme = (student_dir / "README.md").read_text()
    command = readme.split("```\n", 2)[1].strip() if "```\n" in readme else ""  # the card's first code block
    notes = (f"Results against the teacher (n = {doc['n']}): `bench/results/distill.md`. Sample it with the "
             "plain Euler sampler over its trained times and no CFG (guidance 1, steps 1, 2 or 4).")  # fmt: skip
    write_model_card(student_dir, readme.splitlines()[0].lstrip("# "), command, card, notes)


if __name__ == "__main__":
    main()
