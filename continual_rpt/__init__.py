"""continual-rpt: continual learning over NLP task streams with residual prompt tuning."""

__version__ = "0.1.0"
