"""Offline use of the engine: event files and the backtest behind ``streamlstm replay``."""
