"""The torch.export frontend: an `nn.Module` -> llmc `Graph` with symbolic batch/seq dims.

    graph = from_torch(model, (), {"input_ids": ids, "attention_mask": mask, "use_cache": False})

The model is exported with `torch.export.export(..., strict=False)` (the training-IR
ATen graph, no decompositions) and each FX node is converted by the per-op rules in
`aten_rules.RULES` (driven by `torch_convert.Converter`). Only nodes the user outputs depend on are converted, so asserts and
dead code vanish. Shapes come from the exported program's sympy expressions: input dims
become `SymExpr` variables named after their `torch.export.Dim`, with the bounds of the
program's range constraints; every converted node is checked against torch's own
(fake-tensor) shape and dtype for that node.

Example inputs: torch.export specializes any example dim of size 0 or 1 to a constant.
With the default dynamic shapes, an example whose batch or sequence dim is 1 is therefore
tiled to 2 along that dim before export (`torch.cat([x, x], dim)`): the repeated rows
are still valid inputs (token ids stay in range, masks stay masks), every input is tiled
the same way so their dims still agree, and the graph keeps the dim symbolic and still
accepts 1. Size 0 cannot be tiled and raises a clear error. Tiling is done on the
examples only, never on the model, so the captured graph is the same as with a size-2
example. (Exporting the size-1 example as it is would fix the dim to 1: the graph would
accept nothing else.)

Caches: Hugging Face models whose config says `use_cache=True` would build a
`DynamicCache` during capture, which llmc cannot convert. `from_torch` passes
`use_cache=False` when `forward` takes it and the caller did not set it, and turns
`config.use_cache` off on every submodule for the capture (restored afterwards), so
wrapper modules around a Hugging Face model are covered too.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from typing import Any, Mapping

import torch
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from ...errors import LLMCError
from ..ir import Graph
from ..symbolic import SymDim
from .moe_capture import use_exportable_experts
from .torch_convert import ConversionError, Converter

__all__ = ["DEFAULT_DIM_BOUNDS", "ConversionError", "default_dynamic_shapes", "from_torch"]

DEFAULT_DIM_BOUNDS: dict[str, tuple[int, int]] = {"batch": (1, 64), "seq": (1, 512)}


def from_torch(model: torch.nn.Module, example_args: tuple = (), example_kwargs: dict | None = None, *,
               dynamic_shapes=None, dim_bounds: dict[str, tuple[int, int]] | None = None) -> Graph:
    """Export `model` with torch.export and convert it to an llmc Graph.

    Tensor inputs become graph inputs named after their argument; parameters, buffers and
    lifted constants become weights named by their state-dict names; non-tensor arguments
    (``use_cache=False``) are baked in. Outputs are the flattened user outputs in the
    model's order, named from the output pytree (``logits``, ``last_hidden_state``, ...).

    dynamic_shapes: as for torch.export (use None for non-tensor arguments). By default,
    dim 0 of every tensor input of rank >= 2 is ``batch`` and dim 1 is ``seq``, with the
    bounds of DEFAULT_DIM_BOUNDS, overridable through ``dim_bounds={"seq": (1, 2048)}``.
    Examples with batch or seq 1 are tiled to 2 for the capture (see the module
    docstring); use_cache is turned off for the capture. If
    the model only supports narrower default dims (seq <= max_position_embeddings, say),
    torch's suggested bounds are taken, with a warning; the graph's symbols record them.
    The graph is an inference graph: the model is exported in eval mode, dropout is dropped.
    """
    example_args = tuple(example_args)
    example_kwargs = _without_cache(model, example_args, dict(example_kwargs or {}))
    default = dynamic_shapes is None
    if not default and dim_bounds:
        raise ValueError("dim_bounds only applies to the default dynamic shapes; put bounds in your Dims")
    bounds = _default_bounds(dim_bounds)
    if default:
        example_args, example_kwargs = tile_unit_dims(example_args, example_kwargs)
    was_training = model.training
    model.eval()
    cache_flags = _disable_config_cache(model)
    restore_experts = use_exportable_experts(model)  # HF MoE blocks in their traceable form
    try:
        for attempt in range(2):
            if default:
                dynamic_shapes = default_dynamic_shapes(model, example_args, example_kwargs, bounds)
            try:
                ep = torch.export.export(model, example_args, example_kwargs, dynamic_shapes=dynamic_shapes,
                                         strict=False)
                break
            except Exception as e:
                narrowed = _suggested_bounds(str(e), bounds) if default and attempt == 0 else None
                if narrowed is None:
                    hint = (" (narrow the default dims with dim_bounds={'seq': (lo, hi)})"
                            if default and "Constraints violated" in str(e) else "")
                    raise LLMCError(f"torch.export failed on {type(model).__name__}{hint}: {e}") from e
                warnings.warn(f"from_torch: the model only supports {narrowed} (requested {bounds}); "
                              "exporting with the narrower bounds", stacklevel=2)
                bounds = narrowed
    finally:
        model.train(was_training)
        for config, value in cache_flags:
            config.use_cache = value
        restore_experts()
    dim_specs = _dim_specs(model, example_args, example_kwargs, dynamic_shapes)
    graph = Converter(ep, _user_leaves(ep, example_args, example_kwargs), dim_specs).convert()
    if default:  # a dim fixed at one size (batch (1, 1)) was exported as [lo, lo + 1]: record [lo, lo]
        fixed = {n: SymDim(n, s.lo, min(s.hi, bounds[n][1])) for n, s in graph.symbols.items()
                 if n in bounds and bounds[n][0] == bounds[n][1]}
        if fixed:
            graph = dataclasses.replace(graph, symbols={**graph.symbols, **fixed})
    return graph


def _without_cache(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """kwargs plus use_cache=False when forward takes `use_cache` and the caller left it unset."""
    try:
        signature = inspect.signature(model.forward)
        params, bound = signature.parameters, signature.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):  # builtins without a signature, or arguments that do not bind
        return kwargs
    if "use_cache" in params and "use_cache" not in bound:
        return {**kwargs, "use_cache": False}
    return kwargs


def _disable_config_cache(model: torch.nn.Module) -> list:
    """Set `config.use_cache = False` on every submodule's config; returns what to restore."""
    changed, seen = [], set()
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is None or id(config) in seen or getattr(config, "use_cache", None) is not True:
            continue
        seen.add(id(config))
        changed.append((config, True))
        config.use_cache = False
    return changed


