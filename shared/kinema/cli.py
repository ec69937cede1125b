"""`kinema` command line: generate images on this machine, run the demo, evaluate models."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything ships locally
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_LOGGER = logging.getLogger("kinema")

DEMO_PROMPTS = (
    "a red sphere to the left of a blue cube",
    "a large yellow cone",
    "a green cube right of a purple sphere",
    "a small cyan sphere",
    "a blue cone, a red cube and a yellow sphere from left to right",
    "a purple cube to the left of a green cone",
)


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _guidance(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _size(text: str) -> int:
    value = int(text)
    if value < 8 or value > 256 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 between 8 and 256, got {value}")
    return value


def _load(models: Path | None):
    from kinema.pipelines.local import load_local

    try:
        return load_local(models)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None


def _png_info(prompt: str, params: dict, seed: int, models: dict[str, str]):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("parameters", json.dumps(params, sort_keys=True))
    info.add_text("seed", str(seed))
    info.add_text("models", json.dumps(models, sort_keys=True))
    info.add_text("software", "kinema")
    return info


def _render(prompts: list[str], args: argparse.Namespace, outputs: list[Path], loaded=None) -> None:
    from PIL import Image
    from tqdm import tqdm

    from kinema.errors import InvalidInput
    from kinema.pipelines import TextToImageRequest, text_to_image

    text_encoder, denoiser, autoencoder = loaded or _load(args.models)
    request = TextToImageRequest(
        prompts=prompts, seed=args.seed, steps=args.steps, guidance=args.guidance, size=args.size, sampler=args.sampler
    )
    with tqdm(total=args.steps, desc="sampling", unit="step", file=sys.stderr, disable=args.quiet) as bar:
        try:
            result = text_to_image(request, text_encoder, denoiser, autoencoder, callback=lambda i, n, x: bar.update(1))
        except InvalidInput as e:
            raise CliError(str(e)) from None
    for prompt, cut in zip(prompts, result.truncated, strict=True):
        if cut:
            _LOGGER.warning("prompt is longer than the text encoder's token limit and was truncated: %r", prompt)
    params = {"steps": args.steps, "guidance": args.guidance, "size": args.size, "sampler": args.sampler}
    for img, prompt, seed, out in zip(result.images, prompts, result.seeds, outputs, strict=True):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        Image.fromarray(img).save(tmp, format="PNG", pnginfo=_png_info(prompt, params, seed, result.models))
        tmp.replace(out)  # a PNG is written whole or not at all
        print(out)


def cmd_generate(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise CliError("the prompt is empty")
    if args.output.suffix.lower() != ".png":
        raise CliError(f"output must be a .png file, got {args.output}")
    outputs = (
        [args.output]
        if args.n == 1
        else [args.output.with_name(f"{args.output.stem}-{i}{args.output.suffix}") for i in range(args.n)]
    )
    _render([args.prompt] * args.n, args, outputs)


def cmd_demo(args: argparse.Namespace) -> None:
    outputs = [
        args.out / f"{i:02d}-{p.replace(' ', '_').replace(',', '')[:60]}.png" for i, p in enumerate(DEMO_PROMPTS)
    ]
    _render(list(DEMO_PROMPTS), args, outputs)
    print(f"\nrendered {len(outputs)} images into {args.out.resolve()}/ (prompt and settings are in each PNG)")


def cmd_triton(args: argparse.Namespace) -> None:
    from kinema.errors import KinemaError
    from kinema.tritonserver import serve, settings_from_args

    try:
        serve(settings_from_args(args))
    except KinemaError as e:  # the server log tail follows the first line; the CLI shows the summary
        raise CliError(str(e).splitlines()[0]) from None


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--steps", type=_positive_int, default=28, help="sampling steps (default 28)")
    p.add_argument("--guidance", type=_guidance, default=4.0, help="classifier-free guidance scale (default 4)")
    p.add_argument("--size", type=_size, default=64, help="image side in pixels, multiple of 8 (default 64)")
    p.add_argument("--sampler", choices=("euler", "heun"), default="euler")
    p.add_argument("--models", type=Path, default=None, help="model repository (default: KINEMA_MODELS or ./models)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kinema", description="Rectified-flow image synthesis on this machine.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="render an image from a text prompt")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="PNG path (default out.png)")
    gen.add_argument("--n", type=_positive_int, default=1, help="number of images (out-0.png, out-1.png, ...)")
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="render the demo prompts into a folder")
    demo.add_argument("--out", type=Path, default=Path("out"))
    _add_sampling_args(demo)
    demo.set_defaults(func=cmd_demo)

    from kinema.tritonserver import add_arguments as add_triton_arguments  # stdlib only: cheap to import

    triton = sub.add_parser("triton", help="serve the model repository with Triton Inference Server")
    add_triton_arguments(triton)
    triton.set_defaults(func=cmd_triton)

    from kinema.eval.cli import add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    from kinema.errors import InvalidInput

    try:
        args.func(args)
    except (CliError, FileNotFoundError, InvalidInput) as e:
        if isinstance(e, FileNotFoundError):
            # kinema.repository imports torch (seconds, 370 MB): not worth it for `kinema triton`, which only
            # supervises a server, so only a FileNotFoundError pays to check for MissingWeights.
            from kinema.repository import MissingWeights

            if not isinstance(e, MissingWeights):
                raise
        print(f"kinema: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
