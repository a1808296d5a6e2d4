"""Settings: one pydantic model per section, loaded from defaults, a TOML file, env and CLI.

Precedence, highest first: CLI overrides (``--set section.field=value``), environment
variables ``STREAMLSTM_<SECTION>__<FIELD>``, the TOML file given with ``--config``,
then the defaults below. Every field is validated at start-up; :func:`load_settings`
raises :class:`ConfigError` with one line naming the field and what is allowed.

>>> s = load_settings(overrides={"model.hidden_size": "32"})
>>> s.model.hidden_size, s.model.num_layers, s.model.cell
(32, 2, 'lstm')
"""

from streamlstm.config.loading import format_validation_error, load_settings, parse_override
from streamlstm.config.sections import (
    ConfigError,
    DriftSettings,
    EngineSettings,
    KafkaSettings,
    LogSettings,
    MetricsSettings,
    ModelSettings,
    Section,
    StateSettings,
    TrainingSettings,
)
from streamlstm.config.settings import Settings

__all__ = [
    "ConfigError",
    "DriftSettings",
    "EngineSettings",
    "KafkaSettings",
    "LogSettings",
    "MetricsSettings",
    "ModelSettings",
    "Section",
    "Settings",
    "StateSettings",
    "TrainingSettings",
    "format_validation_error",
    "load_settings",
    "parse_override",
]
