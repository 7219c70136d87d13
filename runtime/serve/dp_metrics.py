"""/metrics of a data-parallel front: the replicas' Prometheus texts summed sample by
sample (counters, gauges and histogram buckets all add up across replicas: total tokens,
total KV pages, a histogram of every replica's requests), then the front's own lines
(per-replica outstanding tokens, requests in flight, up, restarts)."""
from __future__ import annotations


def merge(texts: list[str]) -> str:
    """Sum samples of the same name and labels; HELP / TYPE lines kept once, in the order
    they first appear."""
    order: list[str] = []  # "# ..." lines and sample keys, first appearance
    seen_meta: set[str] = set()
    sums: dict[str, float] = {}
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                if line not in seen_meta:
                    seen_meta.add(line)
                    order.append(line)
                continue
            key, _, value = line.rpartition(" ")
            try:
                v = float(value)
            except ValueError:
                continue  # not a sample line we know how to add
            if key not in sums:
                sums[key] = 0.0
                order.append(key)
            sums[key] += v
    out = [x if x.startswith("#") else f"{x} {_num(sums[x])}" for x in order]
    return "\n".join(out) + ("\n" if out else "")


def _num(v: float) -> str:
    return str(int(v)) if v.is_integer() else repr(v)


def front_lines(rows: dict[str, tuple[str, str, dict[int, float]]], prefix: str = "llmc") -> str:
    """rows: name -> (type, help, {replica index: value})."""
    lines: list[str] = []
    for name, (kind, help_, per) in rows.items():
        lines += [f"# HELP {prefix}_{name} {help_}", f"# TYPE {prefix}_{name} {kind}"]
        lines += [f'{prefix}_{name}{{replica="{i}"}} {_num(float(v))}' for i, v in sorted(per.items())]
    return "\n".join(lines) + "\n"


__all__ = ["merge", "front_lines"]
