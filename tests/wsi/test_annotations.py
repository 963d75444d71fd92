"""Microscopy Bulk Simple Annotations (made with highdicom, in a series of their own with
modality ANN) are stored and retrieved like any instance, and wsidicom's web client finds
them beside the slide they annotate."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from tests.dicom.test_wado import parts
from tests.wsi.conftest import stow


def annotations(source: pydicom.Dataset) -> hd.ann.MicroscopyBulkSimpleAnnotations:
    group = hd.ann.AnnotationGroup(
        number=1, uid=generate_uid(), label="nuclei",
        annotated_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        annotated_property_type=codes.SCT.Nucleus,
        graphic_type=hd.ann.GraphicTypeValues.POINT,
        graphic_data=[np.array([[10.0, 20.0]]), np.array([[300.5, 400.25]]), np.array([[1200.0, 900.0]])],
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.MANUAL,
    )
    return hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source], annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=[group], series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="Kuroshio tests",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1",
    )


def test_annotations_are_stored_and_found_by_wsidicom(server, http, stored_slides):
    stored = stored_slides["jpeg"]
    base = max(stored.files, key=lambda p: p.stat().st_size)
    made = annotations(pydicom.dcmread(base, stop_before_pixels=True))
    out = io.BytesIO()
    made.save_as(out, enforce_file_format=True)
    path = base.parent / "annotations.dcm"
    path.write_bytes(out.getvalue())
    stow(server, [path])
    url = f"studies/{stored.study}/series/{made.SeriesInstanceUID}/instances/{made.SOPInstanceUID}"
    retrieved = parts(http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}))
    assert retrieved == [out.getvalue()]
    found = http.get(f"studies/{stored.study}/instances", params={"Modality": "ANN"}).json()
    assert [i["00080018"]["Value"][0] for i in found] == [made.SOPInstanceUID]
    both = http.get(f"studies/{stored.study}/instances",  # a UID key repeated is a list of UIDs
                    params=[("SeriesInstanceUID", stored.series), ("SeriesInstanceUID", made.SeriesInstanceUID)]).json()
    assert {i["0020000E"]["Value"][0] for i in both} == {stored.series, made.SeriesInstanceUID}
    with stored.open_web(server, made.SeriesInstanceUID) as web:
        groups = [group for instance in web.annotations for group in instance]
        assert [g.label for g in groups] == ["nuclei"]
        assert len(groups[0].annotations) == 3
