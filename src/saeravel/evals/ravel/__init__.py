"""``eval=ravel``: RAVEL interchange interventions (see ``main`` for what is measured).

Module map, lowest first (each imports only the ones above it; none imports this package's
``__init__``, and :func:`saeravel.evals.api.discover` imports ``main``, which registers it):

- ``verdict``: per-pair outcomes and paired differences between methods (a paired
  bootstrap over base entities).
- ``prompts``: prompts with located entities, matching rules, base/source pairs.
- ``data``: RAVEL's files of any of its five entity types (download once, or
  ``eval.data_dir``), each type's attributes, the entity-type checks.
- ``intervene``: the mask, neuron, SAE-mask and DAS interventions, the references, the
  fast forward (``SuffixRunner``).
- ``decode``: greedy decoding with a patched entity through key/value caches.
- ``featurizers``: PCA, boundless DAS, multi-task DAS, SAE latent swap and probe ranking,
  RLAP's adversarial subspace (R-LACE), the one projector swap (the oracle and a given basis).
- ``subspace``: on a planted world, what a fitted method swaps against the planted block
  (principal angles: captured, spill, max angle).
- ``config``: the schema (enums, ``RavelEvalConfig``, ``RavelMethod``: the method names) and
  the value checks that need no model.
- ``pairs``: world, knowledge filter, pairs (held-out isolation pairs too), vector bank, SAE
  latent bank, and ``RavelJob``, the one object a job's training, scoring and featurizers share.
- ``train``: training with the model frozen (checkpointed), first-token evaluation, refinement
  (rank-1 flips, ranked by gradient x delta, a budget of exact checks).
- ``score``: generations and cause / isolation / disentangle with intervals.
- ``methods``: the featurizer registry (``FEATURIZERS``), each method's basis, selection,
  needs, fitting and scoring; the references scored beside them.
- ``main``: ``validate`` and ``run``, registered as the eval ``ravel``.

Adding a featurizer: a member of ``config.RavelMethod`` (its name, the one place names live;
``methods`` refuses to load when the two differ), one :class:`~.methods.Featurizer` subclass
decorated with ``@featurizer`` in ``methods`` (its ``nn.Module`` in ``featurizers`` if new),
its options as a sub-config in ``config`` (documented in ``conf/eval/ravel.yaml``), and its
tests (the algebra in ``tests/evals/ravel/test_featurizers.py``, a band in
``tests/evals/ravel/test_planted_bands.py``).
"""
