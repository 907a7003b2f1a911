"""saeravel: how well do sparse autoencoders disentangle factual knowledge in language models."""

__version__ = "0.2.0"
RESULT_SCHEMA_VERSION = (
    "2"  # 2: strict JSON (NaN as null), SAEBench type ids, eval_name, RAVEL 2.0 metrics
)
