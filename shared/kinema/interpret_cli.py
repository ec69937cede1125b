"""`kinema interpret analyze|edit`: read and set the named factors of images (colour, shape, position, size) with
an invertible interpretation network, on this machine (the default) or through an interpret service
(`--service HOST:PORT`). Both run `kinema.inference.interpreter.Interpreter`: here over in-process networks.

`kinema interpret fit` queues a fitting on the interpret service (the `Fit` job: a new IIN trained, scored, stored
and loaded there) and `kinema interpret fitting ID` reads or cancels one; `--wait` follows it to its end. On this
machine the same training is `python -m kinema.train.iin`."""

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


def _fitting_lines(f) -> list[str]:
    """A fitting in a few lines: state, progress, and once COMPLETED the model and its headline metrics."""
    from google.protobuf import json_format

    from kinema.interpret.v1 import interpret_pb2 as pb

    state = pb.FittingState.Name(f.state).removeprefix("FITTING_STATE_")
    lines = [f"fitting {f.id}: {state} ({f.request.kind} over {f.request.representation}, name {f.request.name})"]
    if f.HasField("progress"):
        lines.append(f"  step {f.progress.step}/{f.progress.total} after {f.progress.elapsed_seconds:.0f} s")
    if f.HasField("error"):
        lines.append(f"  error: {f.error.message}")
    if f.model.name:
        lines.append(f"  model {f.model.name} version {f.model.version}, weights {f.model.sha256[:12]}")
        probes = json_format.MessageToDict(f.metrics).get("metrics", {}).get("factors", {}).get("linear_probe")
        if probes is not None:
            reads = ", ".join(f"{k} {100 * probes[k][k]:.1f}%" for k in ("colour", "shape", "position", "size")
                              if k in probes)  # fmt: skip
            lines.append(f"  factor probes (z block -> its factor): {reads}")
    return lines


def _follow(args: argparse.Namespace, fitting):
    """Print `fitting` and, with --wait, poll it every second until it ends (a progress line every 10 s)."""
    import sys
    import time

    from google.protobuf import json_format

    from kinema.interpret.v1 import interpret_pb2 as pb

    terminal = {pb.FITTING_STATE_COMPLETED, pb.FITTING_STATE_FAILED, pb.FITTING_STATE_CANCELLED}
    last = time.monotonic()
    while args.wait and fitting.state not in terminal:
        time.sleep(1.0)
        fitting = _call(args, "GetFitting", pb.GetFittingRequest(id=fitting.id)).fitting
        if time.monotonic() - last >= 10 and fitting.HasField("progress"):
            last = time.monotonic()
            print(f"step {fitting.progress.step}/{fitting.progress.total}", file=sys.stderr, flush=True)
    if args.json:
        print(json_format.MessageToJson(fitting, preserving_proto_field_name=True))
    else:
        print("\n".join(_fitting_lines(fitting)))
    if fitting.state in (pb.FITTING_STATE_FAILED, pb.FITTING_STATE_CANCELLED):
        raise CliError(f"fitting {fitting.id} {pb.FittingState.Name(fitting.state).removeprefix('FITTING_STATE_')}"
                       + (f": {fitting.error.message}" if fitting.error.message else ""))  # fmt: skip


def _need_service(args: argparse.Namespace) -> None:
    if not args.service:
        raise CliError("fitting runs on an interpret service: give --service HOST:PORT (or KINEMA_INTERPRET_SERVICE); "
                       "on this machine train with python -m kinema.train.iin")  # fmt: skip


_FIT_OPTIONS = {"data.samples": "--samples", "train_steps": "--steps", "max_seconds": "--max-seconds",
                "factor_dims": "--factor-dims", "eval_samples": "--eval-samples"}  # fmt: skip


def cmd_fit(args: argparse.Namespace) -> None:
    from kinema.errors import KinemaError
    from kinema.interpret.v1 import interpret_pb2 as pb

    _need_service(args)
    request = pb.FitRequest(kind=args.kind, representation=args.representation,
                            data=pb.FactorData(samples=args.samples), train_steps=args.steps,
                            max_seconds=args.max_seconds, batch=args.batch, components=args.components,
                            factor_dims=args.factor_dims or (), seed=args.seed, name=args.name,
                            eval_samples=args.eval_samples)  # fmt: skip
    for field in ("noise", "rho"):
        if getattr(args, field) is not None:
            setattr(request, field, getattr(args, field))
    try:
        fitting = _call(args, "Fit", request).fitting
    except KinemaError as e:
        if e.field:
            option = _FIT_OPTIONS.get(e.field, "--" + e.field.replace("_", "-"))
            raise CliError(f"{option}: {str(e).removeprefix(e.field + ' ').removeprefix(e.field + ': ')}") from None
        raise
    _follow(args, fitting)


def cmd_fitting(args: argparse.Namespace) -> None:
    from kinema.interpret.v1 import interpret_pb2 as pb

    _need_service(args)
    if args.cancel:
        fitting = _call(args, "CancelFitting", pb.CancelFittingRequest(id=args.id)).fitting
    else:
        fitting = _call(args, "GetFitting", pb.GetFittingRequest(id=args.id)).fitting
    _follow(args, fitting)


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
    service = argparse.ArgumentParser(add_help=False)
    service.add_argument(
        "--service",
        type=_server_address,
        default=os.environ.get("KINEMA_INTERPRET_SERVICE") or None,
        metavar="HOST:PORT",
        help="the interpret service (default: KINEMA_INTERPRET_SERVICE)",
    )
    service.add_argument("--wait", action="store_true", help="follow the fitting until it ends")
    service.add_argument("--json", action="store_true", help="print the fitting as JSON (the proto's field names)")
    fit = verbs.add_parser("fit", parents=[service], help="train a new IIN on the interpret service (a job) and load "
                           "it there; prints the fitting (docs/interpret.md, 'Fitting as a job')")  # fmt: skip
    fit.add_argument("--kind", default="", choices=("factor", "mle", "invariance", "net2net"),
                     help="default factor")  # fmt: skip
    fit.add_argument("--representation", default="", choices=("vector_ae", "vae"), help="default vector_ae")
    fit.add_argument("--samples", type=int, default=0, help="world renders to fit on (default 8000)")
    fit.add_argument("--steps", type=int, default=0, help="training steps at most (default 2000)")
    fit.add_argument("--max-seconds", type=float, default=0.0, help="training time at most (default 1800)")
    fit.add_argument("--batch", type=int, default=0, help="images or pairs per step (default 256)")
    fit.add_argument("--components", type=int, default=0, help="principal components of the code (default: all)")
    fit.add_argument("--factor-dims", type=int, nargs=4, default=None, metavar="N",
                     help="dimensions of colour, shape, position, size (default: the paper's estimate)")  # fmt: skip
    fit.add_argument("--noise", type=float, default=None, help="training noise on the code (default 0.3)")
    fit.add_argument("--rho", type=float, default=None, help="correlation of a shared factor (default 0.98)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--name", default="", help="the model's name, iin_... (default iin_fit_<id>)")
    fit.add_argument("--eval-samples", type=int, default=0, help="test renders for the metrics (default 500)")
    fit.set_defaults(func=cmd_fit)
    fitting = verbs.add_parser("fitting", parents=[service], help="print a fitting, or cancel it")
    fitting.add_argument("id", help="the fitting's id, as fit printed it")
    fitting.add_argument("--cancel", action="store_true", help="stop it (a running one stops within a step)")
    fitting.set_defaults(func=cmd_fitting)
