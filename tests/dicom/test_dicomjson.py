"""The fast DICOM JSON encoder produces pydicom's `to_json_dict` output on every test file
pydicom can read (bulk data aside: a BulkDataURI here may be inline there, and the other
way round for values nested in sequences)."""

from __future__ import annotations

import warnings

import pydicom

from server.dicom.dicomjson import encode
from tests.dicom.conftest import pydicom_test_files


def without_binary(value):
    if isinstance(value, dict):
        if "BulkDataURI" in value or "InlineBinary" in value:
            return "binary"
        return {k: without_binary(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_binary(v) for v in value]
    return value


def test_encoder_matches_pydicom():
    compared = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in pydicom_test_files():
            try:
                reference = pydicom.dcmread(path).to_json_dict(
                    bulk_data_element_handler=lambda _e: "bulk", bulk_data_threshold=1024
                )
            except Exception:
                continue  # not readable by pydicom either
            mine = encode(pydicom.dcmread(path)).attributes
            assert without_binary(mine) == without_binary(reference), path.name
            compared += 1
    assert compared > 150
