"""jaxtyping annotations on public tensor signatures are checked (beartype) during the tests."""

import pytest
import torch

from modlora.pissa import direction_scores, select_directions


def test_shape_annotations_are_enforced():
    # s has k=3 entries but vh has k=4 rows: the "k" axes disagree.
    with pytest.raises(TypeError, match="direction_scores"):
        direction_scores("s_only", torch.ones(3), torch.ones(4, 5), None)


def test_dtype_annotations_are_enforced():
    with pytest.raises(TypeError, match="select_directions"):
        select_directions(torch.ones(3, dtype=torch.int64), 2)
