"""`kinema` command line: generate images on this machine or through a Kinema server (`--server`), manage a
server's jobs, start a local stack, run the demo, evaluate models."""

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


# Exit statuses: 0 done; 1 the work ran and failed (a job FAILED or CANCELLED, a download that does not match its
# hash, an internal server error); 2 a request to fix (usage, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION); 3 the
# server or one of its dependencies is unreachable, too slow or busy (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED
# with a retry hint): try again later; 130 Ctrl-C.
EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 1, 2, 3, 130
JOB_STATES = ("queued", "running", "completed", "failed", "cancelled")
# The option of this CLI that sets a request field a server names in an error.
_OPTION_OF_FIELD = {"prompts": "--n", "seed": "--seed", "steps": "--steps", "guidance": "--guidance",
                    "width": "--size", "height": "--size", "sampler": "--sampler", "id": "the job ID",
                    "state": "--state", "idempotency_key": "--idempotency-key",
                    "kinema-tenant": "--tenant", "strength": "--strength", "inputs.image": "--init-image",
                    "inputs.mask": "--mask", "models.denoiser": "--denoiser"}  # fmt: skip
DEFAULT_SIZE = 64


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""

    exit_code = EXIT_USAGE


class NotUp(CliError):
    """`kinema stack status`: no stack, or not all of it is up; exit status 3."""

    exit_code = EXIT_UNAVAILABLE


class WorkFailed(CliError):
    """The work ran and did not succeed (a job FAILED or was CANCELLED); exit status 1."""

    exit_code = EXIT_FAILED


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


def _server_address(text: str) -> str:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, got {text!r}")
    return text.strip()


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535 (0 = any free port), got {value}")
    return value


