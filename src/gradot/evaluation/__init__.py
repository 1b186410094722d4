"""Evaluation: the task specs, readers and prompts (``tasks``), the lm-evaluation-harness glue
(``lmeval``), its faster scorer (``scorer``) and the LM-head-only-at-labels loss (``head_loss``)."""
