"""The GPU executor's input copy (cuda_graph.HostToDevice): arrays laid out back to back at
256-byte boundaries go in one copy; an input that is not copied from the host (a device tensor
given by the caller) splits the run, so the copy never overwrites it."""
from __future__ import annotations

from llmc.runtime.cuda_graph import copy_runs


def test_back_to_back_arrays_are_one_copy():
    # a decode step's inputs: tokens (8 B), positions (8 B), logit rows (8 B), page table (32 B), lens, starts
    items = [(0, 8), (256, 8), (512, 8), (768, 32), (1024, 4), (1280, 8)]
    assert copy_runs(items, 256) == [(0, 1288)]


def test_a_skipped_input_splits_the_run():
    items = [(0, 8), (256, 8), (768, 32)]  # the input at 512 came as a device tensor
    assert copy_runs(items, 256) == [(0, 264), (768, 800)]


def test_arrays_longer_than_the_alignment_and_empty_ones():
    items = [(0, 300), (512, 0), (512, 256), (768, 1)]
    assert copy_runs(items, 256) == [(0, 769)]
    assert copy_runs([], 256) == []
