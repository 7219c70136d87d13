import os

# TVM sizes its CPU thread pool to half the logical cores on x86 (it assumes SMT), i.e. one
# thread on a 2-core VM; use them all so parallel schedules are exercised (and raced).
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
