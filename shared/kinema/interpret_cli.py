"""`kinema interpret analyze|edit`: read and set the named factors of images (colour, shape, position, size) with
an invertible interpretation network, on this machine (the default) or through an interpret service
(`--service HOST:PORT`). Both run `kinema.inference.interpreter.Interpreter`: here over in-process networks."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from kinema.cli import CliError, _read_image, _server_address

DEFAULT_MODEL = "iin_factor"


def _assignment(text: str) -> tuple[str, str]:
    factor, sep, value = text.partition("=")
    if not sep or not factor.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"must be FACTOR=VALUE (e.g. colour=blue), got {text!r}")
    return factor.strip(), value.strip()


def _images(paths: list[Path]):
    """(B, 3, H, W) float32 in [-1, 1] from PNG / JPEG files of one size."""
    import numpy as np

    pixels = [_read_image(p, "image", "RGB")[0] for p in paths]
    sizes = {p.shape[:2] for p in pixels}
    if len(sizes) > 1:
        raise CliError(f"the images differ in size ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))}); give one size")
    return (np.stack(pixels).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0).copy()


def _interpreter(args: argparse.Namespace):
    from kinema.inference.interpreter import Interpreter
    from kinema.inference.runner import LocalRunner
    from kinema.repository import default_models_dir

    return Interpreter(LocalRunner(args.models or default_models_dir()))


def _call(args: argparse.Namespace, method: str, request):
    """One call to the interpret service at --service; errors as Kinema's typed ones."""
    import grpc

    from kinema.errors import Unavailable
    from kinema.interpret.v1 import interpret_pb2_grpc
    from kinema.rpc.status import from_rpc_error

    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    with grpc.insecure_channel(args.service) as channel:
        try:
            return getattr(interpret_pb2_grpc.InterpretStub(channel), method)(request, timeout=120, metadata=metadata)
        except grpc.RpcError as err:
            error = from_rpc_error(err)
            if isinstance(error, Unavailable):
                raise Unavailable(f"the interpret service at {args.service} is unavailable: {error}",
                                  reason=error.reason, metadata=error.metadata) from None  # fmt: skip
            raise error from None


def _analyze(args: argparse.Namespace, images):
    """[(factor, values, scores (B, V))] for the images, here or through the service."""
    from kinema.interpret.v1 import interpret_pb2 as pb
    from kinema.rpc import tensors

    if not args.service:
        a = _interpreter(args).analyze(args.model, "", images)
        return [(r.factor, r.values, r.scores) for r in a.factors]
    r = _call(args, "Analyze", pb.AnalyzeRequest(images=tensors.encode(images), model={"name": args.model}))
    return [(f.factor, tuple(f.values), tensors.decode(f.scores, "scores")) for f in r.factors]


def _edit(args: argparse.Namespace, images, values: dict[str, str]):
    from kinema.interpret.v1 import interpret_pb2 as pb
    from kinema.rpc import tensors

    if not args.service:
        return _interpreter(args).edit(args.model, "", images, values).images
    request = pb.EditRequest(images=tensors.encode(images), values=values, model={"name": args.model})
    return tensors.decode(_call(args, "Edit", request).images, "images")


def _check_remote(args: argparse.Namespace) -> None:
    if args.service and args.models is not None:
        raise CliError("--models names a model repository on this machine; with --service the service's models run")


def cmd_analyze(args: argparse.Namespace) -> None:
    from kinema.errors import InvalidInput

    _check_remote(args)
    images = _images(args.images)
    try:
        readings = _analyze(args, images)
    except InvalidInput as e:
        raise CliError(f"{', '.join(map(str, args.images))}: {str(e).removeprefix(e.field + ': ')}") from None
    if args.json:
        rows = [
            {f: {"value": v[s[i].argmax()], "scores": {n: round(float(x), 4) for n, x in zip(v, s[i], strict=True)}}
             for f, v, s in readings}
            for i in range(len(args.images))
        ]  # fmt: skip
        print(json.dumps([{"image": str(p), "factors": r} for p, r in zip(args.images, rows, strict=True)], indent=1))
        return
    for i, path in enumerate(args.images):
        print(f"{path}:")
        for factor, values, scores in readings:
            order = scores[i].argsort()[::-1]
            others = ", ".join(f"{values[j]} {scores[i, j]:.2f}" for j in order[1:])
            print(f"  {factor:<9} {values[order[0]]:<8} {scores[i, order[0]]:.2f}  ({others})")


def cmd_edit(args: argparse.Namespace) -> None:
    from PIL import Image, PngImagePlugin

    from kinema.cli import _save_png
    from kinema.errors import InvalidInput

    _check_remote(args)
    if args.output.suffix.lower() != ".png":
        raise CliError(f"output must be a .png file, got {args.output}")
    values = dict(args.values)
    if len(values) != len(args.values):
        raise CliError("--set names a factor more than once")
    images = _images([args.image])
    try:
        edited = _edit(args, images, values)
    except InvalidInput as e:
        where = str(args.image) if e.field == "images" else "--set"
        raise CliError(f"{where}: {str(e).removeprefix(e.field + ': ')}") from None
    pixels = ((edited[0].clip(-1, 1) + 1) * 127.5).round().astype("uint8").transpose(1, 2, 0)  # (H, W, 3)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps({"model": args.model, "set": values, "source": str(args.image)}))
    info.add_text("software", "kinema")
    _save_png(Image.fromarray(pixels), args.output, info)


def add_interpret_parser(sub) -> None:
    p = sub.add_parser("interpret", help="read and set the named factors of images (IIN): colour, shape, ...")
    verbs = p.add_subparsers(dest="verb", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL, help=f"interpretation model (default {DEFAULT_MODEL})")
    common.add_argument("--models", type=Path, default=None,
                        help="model repository (default: KINEMA_MODELS or ./models)")  # fmt: skip
    common.add_argument("--service", type=_server_address, default=os.environ.get("KINEMA_INTERPRET_SERVICE") or None,
                        metavar="HOST:PORT", help="run on the interpret service at HOST:PORT (default: "
                        "KINEMA_INTERPRET_SERVICE; unset: on this machine)")  # fmt: skip
    analyze = verbs.add_parser("analyze", parents=[common], help="print each factor's most likely value and scores")
    analyze.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="PNG or JPEG files of the model's size")
    analyze.add_argument("--json", action="store_true", help="print JSON: per image, per factor, value and scores")
    analyze.set_defaults(func=cmd_analyze)
    edit = verbs.add_parser("edit", parents=[common], help="set factors to named values, write the edited image")
    edit.add_argument("image", type=Path, help="PNG or JPEG file of the model's size")
    edit.add_argument("--set", dest="values", type=_assignment, action="append", required=True,
                      metavar="FACTOR=VALUE", help="e.g. colour=blue; repeat for several factors")  # fmt: skip
    edit.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="PNG path (default out.png)")
    edit.set_defaults(func=cmd_edit)