def tile_unit_dims(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Examples whose default-dynamic dims (0 = batch, 1 = seq of rank>=2 tensors) have
    size 1, tiled to size 2 along those dims so torch.export keeps them symbolic."""
    def tile(v):
        if not isinstance(v, torch.Tensor) or v.dim() < 2:
            return v
        for axis in (0, 1):
            if v.shape[axis] == 1:
                v = torch.cat([v, v], dim=axis)
        return v

    return pytree.tree_map(tile, args), pytree.tree_map(tile, kwargs)


def _default_bounds(dim_bounds) -> dict[str, tuple[int, int]]:
    bounds = dict(DEFAULT_DIM_BOUNDS)
    for name, b in (dim_bounds or {}).items():
        if name not in bounds:
            raise ValueError(f"dim_bounds: unknown dim {name!r} (the default dims are {sorted(bounds)})")
        bounds[name] = (int(b[0]), int(b[1]))
    return bounds


def _suggested_bounds(message: str, bounds: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]] | None:
    """torch's "Suggested fixes: seq = Dim('seq', max=128)" applied to the default dims, if
    every suggestion narrows one of them to a smaller, non-empty range; else None."""
    if "Suggested fixes" not in message:
        return None
    fixes = message.split("Suggested fixes", 1)[1].split("\n\n", 1)[0]
    out = dict(bounds)
    found = False
    for line in fixes.splitlines()[1:]:
        line = line.strip()
        if not line:
            continue
        m = re.fullmatch(r"(\w+) = Dim\('(\w+)'((?:, (?:min|max)=\d+)*)\)", line)
        if not m or m.group(1) not in bounds:
            return None  # a suggestion we cannot apply (a constant, a derived dim, ...)
        lo, hi = bounds[m.group(1)]
        for key, v in re.findall(r"(min|max)=(\d+)", m.group(3)):
            lo, hi = (max(lo, int(v)), hi) if key == "min" else (lo, min(hi, int(v)))
        if lo > hi:
            return None
        out[m.group(1)] = (lo, hi)
        found = True
    return out if found and out != bounds else None


def default_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict,
                           dim_bounds: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """{arg name: spec}: dims 0/1 of every rank>=2 tensor are `batch`/`seq`, others static."""
    bounds = _default_bounds(dim_bounds)
    # batch, seq; torch's Dim needs min < max, so a dim fixed at one size is exported as
    # [lo, lo + 1] and from_torch records [lo, lo] in the graph's symbols
    dims = [Dim(name, min=lo, max=max(hi, lo + 1)) for name, (lo, hi) in bounds.items()]
    arguments = inspect.signature(model.forward).bind(*args, **kwargs).arguments

    def spec(path, v):
        if not isinstance(v, torch.Tensor) or v.dim() < 2:
            return None
        for axis, d in enumerate(dims):
            if v.shape[axis] < 2:  # from_torch tiles size 1 to 2 (tile_unit_dims); 0 cannot be tiled
                raise LLMCError(
                    f"example input {pytree.keystr(path) or 'argument'} has shape {tuple(v.shape)}: torch.export "
                    f"specializes dims of size 0/1, so give an example with {d.__name__} >= 1 "
                    f"(the exported graph accepts {d.__name__} in [{d.min}, {d.max}])")
        return {0: dims[0], 1: dims[1]}

    return {name: pytree.tree_map_with_path(lambda p, v, n=name: spec((pytree.MappingKey(n),) + p, v), value)
            for name, value in arguments.items()}


def _dim_specs(model, args, kwargs, dynamic_shapes) -> dict[int, dict[int, Any]]:
    """id(example tensor) -> {axis: torch Dim} by walking the inputs with dynamic_shapes."""
    out: dict[int, dict[int, Any]] = {}

    def walk(value, spec):
        if spec is None:
            return
        if isinstance(value, torch.Tensor):
            items = spec.items() if isinstance(spec, Mapping) else enumerate(spec) if isinstance(spec, (list, tuple)) else ()
            out[id(value)] = {int(a): d for a, d in items if hasattr(d, "__name__")}
        elif isinstance(value, Mapping) and isinstance(spec, Mapping):
            for k, v in value.items():
                walk(v, spec.get(k))
        elif isinstance(value, (list, tuple)) and isinstance(spec, (list, tuple)):
            for v, s in zip(value, spec):
                walk(v, s)

    try:
        arguments = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError:
        return out
    if isinstance(dynamic_shapes, Mapping):
        for name, value in arguments.items():
            walk(value, dynamic_shapes.get(name))
    elif isinstance(dynamic_shapes, (list, tuple)):
        for value, spec in zip(arguments.values(), dynamic_shapes):
            walk(value, spec)
    return out


def _user_leaves(ep: ExportedProgram, args: tuple, kwargs: dict) -> list:
    """The example leaves, in the exported program's user-input order."""
    try:
        kw_spec = ep.call_spec.in_spec.children()[1]
        kwargs = {k: kwargs[k] for k in kw_spec.context}
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    return pytree.tree_leaves((args, kwargs))
