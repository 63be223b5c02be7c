"""The edit itself: training one site (operate), the frozen upper stack, many-fact repairs, reproducing a write-up."""
