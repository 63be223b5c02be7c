"""Why the model answers wrong: direct logit attribution, divergence of multi-token answers, static head tables, their plots."""
