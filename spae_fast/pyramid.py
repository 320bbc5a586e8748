"""The SPAE token pyramid: which latent positions each layer samples and which grid cells its tokens cover.

SPAE-METHOD.md §2 (paper Eq. 1, dilated subsampling). Layer l (1-based) of side ``s_l`` on a ``g x g`` latent
grid has stride ``t_l = g / s_l``; token ``(i, j)`` of the layer sits at the latent position

    (t_l * i + o_l,  t_l * j + o_l)      with offset  o_l = t_l - ceil(t_l / 2),   i, j = 0 .. s_l - 1

(on 16 x 16 with sides 1, 2, 4, 8, 16: rows {8}; {4, 12}; {2, 6, 10, 14}; {1, 3, ..., 15}; all) and covers
the ``t_l x t_l`` block of grid cells ``[t_l i, t_l (i + 1)) x [t_l j, t_l (j + 1))`` (nearest upsampling):
the token of layer m covering cell q is ``ids_m[q_y // t_m, q_x // t_m]``. Layers are serialised layer after
layer, raster order inside a layer; layer l's tokens occupy columns ``[first_l, first_l + s_l^2)`` of the
``[B, total]`` id matrix (running totals 1, 5, 21, 85, 341, 597 for the default pyramid).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence

DEFAULT_LAYERS = (1, 2, 4, 8, 16, 16)
DEFAULT_GRID = 16


def _kind(value: object) -> str:
    name = "bool" if isinstance(value, bool) else type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def check_sides(layers: object, name: str = "layers") -> tuple[int, ...]:
    """``layers`` as a tuple of ints: a non-empty sequence (list, tuple, range, 1-D array) of positive ints.

    TypeError for anything else (a bare int, a string, floats such as 1.9 that would have to be truncated,
    bools), ValueError for an empty sequence or a side < 1. `TokenPyramid` checks its sides with this, so
    `spae_fast.saq` and `SPAEQuantizer` (which build one) reject bad layers with the same message.
    """
    expected = f"{name} must be a non-empty sequence of positive ints (the layer sides, e.g. (1, 2, 4, 8))"
    if hasattr(layers, "tolist") and not isinstance(layers, Sequence):  # a numpy array or torch tensor
        layers = layers.tolist()
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"{expected}, got {layers!r} ({_kind(layers)})")
    sides = []
    for index, side in enumerate(layers):
        # operator.index accepts int and numpy ints but not floats (never truncate 1.9 to 1); bool is an int
        # subclass that is never meant as a side
        try:
            if isinstance(side, bool) or type(side).__name__ == "bool_":
                raise TypeError
            sides.append(operator.index(side))
        except TypeError:
            raise TypeError(f"{expected}, got {list(layers)!r}: {name}[{index}] = {side!r} is {_kind(side)}") from None
    if not sides:
        raise ValueError(f"{expected}, got an empty {type(layers).__name__}")
    for index, side in enumerate(sides):
        if side < 1:
            raise ValueError(f"{expected}, got {sides}: {name}[{index}] (layer {index + 1}) = {side} is not positive")
    return tuple(sides)


@dataclasses.dataclass(frozen=True)
class TokenPyramid:
    """Geometry of a token pyramid: layer sides (non-decreasing, each dividing ``grid``) on a square grid.

    ``sides`` may be any sequence of positive ints (`check_sides`); it is stored as a tuple."""

    sides: tuple[int, ...] = DEFAULT_LAYERS
    grid: int = DEFAULT_GRID

    def __post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"grid must be a positive int, got {self.grid!r}")
        sides = check_sides(self.sides)
        for layer, side in enumerate(sides, 1):
            if self.grid % side:
                raise ValueError(
                    f"grid {self.grid} is not divisible by layers[{layer - 1}] = {side} (layer {layer}); every "
                    f"layer side must divide the grid"
                )
        for layer in range(1, len(sides)):
            if sides[layer] < sides[layer - 1]:
                raise ValueError(
                    f"layers must be non-decreasing (coarse to fine), got {sides}: layer {layer + 1} has side "
                    f"{sides[layer]} < {sides[layer - 1]}"
                )
        object.__setattr__(self, "sides", sides)

    @property
    def num_layers(self) -> int:
        return len(self.sides)

    def stride(self, layer: int) -> int:
        """``t_l = g / s_l`` of 0-based ``layer``."""
        return self.grid // self.sides[layer]

    def offset(self, layer: int) -> int:
        """``o_l = t_l - ceil(t_l / 2)``: the sampled row / col inside each ``t_l x t_l`` block."""
        stride = self.stride(layer)
        return stride - (stride + 1) // 2

    def positions(self, layer: int) -> list[int]:
        """Sampled rows (= cols) of 0-based ``layer``: ``t_l * i + o_l`` for ``i < s_l``."""
        stride, offset = self.stride(layer), self.offset(layer)
        return [stride * i + offset for i in range(self.sides[layer])]

    def counts(self) -> list[int]:
        """Tokens per layer, ``s_l^2``."""
        return [side * side for side in self.sides]

    def first(self, layer: int) -> int:
        """Column of 0-based ``layer``'s first token in the ``[B, total]`` id matrix."""
        return sum(self.counts()[:layer])

    def total(self, num_layers: int | None = None) -> int:
        """Tokens in the first ``num_layers`` layers (all by default)."""
        return sum(self.counts()[: self.num_layers if num_layers is None else num_layers])

    def prefix_layers(self, num_tokens: int) -> int:
        """The number of layers whose tokens add up to ``num_tokens`` (a running total), else ValueError."""
        running = 0
        for layer, count in enumerate(self.counts(), 1):
            running += count
            if running == num_tokens:
                return layer
        totals = [self.total(n) for n in range(1, self.num_layers + 1)]
        raise ValueError(f"{num_tokens} tokens is not a whole prefix of layers; valid lengths are {totals}")

    def check_num_layers(self, num_layers: int | None) -> int:
        if num_layers is None:
            return self.num_layers
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= self.num_layers:
            raise ValueError(f"num_layers must be an int in [1, {self.num_layers}], got {num_layers!r}")
        return num_layers
