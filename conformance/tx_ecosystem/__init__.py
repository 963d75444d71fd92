"""The HL7 terminology ecosystem test suite, run against any FHIR base URL."""
