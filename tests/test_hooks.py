import pytest
import torch

from surgery.core.hooks import hooked


def _our_hooks(model):
    """Hooks registered by `hooked` (transformers 5 installs its own output recorders once, and keeps them)."""
    return [
        h
        for m in model.modules()
        for reg in (m._forward_hooks, m._forward_pre_hooks)
        for h in reg.values()
        if getattr(h, "thread_scoped", False)
    ]


def test_hooks_are_removed_even_on_error(tiny_model):
    seen = []
    with pytest.raises(RuntimeError):
        with hooked(tiny_model, forward={"transformer.h.0.mlp": lambda m, a, o: seen.append(o.shape)}):
            tiny_model(torch.tensor([[2, 3, 4]]))
            raise RuntimeError("boom")
    assert seen == [torch.Size([1, 3, 32])]
    assert _our_hooks(tiny_model) == []


def test_unknown_path_registers_nothing(tiny_model):
    with pytest.raises(KeyError, match="no such module"):
        with hooked(tiny_model, forward={"transformer.h.0.mlp": lambda *a: None, "transformer.h.99": lambda *a: None}):
            pass
    assert _our_hooks(tiny_model) == []


def test_hooks_fire_only_in_the_registering_thread(tiny_model):
    """A shared model: another thread's forward pass neither feeds nor is altered by this thread's hooks."""
    import threading

    ids = torch.tensor([[2, 3, 4]])
    expected = tiny_model(ids).logits
    seen = []

    def zero_mlp(module, args, output):
        seen.append(threading.get_ident())
        return torch.zeros_like(output)

    other = {}
    with hooked(tiny_model, forward={"transformer.h.0.mlp": zero_mlp}):
        worker = threading.Thread(target=lambda: other.update(logits=tiny_model(ids).logits))
        worker.start()
        worker.join()
        mine = tiny_model(ids).logits
    assert seen == [threading.get_ident()]  # fired once: for this thread's pass only
    assert torch.equal(other["logits"], expected)  # the other thread's output is untouched
    assert not torch.equal(mine, expected)
