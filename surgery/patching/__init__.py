"""The causal method: activation and weight patching, their plots, and the cross-check of a diagnosis against them."""
