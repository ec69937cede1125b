"""Generates the Python gRPC modules from `protos/` (`make protos`); the staleness test runs the same code.

Each `protos/kinema/<svc>/v1/<svc>.proto` becomes `kinema.<svc>.v1.<svc>_pb2` (messages), `_pb2.pyi` (types)
and `_pb2_grpc` (stubs and servicers), which import each other as `from kinema.common.v1 import common_pb2`.
The output is checked in, so it only changes when a proto or the pinned grpcio-tools does.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

# shared/kinema/rpc/protos.py -> the repository root; only meaningful in a source checkout (editable install).
REPO = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO / "protos"
OUT_DIR = REPO / "shared"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto under `proto_root`, sorted so the generation order is the same everywhere."""
    return sorted(proto_root.rglob("*.proto"))


def generated_names(proto: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The module paths protoc writes for `proto`, relative to the output directory."""
    stem = proto.relative_to(proto_root).with_suffix("")
    return [stem.with_name(stem.name + suffix) for suffix in SUFFIXES]


def generate(out_dir: Path = OUT_DIR, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Runs protoc over every proto into `out_dir`; returns the generated module files.

    Also creates an empty `__init__.py` in each package directory below `out_dir/kinema` that holds
    generated modules (`kinema/<svc>/` and `kinema/<svc>/v1/`) and lacks one, so they are regular packages.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = _protoc(proto_root, f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}")
    files = [out_dir / name for proto in protos for name in generated_names(proto, proto_root)]
    root = out_dir / "kinema"  # the library's own package: never touched
    for package in sorted({f.parent for f in files} | {f.parent.parent for f in files}):
        init = package / "__init__.py"
        if package != root and package.is_relative_to(root) and not init.exists():
            init.touch()
    return files


def describe(proto_root: Path, out: Path) -> descriptor_pb2.FileDescriptorSet:
    """Every proto's descriptor with its source comments (protoc --include_source_info), written to `out`."""
    _protoc(proto_root, f"--descriptor_set_out={out}", "--include_source_info")
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _protoc(proto_root: Path, *outputs: str) -> list[Path]:
    """Runs grpcio-tools' bundled protoc over every proto with the given output flags; returns the protos."""
    protos = proto_files(proto_root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto shipped with grpcio-tools
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}", *outputs, *map(str, protos)]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc exited with {code} (its messages are above); command: {' '.join(args)}")
    return protos


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protos", type=Path, default=PROTO_ROOT, help="root of the .proto tree (the -I path)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output root; modules land in OUT/kinema/...")
    args = parser.parse_args(argv)
    for path in generate(args.out, args.protos):
        print(path)


if __name__ == "__main__":
    main()