def _strength(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _size(text: str) -> int:
    value = int(text)
    if value < 8 or value > 256 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 between 8 and 256, got {value}")
    return value


def _load(models: Path | None, denoiser: str | None = None):
    from kinema.pipelines.local import load_local

    try:
        return load_local(models, denoiser or "denoiser")
    except FileNotFoundError as e:
        raise CliError(str(e)) from None


def _sampling(args: argparse.Namespace, denoiser) -> tuple[int, float]:
    """(steps, guidance): the options given, else the denoiser's defaults (a distilled student's own steps and no
    guidance; 28 and 4 otherwise), as the server fills in a request that leaves them unset."""
    from kinema.pipelines.text_to_image import sampling_defaults

    steps, guidance = sampling_defaults(denoiser)
    return (args.steps if args.steps is not None else steps), (args.guidance if args.guidance is not None else guidance)


def _png_info(prompt: str, params: dict, seed: int, models: dict[str, str]):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("parameters", json.dumps(params, sort_keys=True))
    info.add_text("seed", str(seed))
    info.add_text("models", json.dumps(models, sort_keys=True))
    info.add_text("software", "kinema")
    return info


def _save_png(image, out: Path, info) -> None:
    """Write a PIL image with its text metadata whole or not at all, and print its path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(out)
    print(out)


def _numbered(output: Path, n: int) -> list[Path]:
    """`output` for one image, else out-0.png, out-1.png, ..."""
    return [output] if n == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]


def _render(prompts: list[str], args: argparse.Namespace, outputs: list[Path], loaded=None) -> None:
    from PIL import Image
    from tqdm import tqdm

    from kinema.errors import InvalidInput
    from kinema.pipelines import TextToImageRequest, text_to_image

    text_encoder, denoiser, autoencoder = loaded or _load(args.models, args.denoiser)
    size = args.size or DEFAULT_SIZE
    steps, guidance = _sampling(args, denoiser)
    request = TextToImageRequest(
        prompts=prompts, seed=args.seed, steps=steps, guidance=guidance, size=size, sampler=args.sampler
    )
    with tqdm(total=steps, desc="sampling", unit="step", file=sys.stderr, disable=args.quiet) as bar:
        try:
            result = text_to_image(request, text_encoder, denoiser, autoencoder, callback=lambda i, n, x: bar.update(1))
        except InvalidInput as e:
            raise CliError(str(e)) from None
    for prompt, cut in zip(prompts, result.truncated, strict=True):
        if cut:
            _LOGGER.warning("prompt is longer than the text encoder's token limit and was truncated: %r", prompt)
    params = {"steps": steps, "guidance": guidance, "size": size, "sampler": args.sampler}
    if args.denoiser:
        params["models"] = {"denoiser": args.denoiser}
    for img, prompt, seed, out in zip(result.images, prompts, result.seeds, outputs, strict=True):
        _save_png(Image.fromarray(img), out, _png_info(prompt, params, seed, result.models))


def _edit_pipeline(args: argparse.Namespace) -> str:
    """The pipeline the edit options ask for: text_to_image, image_to_image (--init-image) or inpaint (+ --mask)."""
    init, mask, strength = (
        getattr(args, "init_image", None),
        getattr(args, "mask", None),
        getattr(args, "strength", None),
    )
    if init is None:
        if mask is not None or strength is not None:
            raise CliError(f"{'--mask' if mask is not None else '--strength'} needs --init-image (the image to edit)")
        return "text_to_image"
    return "inpaint" if mask is not None else "image_to_image"


def _read_image(path: Path, option: str, mode: str):
    """The pixels of a PNG or JPEG file for an edit option (the checks an upload gets, on this machine)."""
    import hashlib

    from kinema.errors import InvalidInput
    from kinema.storage.media import decode_image, media_type_of

    try:
        data = path.read_bytes()
    except OSError as e:
        raise CliError(f"{option} {path}: {e.strerror or e}") from None
    try:
        pixels = decode_image(data, media_type_of(path.name, data[:16]), f"{option} {path}", mode=mode)
    except InvalidInput as e:
        message = str(e)
        raise CliError(message if message.startswith(option) else f"{option} {path}: {message}") from None
    return pixels, hashlib.sha256(data).hexdigest()


def _render_edit(pipeline: str, args: argparse.Namespace, outputs: list[Path]) -> None:
    """image_to_image or inpaint on this machine, written as `_render` writes text_to_image."""
    from PIL import Image
    from tqdm import tqdm

    from kinema.errors import InvalidInput
    from kinema.pipelines import ImageToImageRequest, InpaintRequest, image_to_image, inpaint
    from kinema.sampling.edit import start_step

    image, image_sha = _read_image(args.init_image, "--init-image", "RGB")
    height, width = image.shape[:2]
    if args.size and (width, height) != (args.size, args.size):
        raise CliError(f"the output keeps the input's size {width}x{height}; leave --size out or set it to that")
    prompts = [args.prompt] * args.n
    mask, mask_sha = _read_image(args.mask, "--mask", "L") if pipeline == "inpaint" else (None, None)
    text_encoder, denoiser, autoencoder = _load(args.models, args.denoiser)
    steps, guidance = _sampling(args, denoiser)
    fields = {"prompts": prompts, "image": image, "seed": args.seed, "steps": steps, "guidance": guidance,
              "sampler": args.sampler}  # fmt: skip
    params = {"pipeline": pipeline, "steps": steps, "guidance": guidance, "width": width, "height": height,
              "sampler": args.sampler, "init_image": image_sha}  # fmt: skip
    if pipeline == "inpaint":
        params["mask"] = mask_sha
        request = InpaintRequest(mask=mask, strength=args.strength or 1.0, **fields)
        run = inpaint
    else:
        request = ImageToImageRequest(strength=args.strength or 0.8, **fields)
        run = image_to_image
    params["strength"] = request.strength
    total = steps - start_step(steps, request.strength)
    with tqdm(total=total, desc="sampling", unit="step", file=sys.stderr, disable=args.quiet) as bar:
        try:
            result = run(request, text_encoder, denoiser, autoencoder, callback=lambda i, n, x: bar.update(1))
        except InvalidInput as e:
            option = {"image": f"--init-image {args.init_image}", "mask": f"--mask {args.mask}",
                      "denoiser": f"--denoiser {args.denoiser}"}.get(e.field)  # fmt: skip
            raise CliError(f"{option}: {e}" if option else str(e)) from None
    for img, prompt, seed, out in zip(result.images, prompts, result.seeds, outputs, strict=True):
        _save_png(Image.fromarray(img), out, _png_info(prompt, params, seed, result.models))


def cmd_generate(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise CliError("the prompt is empty")
    if args.output.suffix.lower() != ".png":
        raise CliError(f"output must be a .png file, got {args.output}")
    pipeline = _edit_pipeline(args)
    if args.server:
        _remote_generate(args)
    elif pipeline == "text_to_image":
        _render([args.prompt] * args.n, args, _numbered(args.output, args.n))
    else:
        _render_edit(pipeline, args, _numbered(args.output, args.n))


def cmd_demo(args: argparse.Namespace) -> None:
    outputs = [
        args.out / f"{i:02d}-{p.replace(' ', '_').replace(',', '')[:60]}.png" for i, p in enumerate(DEMO_PROMPTS)
    ]
    _render(list(DEMO_PROMPTS), args, outputs)
    print(f"\nrendered {len(outputs)} images into {args.out.resolve()}/ (prompt and settings are in each PNG)")
    if not args.no_video:
        from kinema.video_cli import demo_videos

        videos = demo_videos(args.out, args.quiet)
        print(f"edited {len(videos)} videos into {args.out.resolve()}/ (provenance is in each MP4's metadata)")


def cmd_triton(args: argparse.Namespace) -> None:
    from kinema.errors import KinemaError
    from kinema.tritonserver import serve, settings_from_args

    try:
        serve(settings_from_args(args))
    except KinemaError as e:  # the server log tail follows the first line; the CLI shows the summary
        raise CliError(str(e).splitlines()[0]) from None


# -- the local stack (kinema.stack) -------------------------------------------------------------------


def _print_components(rows: list[tuple[str, str, str, int]]) -> None:
    width = max(len(r[0]) for r in rows)
    for name, state, address, pid in rows:
        print(f"  {name.ljust(width)}  {state.ljust(9)}  {address}  (pid {pid})")


def cmd_stack_up(args: argparse.Namespace) -> None:
    from kinema.stack import AlreadyRunning, StackSettings, up

    kwargs = {"models": args.models} if args.models is not None else {}
    settings = StackSettings(run_dir=args.run_dir, port=args.port, startup_timeout=args.timeout, **kwargs)
    try:
        state = up(settings, report=lambda line: print(line, file=sys.stderr, flush=True))
    except AlreadyRunning as e:
        raise CliError(str(e)) from None
    print(f"stack up in {state.run_dir} (logs in {Path(state.run_dir) / 'logs'}):")
    _print_components([(c.name, "up", c.address, c.pid) for c in state.components])
    print(f"orchestrator: {state.orchestrator}")
    print(f"export KINEMA_SERVER={state.orchestrator}")


def cmd_stack_status(args: argparse.Namespace) -> None:
    from kinema.stack import status

    found = status(args.run_dir)
    if found is None:
        raise NotUp(f"no stack recorded in {args.run_dir.resolve()}")
    state, components = found
    print(f"stack in {state.run_dir} ({state.state}, since {state.created}):")
    _print_components([(s.component.name, s.state, s.component.address, s.component.pid) for s in components])
    if state.orchestrator:
        print(f"orchestrator: {state.orchestrator}")
    bad = [f"{s.component.name} ({s.state})" for s in components if s.state != "up"]
    if bad:
        raise NotUp(f"{len(bad)} of {len(components)} components are not up: {', '.join(bad)}")
    if state.state != "up":
        raise NotUp("the stack is still starting, or its `stack up` was cut short (`kinema stack down` clears it)")


def cmd_keys_new(args: argparse.Namespace) -> None:
    from kinema.rpc.auth import key_hash, new_key
    from kinema.storage.artifacts import check_tenant

    try:
        tenant = check_tenant(args.tenant)
    except ValueError as e:
        raise CliError(str(e)) from None
    key = new_key()
    print(f"key (give it to the client, as KINEMA_API_KEY; it is shown only now):\n{key}")
    print(f"line for the server's keys file (KINEMA_API_KEYS_FILE):\n{tenant} {key_hash(key)}")


def cmd_stack_down(args: argparse.Namespace) -> None:
    from kinema.stack import AlreadyRunning, down

    try:
        state = down(args.run_dir, timeout=args.timeout, report=lambda line: print(line, file=sys.stderr, flush=True))
    except AlreadyRunning as e:
        raise CliError(str(e)) from None
    if state is None:
        print(f"no stack running from {args.run_dir.resolve()}: nothing to stop")
    else:
        print(f"stack from {state.run_dir} stopped ({len(state.components)} process groups)")


# -- through a server (--server) ---------------------------------------------------------------------


def _client(args: argparse.Namespace):
    if not args.server:
        raise CliError(f"`kinema {args.command}` needs a server: pass --server HOST:PORT or set KINEMA_SERVER")
    from kinema.client import KinemaClient

    # The name the server's certificate must hold, where it is not the --server host (a port-forward to 127.0.0.1).
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return KinemaClient(args.server, tenant=args.tenant, api_key=args.api_key, credentials=_credentials(args),
                        options=options)  # fmt: skip


def _credentials(args: argparse.Namespace):
    """TLS channel credentials from --tls / --ca-cert / --client-cert / --client-key; None: plaintext."""
    if not (args.tls or args.ca_cert or args.client_cert or args.client_key or args.tls_server_name):
        return None
    from kinema.rpc.tls import channel_credentials

    return channel_credentials(args.ca_cert, args.client_cert, args.client_key,
                               settings=("--ca-cert", "--client-cert", "--client-key"))  # fmt: skip


def _request_fields(args: argparse.Namespace, client=None) -> dict:
    """The request the sampling options stand for: the same values embedded mode runs with, so that one command
    makes the same image embedded and served. With --init-image (and --mask) the files are uploaded first."""
    fields = {"n": args.n, "seed": args.seed, "steps": args.steps or 0, "guidance": args.guidance,
              "size": args.size or 0, "sampler": args.sampler}  # fmt: skip
    if args.denoiser:
        fields["models"] = {"denoiser": args.denoiser}
    pipeline = _edit_pipeline(args)
    if pipeline != "text_to_image":
        fields |= {"pipeline": pipeline, "strength": args.strength or 0.0, "inputs": {}}
        for name, option, path in (("image", "--init-image", args.init_image), ("mask", "--mask", args.mask)):
            if path is not None:
                fields["inputs"][name] = _upload(client, path, option)
    return fields


def _upload(client, path: Path, option: str):
    """`client.upload(path)`, its errors naming the option (none for a command's own input) and the file."""
    from kinema.errors import KinemaError, Unavailable

    where = f"{option} {path}" if option else str(path)
    if not path.is_file():
        raise CliError(f"{where}: no such file")
    try:
        return client.upload(path)
    except KinemaError as e:
        if isinstance(e, Unavailable):
            raise
        message = str(e).removeprefix("chunk: ")  # the server names the upload's bytes "chunk"
        raise type(e)(f"{where}: {message}", reason=e.reason, metadata=e.metadata) from None


class _Progress:
    """A progress bar on stderr from a server's progress events; it appears with the first one, so that an error
    (an unreachable server) is not preceded by an empty bar."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar, self.desc = quiet, None, ""

    def show(self, step: int, total: int, desc: str = "sampling") -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total or None, desc=desc, unit="step", file=sys.stderr, disable=self.quiet)
        elif desc != self.desc:
            self.bar.set_description(desc, refresh=False)
        self.desc = desc
        if total and self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.update(step - self.bar.n)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _save_output(client, output, out: Path) -> None:
    """Download one output, checked against its sha256, to `out`: a PNG gets the text metadata embedded mode
    writes, taken from the artifact's provenance (its parameters are the resolved request that reproduces it), and
    the artifact's sha256; the pixels are the artifact's."""
    import io

    from google.protobuf import json_format
    from PIL import Image

    if output.artifact.media_type != "image/png":
        client.download(output, out)
        print(out)
        return
    image = Image.open(io.BytesIO(client.read(output)))
    image.load()
    p = output.provenance
    params = json_format.MessageToDict(p.parameters)
    prompt = next(iter(params.get("prompts") or []), "")
    seed = p.seed if p.HasField("seed") else output.seed
    info = _png_info(prompt, params, seed, {cap: m.sha256 for cap, m in p.models.items()})
    info.add_text("artifact", output.artifact.sha256)
    _save_png(image, out, info)


def _save_outputs(client, outputs, output: Path) -> None:
    ordered = sorted(outputs, key=lambda o: o.index)
    for o in ordered:
        if o.prompt_truncated:
            _LOGGER.warning(
                "output %d: the prompt was longer than the text encoder's token limit and truncated", o.index
            )
    for o, out in zip(ordered, _numbered(output, len(ordered)), strict=True):
        _save_output(client, o, out)


def _remote_generate(args: argparse.Namespace) -> None:
    if args.models is not None:
        raise CliError("--models names a model repository on this machine; with --server the server's models run")
    with _client(args) as client:
        fields = _request_fields(args, client)
        with _Progress(args.quiet) as bar:
            result = client.generate(args.prompt, on_progress=lambda p: bar.show(p.step, p.total), **fields)
        _save_outputs(client, result.outputs, args.output)


def cmd_jobs_submit(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise CliError("the prompt is empty")
    with _client(args) as client:
        job = client.submit_job(args.prompt, idempotency_key=args.idempotency_key, **_request_fields(args, client))
    print(job.id)


def cmd_jobs_watch(args: argparse.Namespace) -> None:
    from kinema.client import state_name
    from kinema.orchestrator.v1 import orchestrator_pb2 as pb

    if args.output is not None and args.output.suffix.lower() != ".png":
        raise CliError(f"output must be a .png file, got {args.output}")
    with _client(args) as client:
        with _Progress(args.quiet) as bar:
            job = client.watch_job(args.id, lambda j: bar.show(j.progress.step, j.progress.total, state_name(j.state)))
        if job.state == pb.JOB_STATE_FAILED:
            raise WorkFailed(f"job {job.id} failed: {_job_error(job.error)}")
        if job.state == pb.JOB_STATE_CANCELLED:
            raise WorkFailed(f"job {job.id} was cancelled")
        if args.output is None:
            for o in sorted(job.outputs, key=lambda o: o.index):
                print(o.artifact.sha256)
        else:
            _save_outputs(client, job.outputs, args.output)


def _job_error(error) -> str:
    import grpc

    code = next((c.name for c in grpc.StatusCode if c.value[0] == error.code), str(error.code))
    text = f"{error.message} ({code}"
    if error.detail.field:
        text += f", {_OPTION_OF_FIELD.get(error.detail.field, 'field ' + error.detail.field)}"
    return text + ")"


def cmd_jobs_cancel(args: argparse.Namespace) -> None:
    from kinema.client import state_name
    from kinema.orchestrator.v1 import orchestrator_pb2 as pb

    with _client(args) as client:
        job = client.cancel_job(args.id)
    note = " (cancel requested: it stops at its next sampling step)" if job.state == pb.JOB_STATE_RUNNING else ""
    print(f"{job.id} {state_name(job.state)}{note}")


def cmd_jobs_list(args: argparse.Namespace) -> None:
    from datetime import UTC

    from kinema.client import state_name

    with _client(args) as client:
        jobs = client.list_jobs(args.state, limit=args.limit)
    if not jobs:
        print("no jobs", file=sys.stderr)
        return
    rows = [("ID", "STATE", "CREATED (UTC)", "PROGRESS", "PROMPT")]
    for j in jobs:
        created = j.created_at.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S")
        progress = f"{j.progress.step}/{j.progress.total}" if j.progress.total else "-"
        prompts = list(j.request.prompts)
        prompt = (prompts[0][:48] + (f" (x{len(prompts)})" if len(prompts) > 1 else "")) if prompts else ""
        rows.append((j.id, state_name(j.state), created, progress, prompt))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[4]]).rstrip())


def _add_request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="sampling steps (default 28; with a distilled student: its own, e.g. 4)")  # fmt: skip
    p.add_argument("--guidance", type=_guidance, default=None,
                   help="classifier-free guidance scale (default 4; a distilled student takes none)")  # fmt: skip
    p.add_argument("--denoiser", default=None, metavar="MODEL",
                   help="denoiser model to sample with (default: the repository's or server's default), e.g. the "
                        "few-step student denoiser_4step")  # fmt: skip
    size_help = f"image side in pixels, multiple of 8 (default {DEFAULT_SIZE}; with --init-image: its size)"
    p.add_argument("--size", type=_size, default=None, help=size_help)
    p.add_argument("--sampler", choices=("euler", "heun"), default="euler")


def _add_edit_args(p: argparse.ArgumentParser) -> None:
    image_help = "edit this image instead of starting from noise (image_to_image; the output keeps its size)"
    p.add_argument("--init-image", type=Path, default=None, metavar="PNG|JPEG", help=image_help)
    mask_help = "with --init-image: repaint where this mask (same size, greyscale) is >= 128 (inpaint)"
    p.add_argument("--mask", type=Path, default=None, metavar="PNG|JPEG", help=mask_help)
    strength_help = "with --init-image: how far to move from it, in (0, 1] (default 0.8; inpaint 1.0)"
    p.add_argument("--strength", type=_strength, default=None, help=strength_help)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    _add_request_args(p)
    p.add_argument("--models", type=Path, default=None, help="model repository (default: KINEMA_MODELS or ./models)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_server_args(p: argparse.ArgumentParser, server: object, tenant: object, api_key: object) -> None:
    p.add_argument("--server", type=_server_address, default=server, metavar="HOST:PORT",
                   help="run through the Kinema server at HOST:PORT (default: KINEMA_SERVER; unset: here)")  # fmt: skip
    p.add_argument("--tenant", default=tenant,
                   help="tenant the server acts for (default: KINEMA_TENANT, else the server's default)")  # fmt: skip
    p.add_argument("--api-key", default=api_key, metavar="KEY",
                   help="API key for a server that checks keys (default: KINEMA_API_KEY; prefer the variable: "
                        "arguments show in the process list)")  # fmt: skip


def _add_tls_args(p: argparse.ArgumentParser, tls: object, ca_cert: object, cert: object, key: object,
                  server_name: object) -> None:  # fmt: skip
    p.add_argument("--tls", action="store_true", default=tls,
                   help="TLS, trusting gRPC's public roots or --ca-cert (default: KINEMA_TLS=1)")  # fmt: skip
    p.add_argument("--ca-cert", default=ca_cert, metavar="PEM",
                   help="CA certificate the server's certificate must chain to; implies --tls (default: "
                        "KINEMA_CA_CERT)")  # fmt: skip
    p.add_argument("--client-cert", default=cert, metavar="PEM",
                   help="client certificate for a server that asks for one (mTLS), with --client-key (default: "
                        "KINEMA_CLIENT_CERT)")  # fmt: skip
    p.add_argument("--client-key", default=key, metavar="PEM",
                   help="the client certificate's private key (default: KINEMA_CLIENT_KEY)")  # fmt: skip
    p.add_argument("--tls-server-name", default=server_name, metavar="NAME",
                   help="the name the server's certificate must hold when it is not the --server host, e.g. "
                        "through a port-forward; implies --tls (default: KINEMA_TLS_SERVER_NAME)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kinema", description="Rectified-flow image synthesis on this machine or through a Kinema server."
    )
    env = os.environ
    _add_server_args(parser, env.get("KINEMA_SERVER") or None, env.get("KINEMA_TENANT") or None,
                     env.get("KINEMA_API_KEY") or None)  # fmt: skip
    remote = argparse.ArgumentParser(add_help=False)  # the same options after a command, not overriding the above
    _add_server_args(remote, argparse.SUPPRESS, argparse.SUPPRESS, argparse.SUPPRESS)
    _add_tls_args(parser, env.get("KINEMA_TLS", "").strip().lower() in ("1", "true", "yes"),
                  *(env.get(f"KINEMA_{name}") or None for name in ("CA_CERT", "CLIENT_CERT", "CLIENT_KEY",
                                                                   "TLS_SERVER_NAME")))  # fmt: skip
    _add_tls_args(remote, *[argparse.SUPPRESS] * 5)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", parents=[remote], help="render an image from a text prompt")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="PNG path (default out.png)")
    gen.add_argument("--n", type=_positive_int, default=1, help="number of images (out-0.png, out-1.png, ...)")
    _add_sampling_args(gen)
    _add_edit_args(gen)
    gen.set_defaults(func=cmd_generate)

    jobs = sub.add_parser("jobs", help="durable jobs on a Kinema server (--server)")
    verbs = jobs.add_subparsers(dest="verb", required=True)
    submit = verbs.add_parser("submit", parents=[remote], help="queue a text-to-image job; prints its id")
    submit.add_argument("prompt")
    submit.add_argument("--n", type=_positive_int, default=1, help="number of images")
    submit.add_argument("--idempotency-key", default="", help="resubmitting with the same key returns the same job")
    _add_request_args(submit)
    _add_edit_args(submit)
    submit.set_defaults(func=cmd_jobs_submit)
    watch = verbs.add_parser("watch", parents=[remote], help="show a job's progress; download its images when done")
    watch.add_argument("id")
    watch.add_argument("-o", "--output", type=Path, default=None,
                       help="PNG path (out-0.png, ... for several images); without it: print their sha256")  # fmt: skip
    watch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    watch.set_defaults(func=cmd_jobs_watch)
    cancel = verbs.add_parser("cancel", parents=[remote], help="stop a job")
    cancel.add_argument("id")
    cancel.set_defaults(func=cmd_jobs_cancel)
    listing = verbs.add_parser("list", parents=[remote], help="the tenant's jobs, newest first")
    listing.add_argument("--state", choices=JOB_STATES, default=None)
    listing.add_argument("--limit", type=_positive_int, default=50, help="most jobs to list (default 50)")
    listing.set_defaults(func=cmd_jobs_list)

    demo = sub.add_parser("demo", help="render the demo prompts into a folder")
    demo.add_argument("--out", type=Path, default=Path("out"))
    demo.add_argument("--no-video", action="store_true", help="images only: skip the two video edits")
    _add_sampling_args(demo)
    demo.set_defaults(func=cmd_demo)

    from kinema.tritonserver import add_arguments as add_triton_arguments  # stdlib only: cheap to import

    triton = sub.add_parser("triton", help="serve the model repository with Triton Inference Server")
    add_triton_arguments(triton)
    triton.set_defaults(func=cmd_triton)

    keys = sub.add_parser("keys", help="API keys for a server that checks them (KINEMA_API_KEYS_FILE)")
    keys_verbs = keys.add_subparsers(dest="verb", required=True)
    keys_new = keys_verbs.add_parser("new", help="make a key for TENANT: the key for the client, a line for the server")
    keys_new.add_argument("tenant", help="the tenant the key acts for (a-z, 0-9, '.', '_', '-')")
    keys_new.set_defaults(func=cmd_keys_new)

    from kinema.stack import DEFAULT_PORT, DEFAULT_RUN_DIR  # stdlib and kinema.processes only: cheap

    stack = sub.add_parser("stack", help="the distributed shape on this machine: up, status, down")
    stack_verbs = stack.add_subparsers(dest="verb", required=True)
    run_dir = argparse.ArgumentParser(add_help=False)
    run_dir.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                         help=f"state file, logs and data of the stack (default {DEFAULT_RUN_DIR})")  # fmt: skip
    up_help = "start redis, S3, Triton, the services, the orchestrator and a job worker; wait until all are healthy"
    stack_up = stack_verbs.add_parser("up", parents=[run_dir], help=up_help)
    stack_up.add_argument("--port", type=_port, default=DEFAULT_PORT,
                          help=f"the orchestrator's port (default {DEFAULT_PORT}; 0 = any free port)")  # fmt: skip
    stack_up.add_argument("--models", type=Path, default=None,
                          help="model repository Triton serves (default: KINEMA_MODELS or ./models)")  # fmt: skip
    stack_up.add_argument("--timeout", type=float, default=120.0,
                          help="seconds each component may take to become healthy (default 120)")  # fmt: skip
    stack_up.set_defaults(func=cmd_stack_up)
    stack_status = stack_verbs.add_parser("status", parents=[run_dir], help="each component: up, unhealthy or dead")
    stack_status.set_defaults(func=cmd_stack_status)
    stack_down = stack_verbs.add_parser("down", parents=[run_dir], help="stop exactly what `stack up` started")
    stack_down.add_argument("--timeout", type=float, default=15.0,
                            help="seconds each process has after SIGTERM before SIGKILL (default 15)")  # fmt: skip
    stack_down.set_defaults(func=cmd_stack_down)

    from kinema.eval.cli import add_eval_parser
    from kinema.interpret_cli import add_interpret_parser
    from kinema.video_cli import add_edit_video_parser

    add_eval_parser(sub)
    add_interpret_parser(sub)
    add_edit_video_parser(sub, parents=[remote])  # with --server: an edit_video job on the server
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    from kinema.errors import KinemaError

    try:
        args.func(args)
    except KeyboardInterrupt:
        print("kinema: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CliError, FileNotFoundError, KinemaError) as e:
        if isinstance(e, FileNotFoundError) and not isinstance(e, KinemaError):
            # kinema.repository imports torch (seconds, 370 MB): not worth it for `kinema triton`, which only
            # supervises a server, so only a FileNotFoundError pays to check for MissingWeights.
            from kinema.repository import MissingWeights

            if not isinstance(e, MissingWeights):
                raise
        print(f"kinema: error: {_message(e)}", file=sys.stderr)
        retry_after = getattr(e, "retry_after", None)
        if retry_after is not None:  # a busy server (admission control) says when to come back
            print(f"kinema: the server is busy; try again in {retry_after:g} s", file=sys.stderr)
        return _exit_code(e)
    return 0


def _message(e: Exception) -> str:
    """The one line the user sees; a server's error names the option of the field at fault."""
    field = getattr(e, "field", "")
    return f"{e} ({_OPTION_OF_FIELD.get(field, 'field ' + field)})" if field else str(e)


def _exit_code(e: Exception) -> int:
    from kinema.errors import (
        DataLoss,
        DeadlineExceeded,
        FailedPrecondition,
        InvalidInput,
        KinemaError,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
    )

    if isinstance(e, CliError):
        return e.exit_code
    if isinstance(e, Unavailable | DeadlineExceeded) or getattr(e, "retry_after", None) is not None:
        return EXIT_UNAVAILABLE
    fixable = (InvalidInput | NotFound | FailedPrecondition | ResourceExhausted | Unauthenticated | PermissionDenied
               | FileNotFoundError)  # fmt: skip
    if isinstance(e, fixable) and not isinstance(e, DataLoss):
        return EXIT_USAGE
    if isinstance(e, KinemaError) and e.metadata.get("grpc_code") == "ALREADY_EXISTS":
        return EXIT_USAGE
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
