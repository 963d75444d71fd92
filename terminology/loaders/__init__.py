"""Loaders: FHIR npm packages, LOINC, SNOMED CT (RF2 and GPS), local code tables."""
