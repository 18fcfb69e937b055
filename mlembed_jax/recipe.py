"""The recipe's trained point sets, and the one check of a requested point against them.

A 3D-ML model is trained at a set of points along three axes. Everything that names a point
(the loss, the model's exits, encode, export, the periodic evaluation) reads the sets here:
  MLL exits  layers {1, 2, 4, 8, 16, 24, 32, 40, 48} up to L, plus L itself;
  MEL ranks  {r_min, 2 r_min, 4 r_min, ...} below r_max, plus r_max (sampled with weight r);
  MRL dims   d, then min_dim * 2^k below d; dim m has weight 1 / (n sqrt(d / m)), n = 1, 2, ...
             counting from the largest dim.
This module is plain Python: data workers, configs and tools can import it without JAX.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

RECIPE_EXITS = (1, 2, 4, 8, 16, 24, 32, 40, 48)
MRL_MIN_DIM = 8  # the recipe's smallest MRL dim (loss.mrl_min_dim's default)


def recipe_exits(num_layers: int) -> tuple[int, ...]:
    """The MLL exits for a depth: recipe exits <= L, plus L."""
    return tuple(sorted({e for e in RECIPE_EXITS if e <= num_layers} | {num_layers}))


def model_exits(exits: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """A model's configured exits; () means the recipe's exits for its depth."""
    return tuple(int(e) for e in exits) if len(exits) else recipe_exits(num_layers)


def mel_rank_set(r_min: int, r_max: int) -> tuple[int, ...]:
    """{r_min, 2 r_min, 4 r_min, ...} below r_max, plus r_max: the ranks MEL samples."""
    ranks, r = [], r_min
    while r < r_max:
        ranks.append(r)
        r *= 2
    return tuple(ranks) + (r_max,)


def mrl_dims(d: int, min_dim: int = MRL_MIN_DIM) -> tuple[int, ...]:
    """MRL dims from largest to smallest: d, then min_dim * 2^k below d, descending.

    min_dim < 1 or min_dim >= d leaves only d (MRL off).
    """
    dims = []
    if min_dim >= 1:
        m = min_dim
        while m < d:
            dims.append(m)
            m *= 2
    return (d,) + tuple(reversed(dims))


def mrl_weights(d: int, min_dim: int = MRL_MIN_DIM) -> tuple[tuple[int, float], ...]:
    """((m, weight), ...) from largest m to smallest; weight = 1 / (n * sqrt(d / m))."""
    return tuple((m, 1.0 / (n * math.sqrt(d / m)))
                 for n, m in enumerate(mrl_dims(d, min_dim), start=1))


@dataclasses.dataclass(frozen=True)
class TrainedPoints:
    """The points a model was trained at. ranks is () for a plain token embedding."""

    ranks: tuple[int, ...]
    exits: tuple[int, ...]
    dims: tuple[int, ...]  # largest first
    r_max: int | None
    num_layers: int
    hidden_size: int

    @classmethod
    def of(cls, enc, mrl_min_dim: int) -> "TrainedPoints":
        """From an EncoderConfig-like object (mel, mel_r_min/max, exits, num_layers, d)."""
        return cls(ranks=mel_rank_set(enc.mel_r_min, enc.mel_r_max) if enc.mel else (),
                   exits=tuple(enc.exits), dims=mrl_dims(enc.hidden_size, mrl_min_dim),
                   r_max=enc.mel_r_max if enc.mel else None, num_layers=enc.num_layers,
                   hidden_size=enc.hidden_size)


@dataclasses.dataclass(frozen=True)
class Point:
    """One (rank, exit, dim): rank None without MEL."""

    rank: int | None
    exit: int
    dim: int


@dataclasses.dataclass(frozen=True)
class PointCheck:
    """`resolve_point`'s answer, per axis ("rank", "exit", "dim").

    point: the resolved point, None when any axis is impossible. impossible: axis -> why the
    weights cannot serve it (not an integer, outside [1, top], a rank without MEL).
    untrained: axis -> a sentence saying the value is not a trained point (also for values
    outside the bounds). Callers choose: encode refuses untrained points unless asked to
    allow them (`problems`); export refuses impossible ones and warns about untrained ones.
    """

    point: Point | None
    impossible: dict
    untrained: dict

    def problems(self, allow_untrained: bool) -> list[str]:
        """Why the point cannot be used: the impossible axes, and without allow_untrained
        the untrained ones (said as such, since the trained set is what the user can pick)."""
        out = []
        for axis in ("rank", "exit", "dim"):
            if not allow_untrained and axis in self.untrained:
                out.append(self.untrained[axis])
            elif axis in self.impossible:
                out.append(self.impossible[axis])
        return out


def _as_int(value) -> int | None:
    try:
        ok = not isinstance(value, bool) and float(value).is_integer()
    except (TypeError, ValueError):
        ok = False
    return int(value) if ok else None


def resolve_point(points: TrainedPoints, rank=None, exit=None, dim=None,
                  default_dim: int | None = None) -> PointCheck:
    """Fills None with the full model (dim: `default_dim` or d) and checks each axis against
    the weights (rank in [1, r_max], exit in [1, L], dim in [1, d]) and the trained sets."""
    impossible, untrained, values = {}, {}, {}
    if rank is not None and points.r_max is None:
        impossible["rank"] = (f"rank={rank} was given, but the model has a plain token "
                              "embedding (no MEL factors), so it has no rank to choose")
    requested = (("rank", rank, points.r_max, "r_max=", points.ranks, "a trained MEL rank"),
                 ("exit", exit, points.num_layers, "L=", points.exits,
                  "one of the model's MLL exits"),
                 ("dim", dim if dim is not None else default_dim, points.hidden_size, "d=",
                  points.dims, "one of the trained MRL dims"))
    for name, value, top, top_name, trained, what in requested:
        if top is None or value is None:  # no MEL: no rank; None: the full model
            values[name] = top
            continue
        v = _as_int(value)
        if v is None:
            impossible[name] = f"{name}={value!r} must be an integer"
            continue
        if not 1 <= v <= top:
            impossible[name] = f"{name}={v} is outside [1, {top_name}{top}]"
        if v not in trained:
            untrained[name] = f"{name}={v} is not {what} {tuple(sorted(trained))}"
        values[name] = v
    point = None if impossible else Point(values["rank"], values["exit"], values["dim"])
    return PointCheck(point, impossible, untrained)
