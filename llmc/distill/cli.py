"""`llmc distill`'s arguments and command. Importing this module loads neither torch nor
transformers (llmc/cli.py builds every subcommand's parser on each call); they load when
the command runs.

Options the user does not give are absent from the parsed namespace (argparse.SUPPRESS):
DistillConfig supplies their defaults, and a --resume checks only the given ones against
its checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses

from .config import DistillConfig

_D = DistillConfig(teacher="", output="", data="")  # the defaults, for the help text


def _keep(spec: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in spec.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected comma-separated layer indices, e.g. 0,2,5") from None


def add_parser(sub, fmt) -> None:
    d = sub.add_parser("distill", formatter_class=fmt,
                       help="train a smaller student (fewer layers, optionally narrower) to match a causal LM",
                       description="Build a student from TEACHER's layers and train it to match TEACHER on --data "
                                   "(see docs/distill.md). Writes a Hugging Face folder that `llmc compile` takes.")
    S = argparse.SUPPRESS
    d.add_argument("teacher", help="Hugging Face causal LM folder (config.json, safetensors, tokenizer)")
    d.add_argument("-o", "--output", required=True, help="student folder to write (new or empty; or a run's folder "
                                                         "with --resume)")
    d.add_argument("--data", required=True, help="UTF-8 text file to train on")
    d.add_argument("--heldout", default=S, help="UTF-8 text file for held-out perplexity (default: the last "
                                                f"{_D.heldout_fraction:.0%}% of --data, not trained on)")
    shape = d.add_mutually_exclusive_group()
    shape.add_argument("--layers", type=int, default=S, help="keep this many teacher layers, the most important by "
                                                             "--importance (default: half)")
    shape.add_argument("--keep", type=_keep, default=S, metavar="I,J,...", help="keep these teacher layers (0-based, "
                                                                              "increasing)")
    d.add_argument("--width-ratio", type=float, default=S, help="fraction of MLP channels and KV head groups kept in "
                                                                "each layer, by activation statistics (default 1: all)")
    d.add_argument("--importance", choices=["loss", "cosine"], default=S,
                   help="layer score: loss rise when the layer is skipped, or 1 - cos(layer input, output) "
                        f"(default {_D.importance})")
    d.add_argument("--loss", choices=["kd", "ce"], default=S,
                   help="kd: KL on logits + hidden-state MSE + --ce-weight x next-token loss; ce: the plain "
                        f"next-token loss, the baseline (default {_D.loss})")
    d.add_argument("--temperature", type=float, default=S, help=f"KD temperature (default {_D.temperature})")
    d.add_argument("--kd-weight", type=float, default=S, help=f"weight of the logit KL (default {_D.kd_weight})")
    d.add_argument("--hidden-weight", type=float, default=S,
                   help=f"weight of the hidden-state MSE (default {_D.hidden_weight})")
    d.add_argument("--ce-weight", type=float, default=S,
                   help=f"weight of the next-token loss added to --loss kd (default {_D.ce_weight})")
    d.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default=S,
                   help="the teacher's forward pass while training: bfloat16 is ~3.5x faster on CPUs with bf16 "
                        f"matrix units (AMX) and GPUs; the student stays float32 (default {_D.teacher_dtype})")
    d.add_argument("--steps", type=int, default=S, help=f"training steps; 0 writes the pruned student untrained "
                                                        f"(default {_D.steps})")
    d.add_argument("--time-limit", type=float, default=S, metavar="SECONDS",
                   help="stop after this much training time (the schedule anneals to fit it)")
    d.add_argument("--seq-len", type=int, default=S, help=f"tokens per training window (default {_D.seq_len})")
    d.add_argument("--batch", type=int, default=S, help=f"windows per step (default {_D.batch})")
    d.add_argument("--lr", type=float, default=S, help=f"peak AdamW learning rate (default {_D.lr})")
    d.add_argument("--warmup", type=int, default=S, help=f"linear warmup steps (default {_D.warmup})")
    d.add_argument("--schedule", choices=["cosine", "linear"], default=S,
                   help=f"decay after warmup, to {_D.min_lr_ratio} x --lr (default {_D.schedule})")
    d.add_argument("--weight-decay", type=float, default=S, help=f"AdamW weight decay (default {_D.weight_decay})")
    d.add_argument("--seed", type=int, default=S, help=f"seed of batch order and calibration (default {_D.seed})")
    d.add_argument("--eval-every", type=int, default=S,
                   help=f"held-out perplexity every N steps (default {_D.eval_every})")
    d.add_argument("--checkpoint-every", type=int, default=S,
                   help=f"checkpoint every N steps (default {_D.checkpoint_every}; also at the end and on Ctrl-C)")
    d.add_argument("--resume", action="store_true", default=S, help="continue the run in --output from its last "
                                                                    "checkpoint")
    d.set_defaults(fn=cmd_distill)


def cmd_distill(a: argparse.Namespace) -> int:
    from .run import distill

    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    given = {k: v for k, v in vars(a).items() if k in fields}
    distill(DistillConfig(**given), given={k: v for k, v in given.items() if k not in ("teacher", "output")})
    return 0
