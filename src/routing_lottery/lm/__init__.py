"""Pretrained causal language models with one mask per domain (issue 25).

``lm.serving`` serves mixed-domain batches over one copy of the weights, ``lm.export`` writes one
domain as a plain ``transformers`` model directory. Nothing here imports ``transformers`` at
module level, so ``import routing_lottery`` stays light.
"""
