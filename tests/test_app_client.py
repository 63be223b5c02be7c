"""The launched app, called as an API through ``gradio_client``: /diagnose, /operate, /generate, /verify and the
causal checks /patch_activations and /patch_weights. Every endpoint takes the picked model last (default: the
first in the picker).

The app runs in this process (``prevent_thread_lock``) on a free loopback port with the demo model. Each
``Client`` is its own session: its edit stays in its own ``gr.State``.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import free_port

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import app  # noqa: E402
from surgery.serve.sessions import StartUp  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    blocks = app.build_demo(startup=StartUp(demo), work_dir=str(tmp_path_factory.mktemp("sessions")))
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    blocks.close()


def client(url, tmp_path):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))


@pytest.fixture(scope="module")
def facts(demo_panels) -> str:
    return json.dumps(demo_panels["facts"])


def test_api_lists_the_named_endpoints(server, tmp_path):
    info = client(server, tmp_path).view_api(print_info=False, return_format="dict")
    endpoints = info["named_endpoints"]
    assert {"/diagnose", "/operate", "/generate", "/verify", "/patch_activations", "/patch_weights"} <= set(endpoints)
    model = endpoints["/diagnose"]["parameters"][-1]
    assert model["parameter_name"] == "model" and model["parameter_default"] == "assets/demo-model"


def test_diagnose_through_the_api(server, tmp_path):
    verdict, lens, heatmap, bars, raw = client(server, tmp_path).predict(
        "The capital of France is", " Paris", "", api_name="/diagnose"
    )
    assert "Routing" in verdict
    assert raw["verdict"] == "routing" and raw["target"]["text"].strip() == "Paris"
    assert raw["override"]["layer"] == raw["n_layer"] - 1  # the override head sits in the last block
    assert lens["type"] == "matplotlib" and lens["plot"]


def test_bad_input_is_an_error_message_not_a_traceback(server, tmp_path):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="the prompt is empty"):
        client(server, tmp_path).predict("  ", " Paris", "", api_name="/diagnose")
    with pytest.raises(AppError, match="not in the list of choices"):  # only the models the picker offers
        client(server, tmp_path).predict("The capital of France is", " Paris", "", "gpt2", api_name="/diagnose")


def test_activation_patching_through_the_api(server, tmp_path):
    summary, positions, heads, raw = client(server, tmp_path).predict(
        "The capital of France is", "The capital of Poland is", " Paris", "", "attn", api_name="/patch_activations"
    )
    assert positions["type"] == heads["type"] == "matplotlib" and set(raw["grids"]) == {"attn", "head"}


def test_operate_then_generate_and_verify_in_one_session(server, facts, tmp_path):
    alice, bob = client(server, tmp_path / "a"), client(server, tmp_path / "b")
    (
        summary,
        metrics,
        fact_rows,
        files,
        report,
    ) = alice.predict(facts, "wv", "auto", api_name="/operate")
    assert "Surgery done" in summary and report["facts_fixed"] == f"{len(json.loads(facts))}/{len(json.loads(facts))}"
    assert fact_rows["headers"][:5] == ["kind", "prompt", "target", "original answer", "corrected answer"]
    assert all(row[0] == "fact" and row[5] == "✓" for row in fact_rows["data"])
    assert sorted(os.path.basename(f) for f in files) == ["patch.safetensors", "report.json"]
    assert all(os.path.getsize(f) > 0 for f in files)  # downloaded by the client

    original, corrected = alice.predict("The capital of France is", 2, api_name="/generate")
    assert corrected.strip().startswith("Paris") and not original.strip().startswith("Paris")
    # Bob's session has no edit: he sees the original model only.
    bob_original, bob_corrected = bob.predict("The capital of France is", 2, api_name="/generate")
    assert bob_original == original and "no surgery" in bob_corrected

    verdict, _, _, raw = alice.predict("", api_name="/verify")
    assert raw["verified"] and "Verified" in verdict
    summary, chart, weights = alice.predict("site", api_name="/patch_weights")
    assert chart["type"] == "matplotlib" and weights["donor"]["facts_correct"] == len(json.loads(facts))
