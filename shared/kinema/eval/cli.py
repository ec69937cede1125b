"""`kinema eval ...`: quality of the shipped (or given) models, written as JSON + markdown."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

RESULTS = Path("bench/results")


def _command() -> str:
    return "kinema " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def cmd_t2i(args: argparse.Namespace) -> None:
    from kinema.eval.generation import evaluate_text_to_image
    from kinema.eval.report import write_results
    from kinema.pipelines.local import LocalAutoencoder, LocalDenoiser
    from kinema.repository import default_models_dir, load_autoencoder, load_denoiser, load_text_encoder_default

    models = args.models or default_models_dir()
    text_encoder, autoencoder = load_text_encoder_default(), LocalAutoencoder(*load_autoencoder(models))
    denoiser = LocalDenoiser(*load_denoiser(models, args.denoiser))
    result = evaluate_text_to_image(text_encoder, denoiser, autoencoder, n=args.n, steps=args.steps,
                                    guidance=args.guidance, seed=args.seed, with_fid=not args.no_fid,
                                    sampler=args.sampler, shift=args.shift)  # fmt: skip
    for path in write_results(args.out, result, _command()):
        print(path)


def cmd_autoencoder(args: argparse.Namespace) -> None:
    from kinema.eval.report import write_results
    from kinema.repository import default_models_dir, load_autoencoder
    from kinema.train.autoencoder import evaluate

    model, sha = load_autoencoder(args.models or default_models_dir())
    result = {"autoencoder_sha256": sha, "n": args.n, **evaluate(model, args.n)}
    if args.fid_n:
        from kinema.eval.fid import real_floor, reconstruction_fid

        result["rfid"] = {"n": args.fid_n, "fid": reconstruction_fid(model, args.fid_n),
                          "fid_real_renders_same_n": real_floor(args.fid_n)}  # fmt: skip
    for path in write_results(args.out, result, _command()):
        print(path)


def cmd_flow_loss(args: argparse.Namespace) -> None:
    from kinema.eval.generation import validation_flow_loss
    from kinema.eval.report import write_results
    from kinema.repository import default_models_dir, load_autoencoder, load_denoiser, load_text_encoder_default

    models = args.models or default_models_dir()
    model, _ = load_denoiser(models, args.denoiser)
    autoencoder, _ = load_autoencoder(models)
    result = validation_flow_loss(model, autoencoder, load_text_encoder_default(), n=args.n)
    for path in write_results(args.out, result, _command()):
        print(path)


def cmd_depth(args: argparse.Namespace) -> None:
    from kinema.eval.report import write_results
    from kinema.nn.depth import load_depth_net
    from kinema.repository import default_models_dir
    from kinema.train.depth import evaluate_motorcycle, evaluate_synthetic

    model, sha = load_depth_net(args.weights or (args.models or default_models_dir()) / "depth/1/depth.safetensors")
    result = {"depth_sha256": sha, "synthetic_test": evaluate_synthetic(model, args.n),
              "motorcycle": evaluate_motorcycle(model)}  # fmt: skip
    for path in write_results(args.out, result, _command()):
        print(path)


def cmd_curve(args: argparse.Namespace) -> None:
    """Score every EMA snapshot of a training run (new ones only) and append to the learning curve."""
    import json

    from kinema.eval.generation import evaluate_text_to_image
    from kinema.eval.report import append_curve, curve_markdown, read_curve
    from kinema.nn.checkpoint import read_metadata
    from kinema.pipelines.local import LocalAutoencoder, LocalDenoiser
    from kinema.repository import default_models_dir, load_autoencoder, load_denoiser, load_text_encoder_default

    models = args.models or default_models_dir()
    text_encoder, autoencoder = load_text_encoder_default(), LocalAutoencoder(*load_autoencoder(models))
    curve = args.run / "curve.jsonl"
    done = {p["snapshot"] for p in read_curve(curve)} if curve.exists() else set()
    for snap in sorted((args.run / "snapshots").glob("ema-*.safetensors")):
        if snap.name in done:
            continue
        counters = read_metadata(snap)["counters"]
        denoiser = LocalDenoiser(*load_denoiser(models, snap))
        r = evaluate_text_to_image(text_encoder, denoiser, autoencoder, n=args.n, steps=args.steps,
                                   guidance=args.guidance, with_fid=args.fid, fid_reference=args.n)  # fmt: skip
        acc = r["accuracy"]
        point = {"snapshot": snap.name, "samples_seen": counters["samples"],
                 "train_minutes": round(counters["seconds"] / 60, 1), "colour": round(acc["colour"], 3),
                 "colour_shape": round(acc["colour_shape"], 3), "relation": round(acc["relation"], 3)}  # fmt: skip
        if args.fid:
            point["fid"] = round(r["fid"], 2)
        append_curve(curve, point)
        print(json.dumps(point), flush=True)
    md = curve.with_suffix(".md")
    md.write_text(f"# Learning curve\n\n{curve_markdown(curve)}\nCommand: `{_command()}`\n")
    print(md)


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="measure model quality").add_subparsers(dest="what", required=True)

    def common(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--models", type=Path, default=None, help="model repository (default ./models)")
        p.add_argument("--out", type=Path, default=RESULTS / out, help="results path stem (.json and .md)")

    t2i = ev.add_parser("t2i", help="attribute accuracy and FID on held-out prompts")
    common(t2i, "quality")
    t2i.add_argument("--n", type=int, default=500)
    t2i.add_argument("--steps", type=int, default=28)
    t2i.add_argument("--guidance", type=float, default=4.0)
    t2i.add_argument("--seed", type=int, default=0)
    t2i.add_argument("--sampler", choices=("euler", "heun"), default="euler")
    t2i.add_argument("--shift", type=float, default=1.0, help="SD3 timestep shift of the sampling schedule")
    t2i.add_argument("--denoiser", type=Path, default=None, help="a denoiser snapshot instead of the shipped one")
    t2i.add_argument("--no-fid", action="store_true")
    t2i.set_defaults(func=cmd_t2i)

    ae = ev.add_parser("autoencoder", help="PSNR / SSIM on held-out synthetic and real images")
    common(ae, "autoencoder")
    ae.add_argument("--n", type=int, default=256)
    ae.add_argument("--fid-n", type=int, default=0, help="also the reconstruction FID of this many renders (0 = off)")
    ae.set_defaults(func=cmd_autoencoder)

    fl = ev.add_parser("flow-loss", help="validation flow-matching loss on a fixed t grid")
    common(fl, "flow_loss")
    fl.add_argument("--n", type=int, default=256)
    fl.add_argument("--denoiser", type=Path, default=None)
    fl.set_defaults(func=cmd_flow_loss)

    de = ev.add_parser("depth", help="aligned AbsRel / delta1 on held-out renders, rank correlation on a real photo")
    common(de, "depth")
    de.add_argument("--n", type=int, default=256, help="held-out synthetic test renders")
    de.add_argument("--weights", type=Path, default=None, help="a depth checkpoint instead of the shipped one")
    de.set_defaults(func=cmd_depth)

    cu = ev.add_parser("curve", help="score a run's EMA snapshots into its learning curve")
    cu.add_argument("run", type=Path, help="training run folder (with snapshots/)")
    cu.add_argument("--models", type=Path, default=None)
    cu.add_argument("--n", type=int, default=128)
    cu.add_argument("--steps", type=int, default=20)
    cu.add_argument("--guidance", type=float, default=4.0)
    cu.add_argument("--fid", action="store_true", help="also FID (against --n reference renders)")
    cu.set_defaults(func=cmd_curve)
