import pathlib
import sys

# shared test helpers (model builders, exporters) live in tests/helpers
sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))

import os

# One pytest process both compiles and loads artifacts: keep TVM's full library even when
# the runtime imports TVM first (the runtime-only check runs in a subprocess, see
# tests/runtime/test_executor.py).
os.environ.setdefault("TVM_USE_RUNTIME_LIB", "0")
