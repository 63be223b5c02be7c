"""The app as an MCP tool server: launched with ``mcp_server=True`` on a loopback port with the demo model, an MCP
client (the ``mcp`` package, over streamable HTTP) lists the five agent tools, and calls them.

The tools are :mod:`ui.tools`: typed, stateless, returning JSON; the page's own endpoints are not listed."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from conftest import free_port

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("mcp", reason="gradio[mcp] is not installed (make test installs it)")

import app  # noqa: E402
from surgery.edit.editors import METHODS  # noqa: E402
from surgery.serve.sessions import StartUp  # noqa: E402

pytestmark = pytest.mark.slow
TOOLS = {"diagnose", "patch_activations", "operate", "generate", "verify"}


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("sessions")
    blocks = app.build_demo(startup=StartUp(demo), work_dir=str(work))
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, mcp_server=True)
    yield f"http://127.0.0.1:{port}/gradio_api/mcp/", work
    blocks.close()


def mcp_call(url: str, work):
    """List the tools, then run ``work(session)`` in one MCP session; returns (tools, work's result)."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def go():
        async with streamable_http_client(url) as (read, write, _), ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            return tools, await work(session)

    return asyncio.run(go())


def result_json(result) -> dict:
    assert not result.isError, result.content
    (content,) = [c for c in result.content if c.type == "text"]
    return json.loads(content.text)


def test_the_tools_are_listed_with_what_an_agent_needs(server):
    url, _ = server

    async def nothing(session):
        return None

    tools, _ = mcp_call(url, nothing)
    by_name = {t.name: t for t in tools}
    assert set(by_name) == TOOLS  # the page's endpoints (charts, session state) are not tools
    diagnose = by_name["diagnose"]
    assert "routing" in diagnose.description and "divergence" in diagnose.description
    props = diagnose.inputSchema["properties"]
    assert {"prompt", "target", "competitor", "model"} <= set(props)
    assert "The capital of France is" in props["prompt"]["description"]
    operate = by_name["operate"].inputSchema["properties"]
    assert set(operate) == {"facts", "site", "layer", "model", "method"}
    assert all(f'"{m}"' in operate["method"]["description"] for m in METHODS)


def test_diagnose_through_mcp(server):
    url, _ = server

    async def call(session):
        return await session.call_tool("diagnose", {"prompt": "The capital of France is", "target": " Paris"})

    _, result = mcp_call(url, call)
    d = result_json(result)
    assert d["verdict"] == "routing" and d["target"]["text"].strip() == "Paris"
    assert d["override"]["layer"] == d["n_layer"] - 1


def test_a_refusal_is_one_error_line_through_mcp(server):
    url, _ = server

    async def call(session):
        return await session.call_tool("diagnose", {"prompt": "   ", "target": " Paris"})

    _, result = mcp_call(url, call)
    assert result.isError
    assert "the prompt is empty" in " ".join(c.text for c in result.content if c.type == "text")


def test_operate_and_generate_through_mcp_keep_nothing_on_the_server(server, demo_panels):
    url, work = server
    facts = json.dumps(demo_panels["facts"][:2])

    async def call(session):
        report = await session.call_tool("operate", {"facts": facts, "site": "wv", "layer": "auto"})
        said = await session.call_tool("generate", {"prompt": "The capital of France is", "max_new_tokens": 3})
        return report, said

    _, (report, said) = mcp_call(url, call)
    r = result_json(report)
    efficacy = r["evaluation"]["efficacy"]  # judged by what the corrected model says
    assert efficacy["after"] == efficacy["total"] == 2
    assert not list(work.iterdir())  # the call's edit lives on in its report only
    assert not said.isError
    text = " ".join(c.text for c in said.content if c.type == "text")
    assert text.strip()  # the base model's own continuation (the tools never carry an edit between calls)
