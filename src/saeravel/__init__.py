"""saeravel: how well do sparse autoencoders disentangle factual knowledge in language models."""

__version__ = "0.1.0"
RESULT_SCHEMA_VERSION = "1"
