"""The kernels' traffic comments and ``dcn.roofline`` state the same FLOP counts.

Each kernel states its FLOPs in a comment; ``roofline.py`` computes with its own
constants. This test reads the numbers both state, so neither can drift alone.
"""

import re
from pathlib import Path

import pytest

from deftnumba.dcn import roofline

KERNELS = Path(roofline.__file__).resolve().parent / "kernels"


def _comment(module: str) -> str:
    return "\n".join(line for line in (KERNELS / module).read_text().splitlines() if line.lstrip().startswith("#"))


def _number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found, f"no comment matches {pattern!r}"
    return int(found.group(1))


@pytest.mark.parametrize("pattern, expected", [
    (r"(\d+) FLOPs per position", roofline.POSITION_FLOPS),
    (r"FLOPs: (\d+) per sample for the corner setup", roofline.CORNER_FLOPS),
    (r"corner setup, (\d+) for the interpolation", roofline.INTERP_FLOPS),
    (r"interpolation, (\d+) for the mask", roofline.MASK_FLOPS),
])
def test_im2col_comments_agree_with_roofline(pattern, expected):
    assert _number(pattern, _comment("im2col.py")) == expected


def test_fused_columns_comments_agree_with_roofline():
    text = _comment("fused_columns.py")
    per_point = _number(r"FLOPs: ~?(\d+) per \(group, tap, pixel\)", text)
    assert per_point == roofline.POSITION_FLOPS + roofline.CORNER_FLOPS
    assert _number(r"(\d+) per sample \(4 mul \+ 3 add\)", text) == roofline.INTERP_FLOPS


def test_fused_tiled_interpolation_comment_agrees_with_roofline():
    assert _number(r"~?(\d+) \* B \* N \* C \* K \* P \(interpolation\)", _comment("fused_tiled.py")) \
        == roofline.INTERP_FLOPS
