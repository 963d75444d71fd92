"""The query/retrieve levels (study, series, instance) and the attributes each holds.

One table serves the index (which attributes of an instance are copied to its study and
series records), QIDO-RS and C-FIND (which keys can be matched and what is returned), and
the conformance statement (which lists them), so the three cannot disagree.

Attributes are named by keyword; `TAGS` gives the tag in the DICOM JSON form ("0020000D").
Matching kinds follow PS3.4 C.2.2.2: `uid` (single value or list), `date`/`time`/
`datetime` (single value or range), `pn` (person names: wildcards, case-insensitive, with
fuzzy matching), `string` (single value or wildcards), `number` (single value).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword


@dataclass(frozen=True, slots=True)
class Key:
    keyword: str
    vr: str
    kind: str

    @property
    def tag(self) -> str:
        return TAGS[self.keyword]


def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{tag:08X}"


_KINDS = {"UI": "uid", "DA": "date", "TM": "time", "DT": "datetime", "PN": "pn", "IS": "number"}


def _keys(*pairs: tuple[str, str]) -> tuple[Key, ...]:
    return tuple(Key(keyword, vr, _KINDS.get(vr, "string")) for keyword, vr in pairs)


# Matching keys per level (PS3.18 Table 10.6.1-5 and a few more that viewers use).
STUDY_KEYS = _keys(
    ("StudyInstanceUID", "UI"), ("StudyDate", "DA"), ("StudyTime", "TM"),
    ("AccessionNumber", "SH"), ("ModalitiesInStudy", "CS"), ("ReferringPhysicianName", "PN"),
    ("PatientName", "PN"), ("PatientID", "LO"), ("IssuerOfPatientID", "LO"),
    ("PatientBirthDate", "DA"), ("PatientSex", "CS"), ("StudyID", "SH"),
    ("StudyDescription", "LO"),
)
SERIES_KEYS = _keys(
    ("SeriesInstanceUID", "UI"), ("Modality", "CS"), ("SeriesNumber", "IS"),
    ("SeriesDescription", "LO"), ("PerformedProcedureStepStartDate", "DA"),
    ("PerformedProcedureStepStartTime", "TM"), ("BodyPartExamined", "CS"),
    ("SeriesDate", "DA"),
)
INSTANCE_KEYS = _keys(
    ("SOPInstanceUID", "UI"), ("SOPClassUID", "UI"), ("InstanceNumber", "IS"),
)

# Attributes copied from an instance into its level's record and returned by default.
STUDY_ATTRIBUTES = (
    "SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "ReferringPhysicianName", "TimezoneOffsetFromUTC",
    "StudyDescription", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
    "PatientSex", "PatientAge", "StudyInstanceUID", "StudyID",
)
SERIES_ATTRIBUTES = (
    "SpecificCharacterSet", "Modality", "TimezoneOffsetFromUTC", "SeriesDescription",
    "SeriesDate", "SeriesTime", "BodyPartExamined", "Laterality", "SeriesInstanceUID",
    "SeriesNumber", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
)
INSTANCE_ATTRIBUTES = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "TimezoneOffsetFromUTC",
    "ContentDate", "ContentTime", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
    "NumberOfFrames",
)
# Attributes the server computes for each level (not copied from instances).
STUDY_COMPUTED = (
    "ModalitiesInStudy", "InstanceAvailability", "RetrieveURL", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_COMPUTED = ("InstanceAvailability", "RetrieveURL", "NumberOfSeriesRelatedInstances")
INSTANCE_COMPUTED = ("InstanceAvailability", "RetrieveURL", "AvailableTransferSyntaxUID")

TAGS: dict[str, str] = {
    keyword: _tag(keyword)
    for keyword in {
        k.keyword for k in STUDY_KEYS + SERIES_KEYS + INSTANCE_KEYS
    } | set(STUDY_ATTRIBUTES + SERIES_ATTRIBUTES + INSTANCE_ATTRIBUTES + STUDY_COMPUTED + SERIES_COMPUTED + INSTANCE_COMPUTED)
}


@dataclass(frozen=True, slots=True)
class Level:
    name: str
    keys: tuple[Key, ...]
    attributes: tuple[str, ...]
    computed: tuple[str, ...]

    @property
    def tags(self) -> frozenset[str]:
        return frozenset(TAGS[k] for k in self.attributes)


STUDY = Level("STUDY", STUDY_KEYS, STUDY_ATTRIBUTES, STUDY_COMPUTED)
SERIES = Level("SERIES", SERIES_KEYS, SERIES_ATTRIBUTES, SERIES_COMPUTED)
INSTANCE = Level("IMAGE", INSTANCE_KEYS, INSTANCE_ATTRIBUTES, INSTANCE_COMPUTED)
LEVELS = (STUDY, SERIES, INSTANCE)
