"""The stencil patterns of the lean operator: each a tuple of ``(dy, dx)`` taps on the 3x3
footprint, in stencil order (``stencil[c, s]`` weighs tap ``s``). Plain data, here so that
the kernels' audit cases and ``lean.geometry`` share one table; ``deftnumba.lean.PATTERNS``."""

PATTERNS: dict[str, tuple[tuple[int, int], ...]] = {
    # centre, up, down, left, right: the LeanResNet 5-point star
    "star5": ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)),
    # the 4 neighbours: the centre weight is left to the pointwise diagonal
    "plus4": ((-1, 0), (1, 0), (0, -1), (0, 1)),
    # 3-point lines: left-centre-right, and up-centre-down
    "cross3h": ((0, -1), (0, 0), (0, 1)),
    "cross3v": ((-1, 0), (0, 0), (1, 0)),
    # a dense depthwise 3x3, row by row
    "full9": tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)),
}
