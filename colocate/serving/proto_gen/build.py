"""Regenerate colocate_pb2.py, colocate_pb2_grpc.py and colocate_pb2.pyi from proto/.

    python -m colocate.serving.proto_gen.build      (or: make proto)

protoc is run with `-I proto`, so the descriptor keeps its canonical name
"colocate/v1/colocate.proto" (what reflection and importing .proto files see).
The price is that protoc's Python plugin assumes the module lives at
`colocate.v1.colocate_pb2`, a package that does not exist (and whose top name
`colocate` is this very package): colocate_pb2_grpc.py imports it from there,
and colocate_pb2.py names it as the messages' __module__ (which pickle, and so
Ray, uses to find the class again). The stubs are therefore generated into a
scratch directory, those two spellings are rewritten to this package, and the
files are moved here. Each rewrite must match exactly once, so a grpcio-tools
release that changes the generated code fails loudly instead of shipping a
broken module.
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
PROTO_FILE = "colocate/v1/colocate.proto"
PACKAGE = "colocate.serving.proto_gen"

_GENERATED_MODULE = "colocate.v1.colocate_pb2"
_REWRITES = {
    # file: (pattern, replacement)
    "colocate_pb2_grpc.py": (r"^from colocate\.v1 import colocate_pb2 as (\w+)$",
                             rf"from {PACKAGE} import colocate_pb2 as \1"),
    "colocate_pb2.py": (rf"^(_builder\.BuildTopDescriptorsAndMessages\(DESCRIPTOR, )"
                        rf"'{re.escape(_GENERATED_MODULE)}'",
                        rf"\1'{PACKAGE}.colocate_pb2'"),
}


def _run_protoc(out: Path) -> None:
    from grpc_tools import protoc   # a dev dependency, needed only here

    include = Path(protoc.__file__).resolve().parent / "_proto"   # well-known types
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            str(PROTO_ROOT / PROTO_FILE)]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO_FILE}")


def _rewrite(path: Path) -> None:
    pattern, replacement = _REWRITES[path.name]
    fixed, n = re.subn(pattern, replacement, path.read_text(), flags=re.MULTILINE)
    if n != 1:
        raise SystemExit(f"{path.name}: expected one match of {pattern!r}, found {n}; "
                         "update build.py for this grpcio-tools release")
    path.write_text(fixed)


def build(out_dir: Path = HERE) -> list[Path]:
    """Generate the three files into out_dir (a test generates elsewhere and
    compares, to catch checked-in code that is stale)."""
    with tempfile.TemporaryDirectory() as tmp:
        _run_protoc(Path(tmp))
        generated = Path(tmp) / "colocate" / "v1"
        for name in _REWRITES:
            _rewrite(generated / name)
        written = []
        for name in ("colocate_pb2.py", "colocate_pb2.pyi", "colocate_pb2_grpc.py"):
            shutil.copyfile(generated / name, Path(out_dir) / name)
            written.append(Path(out_dir) / name)
        return written


def main() -> int:
    for path in build():
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
