"""Pretrained causal language models with one mask per domain (issue 25).

``lm.data`` splits text domains by document and tokenizes them; ``lm.model`` loads the model and
names the masked Linear weights; ``lm.evaluate`` scores a subnetwork (perplexity, masks applied in
place); ``lm.retraining`` retrains the domains' masks jointly (Algorithm 2) and fine-tunes the shared
baseline for as many steps; ``lm.routing`` chooses a domain for an unlabelled prompt (a learned
router on mean token embeddings, or the mask of lowest perplexity on the prompt); ``lm.serving``
serves mixed-domain batches over one copy of the weights; ``lm.export`` writes one domain as a plain
``transformers`` model directory. Nothing here imports ``transformers`` at module level, so
``import routing_lottery`` stays light. The experiment that compares them is ``run.lm``.
"""
