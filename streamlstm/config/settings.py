"""All settings in one model: the sections, the checks across them, the derived topic names,
and where values come from (CLI overrides > environment > ``--config`` file > defaults)."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from pydantic import model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from streamlstm.config.sections import (
    DriftSettings,
    EngineSettings,
    KafkaSettings,
    LogSettings,
    MetricsSettings,
    ModelSettings,
    StateSettings,
    TrainingSettings,
)


class Settings(BaseSettings):
    """All settings of streamlstm."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMLSTM_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    model: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    state: StateSettings = StateSettings()
    training: TrainingSettings = TrainingSettings()
    drift: DriftSettings = DriftSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.training.burn_in >= self.training.window:
            raise ValueError("training.burn_in: must be smaller than training.window")
        if self.engine.max_batch > self.state.max_keys:
            raise ValueError("engine.max_batch: must not exceed state.max_keys")
        k = self.kafka
        if self.model_topic in (k.input_topic, k.output_topic, k.dead_letter_topic):
            raise ValueError(
                f"training.model_topic: must differ from the kafka topics ({self.model_topic!r})"
            )
        if self.state.changelog_topic and self.state.changelog_topic == self.kafka.input_topic:
            raise ValueError("state.changelog_topic: must not be kafka.input_topic")
        return self

    # The state and model topics belong to one consumer group (a job), as Kafka Streams
    # names changelogs after its application id: two groups reading the same input (a
    # staging copy, a second model) must never restore each other's rows or weights.

    @property
    def model_topic(self) -> str:
        """``training.model_topic``, else ``<kafka.group_id>.<kafka.input_topic>.model``."""
        k = self.kafka
        return self.training.model_topic or f"{k.group_id}.{k.input_topic}.model"

    @property
    def changelog_topic(self) -> str | None:
        """The state changelog topic, None when ``state.changelog`` is off."""
        if not self.state.changelog:
            return None
        k = self.kafka
        return self.state.changelog_topic or f"{k.group_id}.{k.input_topic}.state"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # CLI overrides (init) > environment > config file > defaults; no .env files.
        return (init_settings, env_settings, _FileSource(settings_cls, _FILE_DATA.get() or {}))


class _FileSource(PydanticBaseSettingsSource):
    """The parsed ``--config`` file as a settings source (below the environment)."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._data


_FILE_DATA: ContextVar[dict[str, Any] | None] = ContextVar("streamlstm_config_file", default=None)
