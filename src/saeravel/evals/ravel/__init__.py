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
- ``config``: the schema (enums, ``RavelEvalConfig``, ``RavelMethod``: the method names), the
  protocols' defaults (``PROTOCOL_DEFAULTS``, ``SAEBENCH_ATTRIBUTES``) and the value checks that
  need no model.
- ``pairs``: world, knowledge filter, pairs (held-out isolation pairs too; SAEBench's entity
  selection and pairs under protocol saebench), vector bank, SAE latent bank, and ``RavelJob``, the one object a job's training, scoring and featurizers share.
- ``train``: training with the model frozen (checkpointed), first-token evaluation, refinement
  (rank-1 flips, ranked by gradient x delta, a budget of exact checks).
- ``score``: generations and cause / isolation / disentangle with intervals.
- ``methods``: the featurizer registry (``FEATURIZERS``), each method's basis, selection,
  needs, fitting and scoring; the references scored beside them.
- ``main``: ``validate`` and ``run``, registered as the eval ``ravel``.

Protocols (``eval.protocol``): ``saeravel`` (Chaudhary & Geiger 2024), ``ravel`` (Huang et al.
2024) and ``saebench``, SAEBench 0.6.0's RAVEL (``sae_bench/evals/ravel``, read for its facts).
A protocol sets the defaults of the settings listed in ``config.PROTOCOL_DEFAULTS`` (filled in
before a job is checked or hashed; a value the user sets wins).

What ``eval.protocol=saebench`` reproduces: SAEBench's entity types and attributes (city:
Country, Continent, Language; nobel_prize_winner: Country of Birth, Field, Gender; no other
pair is accepted); its prompts (every template of those attributes for every entity, no RAVEL
split used), knowledge filter (6 greedy tokens, a prompt kept when the generation gives the
label or one of SAEBench's accepted answers) and entity selection (the 500 entities with the
most known prompts, ties in the data's order); its pairs (per attribute A up to 5000 cause
bases drawn without replacement, each with a source drawn among A's prompts, any template and
entity, whose label differs; isolation pairs drawn the same way for each other selected
attribute, pooled, shuffled and cut to the number of cause pairs); its latent selection, a
learned binary mask over all SAE latents (MDBM: one logit per latent, initial 0,
``sigmoid(logit / T)`` while training, T falling geometrically from 1 to 1e-4 over every step,
2 epochs of Adam at lr 1e-3, no sparsity penalty, cross-entropy of the next token; the mask
``logit > 0`` at test), patched at the entity's last token of the SAE's layer, base and source
latents mixed and decoded without the SAE error, the generation continuing from the patched
prompt; its scores (6 greedy tokens; cause: the source's label, isolation: the base's;
disentangle: their mean per attribute; the mean over the attributes) and its output (the
copy's ``ravel`` category: ``disentanglement_score``, ``cause_score``, ``isolation_score``;
``eval_type_id`` ``ravel``; per attribute ``<type>_results.<type>_<attribute>`` with
``cause_score``, ``isolation_score``, ``disentangle_score``; SAEBench's config fields with this
job's values). SAEBench 0.6.0 has no probe-based latent selection in RAVEL (its README mentions
cosine similarity, its code trains the mask only); ``eval.method=sae_probe`` is saeravel's.

Differences from SAEBench (protocol ``saebench``). Where SAEBench is wrong, done right:

- Pair kinds: SAEBench files a test pair under isolation when the base's and the source's
  first generated tokens agree, so a cause pair United States -> United Kingdom (both
  " United") is scored as isolation, against the source's label. Here a pair is scored as
  the kind it was built as.
- Intervention site: SAEBench takes the entity's last token as ``-len(encode(remainder))``,
  right only when the tokenizer puts a BOS before the remainder (Gemma's); without one
  (Pythia's) it patches the token after the entity. Here it is located from tokenizer offsets.
- Matching: SAEBench compares decoded, lowercased text by a character prefix, so "Niger"
  matches "Nigeria"; here token ids agree over their common length (RAVEL's ``prefix`` rule),
  so case matters. SAEBench's other accepted answers are kept as matched prefixes
  (``prompts.saebench_answers``), except that "England" is accepted for the United Kingdom
  only (SAEBench accepts it for the United States too), North America's answers must start
  the generation (SAEBench: anywhere in it), "Chinese" and the label are accepted for a
  Mandarin label (SAEBench's test, the whole completion inside the label, almost never passes
  on 6 tokens), and every language of a Language label listing several is accepted for every
  Language prompt (SAEBench: only when the prompt says "language", anywhere in the generation).
- Labels that cannot differ: a pair whose two labels share an accepted answer ("United States"
  and "United States Virgin Islands") is dropped, as it cannot show a transfer (SAEBench keeps
  any two different strings; ``eval.drop_same_label_pairs=false`` does too).
- Split: SAEBench splits the pooled pairs 70/30, so test entities and the very test prompts
  train the mask. Here the kept entities are split 70/30 at random (SAEBench ignores RAVEL's
  split, so does this protocol); ``eval.split_by=pair`` reproduces SAEBench's split.
- Every test pair is scored (SAEBench's loaders drop the last partial batch, of the test pairs
  too); training also keeps its last partial batch.
- The loss's target: SAEBench trains towards the model's own first token on the source prompt
  (cause; another template than the base's, so another spacing, e.g. after a quote) or the base
  prompt (isolation); here the first token of the target label after the base prompt.
- A template RAVEL lists twice is used once (SAEBench counts both copies, also in the entity
  ranking).

Where SAEBench made a choice this protocol cannot follow or adds to, it says so:

- One entity type per job (``eval.entity_type``); SAEBench evaluates both in one run and
  reports the mean of the two types' means: the mean of a city job's and a
  nobel_prize_winner job's ``ravel`` scores. The per-type block sits in the copy's
  ``eval_result_unstructured.eval`` (beside saeravel's provenance), not at its top.
- Batches: 8 pairs (SAEBench's gemma-2-2b batch; its batch is model-dependent, 64 for pythia-160m),
  each batch of one template (the prefix cache), where SAEBench's mix templates. Random draws
  follow the same rules from saeravel's seed, so the samples differ.
- An entity with an empty value for a selected attribute (two Nobel laureates) is left out
  whole by the loader (SAEBench keeps its other prompts).
- Not reproduced: ``top_n_templates`` (declared, never used by SAEBench's code),
  ``full_dataset_downsample`` (a prompt-level sample; ``eval.max_entities`` caps entities, off
  under this protocol), ``train_mdas`` (its multi-task DAS; ``eval.method=das`` trains a
  rotation and mask on the same cause and isolation pairs).
- Beside SAEBench's numbers, never instead: the references (no intervention, full swap, SAE
  reconstruction, all latents swapped, the planted oracle), bootstrap intervals, the greedy
  refinement of the mask, and held-out isolation when ``eval.isolation_attributes`` names any
  (none by default, as in SAEBench).

Adding a featurizer: a member of ``config.RavelMethod`` (its name, the one place names live;
``methods`` refuses to load when the two differ), one :class:`~.methods.Featurizer` subclass
decorated with ``@featurizer`` in ``methods`` (its ``nn.Module`` in ``featurizers`` if new),
its options as a sub-config in ``config`` (documented in ``conf/eval/ravel.yaml``), and its
tests (the algebra in ``tests/evals/ravel/test_featurizers.py``, a band in
``tests/evals/ravel/test_planted_bands.py``).
"""
