"""Is the model right, and did the edit keep the rest: facts, probe panels, scoring, generation, the surgery report."""
