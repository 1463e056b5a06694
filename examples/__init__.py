"""Worked examples: bring your own model and data to Routing the Lottery.

Each example is a module with a YAML config beside it, runnable two ways from the repository root:

- ``python -m examples.tabular_mlp`` (or ``python examples/tabular_mlp.py``): the Python front door
  (``AdaptiveTickets``) on the example's data, printing each context's subnetwork's balanced
  accuracy; ``--smoke`` for a seconds-long run, ``--out DIR`` to save the tickets;
- ``rtl run examples/tabular.yaml --out runs/tabular``: the full comparison (dense, single IMP,
  multiple IMP, RTL, random control) through the command line; ``--scale smoke`` for a quick one.

``tabular_mlp``  your data and your model: scikit-learn's wine table and an MLP.
``transformer``  your data and your model: digits as sequences of row tokens, a small transformer
                 whose attention projections (the packed ``in_proj_weight`` included) are masked.
``image_model``  only your model: a small CNN on the built-in digits dataset.
``own_loop_adamw``       your training loop: masks from the front door, then joint retraining in a
                         plain PyTorch loop with DataLoaders, AdamW, a cosine schedule and gradient
                         clipping (``context_optimizers``, ``RoutedModel.use``).
``own_loop_hf_trainer``  a ``transformers`` ``Trainer`` retraining one mask per context of a tiny BERT
                         (built from a config, nothing downloaded) with a per-context optimizer.

The config names the example's code by import path (``examples.tabular_mlp:load_wine``), which
resolves from the working directory: run these from the repository root.
"""
