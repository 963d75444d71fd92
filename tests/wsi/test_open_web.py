"""The acceptance test of the WSI issue: wsidicom's DICOMweb client opens each stored slide
from this server (`WsiDicom.open_web`) and `read_region` returns, on every level, the same
pixels as wsidicom reading the original files locally; labels and overviews too."""

from __future__ import annotations

import numpy as np
import pytest

SLIDES = ["jpeg", "jpeg2000", "native", "no-offset-table", "sparse"]


@pytest.mark.parametrize("name", SLIDES)
def test_open_web_reads_every_level_as_the_local_files(server, stored_slides, name):
    stored = stored_slides[name]
    with stored.open_local() as local, stored.open_web(server) as web:
        assert [level.size for level in web.levels] == [level.size for level in local.levels]
        assert len(web.levels) == 4
        for level in local.levels:
            size = level.size
            expected = np.asarray(local.read_region((0, 0), level.level, (size.width, size.height)))
            actual = np.asarray(web.read_region((0, 0), level.level, (size.width, size.height)))
            assert actual.shape == expected.shape
            assert np.array_equal(actual, expected), f"level {level.level} differs"
            # a region that crosses tile borders, away from the origin
            if size.width > 300 and size.height > 300:
                box = ((size.width // 3, size.height // 4), level.level, (257, 300))
                assert np.array_equal(np.asarray(web.read_region(*box)), np.asarray(local.read_region(*box)))


def test_label_and_overview_are_served_like_any_instance(server, stored_slides):
    stored = stored_slides["jpeg"]
    with stored.open_local() as local, stored.open_web(server) as web:
        assert np.array_equal(np.asarray(web.read_label()), np.asarray(local.read_label()))
        assert np.array_equal(np.asarray(web.read_overview()), np.asarray(local.read_overview()))


def test_sparse_slide_shows_missing_tiles_blank(server, stored_slides):
    stored = stored_slides["sparse"]
    with stored.open_web(server) as web:
        tile = np.asarray(web.read_tile(0, (1, 0)))  # TILED_FULL index 1 is missing on level 0
        assert (tile == 255).all()
        present = np.asarray(web.read_tile(0, (0, 0)))
        assert not (present == 255).all()
