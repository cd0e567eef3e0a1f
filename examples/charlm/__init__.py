"""A small character-level language model built with flaxact's NNX layers.

The shared core of ``glu_variants.py`` (one training run per FFN variant) and
``sharded_training.py`` (the same model on a device mesh), in three modules,
as Flax's own examples are laid out:

- ``charlm.data``: the corpus (any UTF-8 text, or a built-in one made of
  standard-library source), its 90/10 split, training batches and
  validation windows;
- ``charlm.model``: the decoder-only transformer and the FFN variants of
  Shazeer (2020), with ``ModelConfig``;
- ``charlm.train``: AdamW with warmup and cosine decay, a jit-compiled step,
  validation, and ``fit``, with ``TrainConfig``.

The configuration dataclasses declare every option once, with its default
and help; the scripts derive their command-line flags from them
(``_cli.add_flags``).
"""
