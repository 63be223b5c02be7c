"""Why the model answers wrong: logit lens, direct logit attribution and verdict, divergence of multi-token answers,
static head tables, their plots."""
