"""What a public app lets one visitor do: :class:`Limits`, read once at start-up from ``SURGERY_*`` variables.

Every limit refuses an input in one line that names the limit and its variable (an :class:`InputError`, which the
app shows as ``gr.Error``), before any work is done. A model a visitor names is checked before any download: it
must be a Hub id the operator allowed (``SURGERY_ALLOWED_MODELS``) whose weights on the Hub — read from the Hub's
metadata, without the app's token — are under ``SURGERY_MAX_MODEL_BYTES`` (:func:`check_visitor_model`). The CLI
uses none of this. The library reads no environment: :meth:`Limits.from_env` is given the mapping to read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from ..core.errors import InputError, ModelLoadError, first_line
from ..evaluation.facts import Fact

# The Hub files that hold a model's weights: their sizes, summed, are what a load downloads.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass(frozen=True)
class Limits:
    """The limits of a public app (defaults: a small CPU Space). Each field is set by the variable in
    :data:`VARIABLES`; see the README's table."""

    max_facts: int = 16  # facts per surgery
    max_prompt_tokens: int = 64  # tokens of each fact's prompt, target and paraphrase
    max_steps: int = 300  # training steps per block tried (SurgeryConfig.epochs)
    max_seconds: float = 300.0  # wall time of one surgery
    max_stat_tokens: int = 100_000  # tokens of text for ROME's, MEMIT's and AlphaEdit's key statistics
    max_new_tokens: int = 64  # tokens one generation may ask for
    queue_size: int = 16  # events waiting in the queue; more are turned away ("queue full")
    session_ttl: float = 3600.0  # seconds a session's edits are kept after its last surgery
    max_sessions: int = 32  # sessions holding edits at once: the oldest is discarded beyond this
    allowed_models: tuple[str, ...] = ()  # Hub ids a visitor may load besides the picker's models
    max_model_bytes: int = 2_000_000_000  # weight files of such a model, as the Hub lists them

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "allowed_models":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InputError(f"{VARIABLES[f.name]} must be a positive number, not {value!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Limits:
        """The limits the ``SURGERY_*`` variables in ``env`` set (unset or blank: the default). Raises
        :class:`InputError` naming the first malformed variable."""
        given: dict = {}
        for f in fields(cls):
            name = VARIABLES[f.name]
            text = env.get(name, "").strip()
            if not text:
                continue
            if f.name == "allowed_models":
                given[f.name] = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
                continue
            try:
                value = float(text) if f.type == "float" else int(float(text))
                if f.type != "float" and value != float(text):
                    raise ValueError
            except (ValueError, OverflowError):
                kind = "number of seconds" if f.type == "float" else "whole number"
                raise InputError(f"{name} must be a positive {kind}, not {text!r}") from None
            given[f.name] = value
        return cls(**given)

    # --- the checks ------------------------------------------------------------------------------------------

    def check_facts(self, facts: Sequence[Fact], tokenizer) -> None:
        """At most ``max_facts`` facts, each prompt, target and paraphrase at most ``max_prompt_tokens`` tokens."""
        if len(facts) > self.max_facts:
            raise InputError(
                f"{len(facts)} facts given: at most {self.max_facts} per surgery here ({VARIABLES['max_facts']})"
            )
        for fact in facts:
            for what, text in [("prompt", fact.prompt), ("target", fact.target)] + [
                ("paraphrase", p) for p in fact.paraphrases
            ]:
                n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                if n > self.max_prompt_tokens:
                    raise InputError(
                        f"the {what} {_short(text)} is {n} tokens long: at most {self.max_prompt_tokens} here "
                        f"({VARIABLES['max_prompt_tokens']})"
                    )

    def check_new_tokens(self, n: int) -> int:
        if n > self.max_new_tokens:
            raise InputError(
                f"{n} new tokens asked for: at most {self.max_new_tokens} here ({VARIABLES['max_new_tokens']})"
            )
        return n

    def timed_out(self, message: str) -> str:
        """A :class:`~surgery.core.errors.SurgeryTimeout`'s line, naming the variable that set the limit."""
        return f"{message} ({VARIABLES['max_seconds']})"

    def check_visitor_model(self, repo_id: str) -> None:
        """Refuse a Hub id the operator did not allow, or whose weights on the Hub exceed ``max_model_bytes``
        (:func:`hub_weight_bytes`, read without a token) — before anything is downloaded."""
        if repo_id not in self.allowed_models:
            allowed = ", ".join(self.allowed_models) if self.allowed_models else "none"
            raise InputError(
                f"{repo_id!r} is not a model this app loads: pick one in the model picker, or one of the models "
                f"{VARIABLES['allowed_models']} allows ({allowed})"
            )
        size = hub_weight_bytes(repo_id)
        if size > self.max_model_bytes:
            raise InputError(
                f"{repo_id} holds {size / 1e9:.2f} GB of weights: at most {self.max_model_bytes / 1e9:.2f} GB here "
                f"({VARIABLES['max_model_bytes']})"
            )


VARIABLES = {
    "max_facts": "SURGERY_MAX_FACTS",
    "max_prompt_tokens": "SURGERY_MAX_PROMPT_TOKENS",
    "max_steps": "SURGERY_MAX_STEPS",
    "max_seconds": "SURGERY_MAX_SECONDS",
    "max_stat_tokens": "SURGERY_MAX_STAT_TOKENS",
    "max_new_tokens": "SURGERY_MAX_NEW_TOKENS",
    "queue_size": "SURGERY_QUEUE_SIZE",
    "session_ttl": "SURGERY_SESSION_TTL",
    "max_sessions": "SURGERY_MAX_SESSIONS",
    "allowed_models": "SURGERY_ALLOWED_MODELS",
    "max_model_bytes": "SURGERY_MAX_MODEL_BYTES",
}


def hub_weight_bytes(repo_id: str) -> int:
    """The total size of ``repo_id``'s weight files (:data:`WEIGHT_SUFFIXES`) as the Hub lists them, asked
    without a token (``token=False``: an app's own ``HF_TOKEN`` is never used for a visitor's model). Raises
    :class:`ModelLoadError` when the Hub cannot say (unreachable, unknown or private repo, no weight files)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, files_metadata=True, token=False)
    except Exception as e:  # HfHubHTTPError, RepositoryNotFoundError, httpx errors, offline mode
        raise ModelLoadError(f"cannot read {repo_id}'s size from the Hub: {first_line(e)}") from None
    sizes = [s.size for s in info.siblings or () if s.rfilename.endswith(WEIGHT_SUFFIXES)]
    if not sizes:
        raise ModelLoadError(f"{repo_id} lists no weight files on the Hub ({', '.join(WEIGHT_SUFFIXES)})")
    if any(size is None for size in sizes):
        raise ModelLoadError(f"the Hub did not give the size of {repo_id}'s weight files")
    return sum(sizes)


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")
