"""Generate the Python gRPC stubs in ``learnledger/`` from ``protos/`` (never edit them by hand)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "learnledger/v1/ledger.proto"
PACKAGE_INIT = '"""Generated gRPC stubs for the learnledger protocol (see protos/ and scripts/gen_protos.py)."""\n'


def generate(out_dir: Path, proto_root: Path = ROOT / "protos") -> list[Path]:
    """Run ``grpc_tools.protoc`` on the ledger proto, writing stubs under ``out_dir``.

    Args:
        out_dir: directory that receives ``learnledger/v1/ledger_pb2*.py(i)``.
        proto_root: the ``-I`` include root holding ``learnledger/v1/ledger.proto``.

    Returns:
        The generated files (package ``__init__.py`` files included).

    Raises:
        RuntimeError: protoc reported an error.
    """
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    argv = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto_root / PROTO),
    ]
    if protoc.main(argv) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    inits = [out_dir / "learnledger" / "__init__.py", out_dir / "learnledger" / "v1" / "__init__.py"]
    for init in inits:
        init.write_text(PACKAGE_INIT)
    stem = out_dir / "learnledger" / "v1"
    return [*inits, stem / "ledger_pb2.py", stem / "ledger_pb2.pyi", stem / "ledger_pb2_grpc.py"]


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python scripts/gen_protos.py [--out DIR]`` (default: the repository root)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
