"""Child side of `launch(function, n)`: import a file by path and call one top-level function.

    python -m llmc.runtime.dist.call FILE QUALNAME

The file is imported under a private module name (its `if __name__ == "__main__"` block does
not run); the function reads its rank from the environment. Its return value is ignored;
an exception exits non-zero with the traceback on stderr, which the launcher reports.
"""
from __future__ import annotations

import importlib.util
import os
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m llmc.runtime.dist.call FILE QUALNAME", file=sys.stderr)
        return 2
    path, qualname = argv
    sys.path.insert(0, os.path.dirname(path))  # the file's siblings import as they would for it
    spec = importlib.util.spec_from_file_location("_llmc_dist_target", path)
    if spec is None or spec.loader is None:
        print(f"cannot import {path}", file=sys.stderr)
        return 2
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    fn = module
    for part in qualname.split("."):
        fn = getattr(fn, part)
    fn()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
