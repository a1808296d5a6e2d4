"""streamlstm: per-key recurrent networks over Kafka event streams, learning while they run."""

__version__ = "0.1.0"
