"""Regenerate the gRPC Python code in this directory from proto/.

    python -m colocate.service.proto_gen.build      (or: make proto)

One command for every .proto in PROTOS: colocate/v1/colocate.proto (the
Generation service) and grpc/health/v1/health.proto (the standard health
service, kept here so that no extra pip package is needed). Each gives
NAME_pb2.py, NAME_pb2.pyi and NAME_pb2_grpc.py.

protoc is run with `-I proto`, so each descriptor keeps its canonical name
("colocate/v1/colocate.proto", "grpc/health/v1/health.proto"), which is what
reflection, grpcurl and other languages see. The price is that protoc's Python
plugin assumes the module lives at the proto's own path (`colocate.v1`,
`grpc.health.v1`): packages that do not exist, and whose top names are this
package and grpcio. NAME_pb2_grpc.py imports NAME_pb2 from there, and
NAME_pb2.py names it as the messages' __module__ (which pickle, and so Ray,
uses to find the class again). So the code is generated into a scratch
directory, those two spellings are rewritten to this package, and the files are
moved here. Each rewrite must match exactly once, so a grpcio-tools release
that changes the generated code fails loudly instead of shipping a broken module.

Keeping the canonical name has one more consequence: grpcio-health-checking's
grpc_health.v1.health_pb2 registers the same file in protobuf's default pool,
so importing both in one process fails unless the two descriptors are
byte-identical. colocate never imports that package.
"""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PROTO_ROOT = REPO / "proto"
PROTOS = ("colocate/v1/colocate.proto", "grpc/health/v1/health.proto")
PACKAGE = "colocate.service.proto_gen"


def _run_protoc(out: Path) -> None:
    from grpc_tools import protoc   # a dev dependency, needed only here

    include = Path(protoc.__file__).resolve().parent / "_proto"   # well-known types
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            *(str(PROTO_ROOT / proto) for proto in PROTOS)]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(PROTOS)}")


def _rewrite(path: Path, pattern: str, replacement: str) -> None:
    fixed, n = re.subn(pattern, replacement, path.read_text(), flags=re.MULTILINE)
    if n != 1:
        raise SystemExit(f"{path.name}: expected one match of {pattern!r}, found {n}; "
                         "update build.py for this grpcio-tools release")
    path.write_text(fixed)


def _fix_imports(generated: Path, proto: str) -> None:
    """Point the generated module at this package instead of the proto's path."""
    stem = Path(proto).stem + "_pb2"                      # e.g. health_pb2
    origin = ".".join(Path(proto).parent.parts)           # e.g. grpc.health.v1
    _rewrite(generated / f"{stem}_grpc.py",
             rf"^from {re.escape(origin)} import {stem} as (\w+)$",
             rf"from {PACKAGE} import {stem} as \1")
    _rewrite(generated / f"{stem}.py",
             rf"^(_builder\.BuildTopDescriptorsAndMessages\(DESCRIPTOR, )"
             rf"'{re.escape(origin)}\.{stem}'",
             rf"\1'{PACKAGE}.{stem}'")


def build(out_dir: Path = HERE) -> list[Path]:
    """Generate every file into out_dir (a test generates elsewhere and
    compares, to catch checked-in code that is stale)."""
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        _run_protoc(Path(tmp))
        for proto in PROTOS:
            generated = Path(tmp) / Path(proto).parent
            _fix_imports(generated, proto)
            stem = Path(proto).stem + "_pb2"
            for name in (f"{stem}.py", f"{stem}.pyi", f"{stem}_grpc.py"):
                shutil.copyfile(generated / name, Path(out_dir) / name)
                written.append(Path(out_dir) / name)
    return written


def main() -> int:
    for path in build():
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
