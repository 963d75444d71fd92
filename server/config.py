"""Server settings.

Every setting can come from a `KUROSHIO_*` environment variable, from an optional TOML
file (`KUROSHIO_CONFIG_FILE`, or `kuroshio serve --config`), or from a command-line flag;
flags win over variables, which win over the file. One `Settings` object is built at
start-up and handed to the app factory, so nothing reads the environment later.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KUROSHIO_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    dicom_port: int = Field(11112, ge=0, le=65535)
    dicom_ae_title: str = Field("KUROSHIO", min_length=1, max_length=16)
    # Known remote AEs (C-MOVE destinations): "AET@host:port,AET@host:port".
    dicom_remote_aes: str = ""
    # Origins allowed to call /dicomweb from a browser (comma-separated; "*" for any).
    dicomweb_cors_origins: str = ""
    data_dir: Path = Path("./kuroshio-data")
    # The address clients use to reach this server (behind a proxy it differs from
    # host:port); absolute URLs in responses (Bundle links, Location) are built from it.
    public_base_url: str | None = None
    # An external MongoDB >= 6 replica set or sharded cluster. Unset: the embedded mongod.
    mongodb_uri: str | None = None
    mongodb_database: str = "kuroshio"
    # WiredTiger cache of the embedded mongod, in GB (mongod's minimum is 0.25). Unset:
    # mongod's own default, half of (RAM - 1 GB). It also bounds how much one transaction
    # may write: a FHIR transaction Bundle too large for it is answered 413.
    mongodb_cache_size_gb: float | None = Field(None, ge=0.25, le=10_000)
    # Largest accepted request body for the FHIR API; DICOM uploads stream and have none.
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Most entries in one batch or transaction Bundle (more: 413 before any of them runs),
    # a bound on what one request may cost. Synthea's patient bundles reach about 7,400.
    bundle_max_entries: int = Field(10_000, ge=1)
    # How long an idle HTTP connection is kept open. Longer than the idle timeout of the
    # clients and load balancers in front (60 s for many): a server closing first races
    # the client's next request on that connection, which then fails with no response.
    keep_alive_seconds: int = Field(75, ge=1)
    # HTTP server processes sharing the port (one of them also runs the DIMSE AE);
    # default: one per CPU this process may run on, at most 8 (each holds ~150 MB).
    workers: int = Field(default_factory=lambda: min(len(os.sched_getaffinity(0)), 8), ge=1, le=64)
    # Worker processes for fhir.resources checks of large transactions (0: in-process).
    validation_workers: int = Field(1, ge=0, le=64)
    # Largest page a search or history request may ask for with _count.
    max_page_size: int = Field(1000, ge=1)
    default_page_size: int = Field(50, ge=1)
    # Terminology: add mapped standard codings to incoming resources (see
    # terminology/normalization.py), and the systems mappings are applied to.
    terminology_normalize: bool = True
    terminology_targets: list[str] = ["http://loinc.org", "http://snomed.info/sct"]
    # Largest $expand answered without paging (count); larger ones must be paged.
    terminology_expansion_limit: int = Field(1000, ge=1)

    @field_validator("dicom_remote_aes")
    @classmethod
    def _check_remote_aes(cls, value: str) -> str:
        from server.dicom.dimse import parse_remote_aes

        parse_remote_aes(value)
        return value

    @field_validator("public_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @property
    def base_url(self) -> str:
        """The server root as clients see it, without a trailing slash."""
        if self.public_base_url:
            return self.public_base_url
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def fhir_base(self) -> str:
        return f"{self.base_url}/fhir"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("KUROSHIO_CONFIG_FILE")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Build the settings; `overrides` are command-line flags that were actually given."""
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"settings file {config_file} does not exist")
        os.environ["KUROSHIO_CONFIG_FILE"] = str(config_file)
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
