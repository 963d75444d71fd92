"""Settings come from flags, then KUROSHIO_* variables, then the optional TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.config import load_settings


@pytest.fixture(autouse=True)
def no_settings_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_settings exports the file it is given (for the worker processes); recording a
    value first makes the monkeypatch remove that export after the test, so later tests'
    servers do not read this test's file."""
    monkeypatch.setenv("KUROSHIO_CONFIG_FILE", "recorded")
    monkeypatch.delenv("KUROSHIO_CONFIG_FILE")


def test_precedence_flags_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "kuroshio.toml"
    config.write_text('port = 9000\nhost = "0.0.0.0"\ndata_dir = "/srv/k"\npublic_base_url = "https://fhir.example.org/"\n')
    monkeypatch.setenv("KUROSHIO_PORT", "9100")
    settings = load_settings(config, port=None, dicom_port=104)
    assert settings.port == 9100  # the variable beats the file
    assert settings.host == "0.0.0.0"  # from the file
    assert settings.data_dir == Path("/srv/k")
    assert settings.dicom_port == 104  # the flag
    assert settings.fhir_base == "https://fhir.example.org/fhir"
    assert load_settings(config, port=9200).port == 9200  # the flag beats the variable


def test_defaults_and_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KUROSHIO_PORT", "KUROSHIO_HOST", "KUROSHIO_PUBLIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert (settings.host, settings.port, settings.dicom_port) == ("127.0.0.1", 8080, 11112)
    assert settings.data_dir == Path("kuroshio-data")
    assert settings.fhir_base == "http://127.0.0.1:8080/fhir"


def test_invalid_settings_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        load_settings(port=70000)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_setting = 1\n")
    with pytest.raises(ValidationError):
        load_settings(bad)
