"""The tools: what recipes prompt with, and how each call runs.

Every tool takes untrusted, model-written input. The calculator runs in the
sandbox (worker processes with CPU, memory and wall-time limits); the
calendar is pure formatting; search reads a BM25 collection; QA and
translation ask the generator through a greedy completion function, so this
module never talks to a network itself.

Prompts are the project's own, in the paper's shape: an instruction, three
annotated examples, then the document (Toolformer's P(x)). They end with
"Output:" and a newline so the document starts a line, as it does in the
examples; the recipe scores and samples the document after that.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from autodidact.errors import InvalidArgument
from autodidact.runtime.principal import ADMIN, current_principal
from autodidact.tool_executor.sandbox import CRASHED, TIMEOUT, Sandbox
from autodidact.tool_executor.search import TenantCollections

MAX_OUTPUT_CHARS = 1024
SEARCH_SNIPPET_CHARS = 300
# Greedy completion by the generator: prompt -> text (raises BackendFailure).
Complete = Callable[[str], Awaitable[str]]

# Error kinds, named as the ToolErrorCode values they map to.
UNKNOWN_TOOL, PARSE, NOT_ALLOWED, TOO_LARGE, TIMEOUT_ERROR, UNDEFINED, BACKEND = (
    "unknown_tool",
    "parse",
    "not_allowed",
    "too_large",
    "timeout",
    "undefined",
    "backend",
)


class BackendFailure(Exception):
    """The generator, which QA and translation need, failed."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    few_shot_prompt: str
    prompt_version: str
    takes_input: bool = True
    max_input_chars: int = 512


def _prompt(instruction: str, examples: list[tuple[str, str]]) -> str:
    blocks = [instruction, ""]
    for plain, annotated in examples:
        blocks += ["Input:", plain, "Output:", annotated, ""]
    return "\n".join([*blocks, "Input:", "{text}", "Output:", ""])


TOOLS = {
    tool.name: tool
    for tool in (
        Tool(
            name="Calculator",
            description="Arithmetic with + - * / and powers; results rounded to 2 decimals.",
            few_shot_prompt=_prompt(
                "Add calculator calls to the text wherever a number in it is the result of arithmetic. "
                "Write a call as [Calculator(expression) -> result] just before the number it gives. "
                "Keep the rest of the text exactly as it is.",
                [
                    (
                        "A box of 12 pencils costs $3, so one pencil costs $0.25.",
                        "A box of 12 pencils costs $3, so one pencil costs [Calculator(3 / 12) -> 0.25] $0.25.",
                    ),
                    (
                        "The bus left with 325 riders and picked up 48 more, carrying 373 in all.",
                        "The bus left with 325 riders and picked up 48 more, carrying [Calculator(325 + 48) -> 373] 373 in all.",
                    ),
                    (
                        "Of the 40 pupils, 15 walk home, which leaves 25 who take the bus.",
                        "Of the 40 pupils, 15 walk home, which leaves [Calculator(40 - 15) -> 25] 25 who take the bus.",
                    ),
                ],
            ),
            prompt_version="calculator/v1",
            max_input_chars=256,
        ),
        Tool(
            name="Calendar",
            description="Today's date (the document's date or the job's reference date); takes no input.",
            few_shot_prompt=_prompt(
                "Add calendar calls to the text wherever knowing today's date helps to write what follows. "
                "Write a call as [Calendar() -> date] just before the words that need it. "
                "Keep the rest of the text exactly as it is.",
                [
                    (
                        "The report is due next Monday, which is three days away.",
                        "The report is due next Monday, which is [Calendar() -> Friday, March 3, 2023] three days away.",
                    ),
                    (
                        "This year's festival is the city's 40th.",
                        "This year's festival is the city's [Calendar() -> Saturday, June 1, 2024] 40th.",
                    ),
                    (
                        "We are halfway through the month of August.",
                        "We are halfway through the month of [Calendar() -> Tuesday, August 15, 2023] August.",
                    ),
                ],
            ),
            prompt_version="calendar/v1",
            takes_input=False,
        ),
        Tool(
            name="Search",
            description="BM25 search over the job's document collection; returns the best passage.",
            few_shot_prompt=_prompt(
                "Add search calls to the text wherever a fact could be looked up. "
                "Write a call as [Search(query) -> passage] just before the fact. "
                "Keep the rest of the text exactly as it is.",
                [
                    (
                        "The Eiffel Tower was finished in 1889.",
                        "The Eiffel Tower was finished in [Search(Eiffel Tower completed) -> The tower was completed in 1889.] 1889.",
                    ),
                    (
                        "Canberra is the capital of Australia.",
                        "[Search(capital of Australia) -> Canberra is the capital city of Australia.] "
                        "Canberra is the capital of Australia.",
                    ),
                    (
                        "Water boils at 100 degrees Celsius at sea level.",
                        "Water boils at [Search(boiling point of water) -> At sea level water boils at 100 °C.] "
                        "100 degrees Celsius at sea level.",
                    ),
                ],
            ),
            prompt_version="search/v1",
        ),
        Tool(
            name="QA",
            description="Answers a factual question (search plus the generator).",
            few_shot_prompt=_prompt(
                "Add question-answering calls to the text wherever a short factual answer helps. "
                "Write a call as [QA(question) -> answer] just before the answer. "
                "Keep the rest of the text exactly as it is.",
                [
                    (
                        "Mount Everest lies on the border of Nepal and China.",
                        "Mount Everest lies on the border of "
                        "[QA(Which countries border Mount Everest?) -> Nepal and China] Nepal and China.",
                    ),
                    (
                        "The Danube flows into the Black Sea.",
                        "The Danube flows into the [QA(Where does the Danube end?) -> the Black Sea] Black Sea.",
                    ),
                    ("Marie Curie was born in Warsaw.", "Marie Curie was born in [QA(Where was Marie Curie born?) -> Warsaw] Warsaw."),
                ],
            ),
            prompt_version="qa/v1",
        ),
        Tool(
            name="MT",
            description="Translates a short phrase into English (the generator).",
            few_shot_prompt=_prompt(
                "Add translation calls to the text wherever a phrase is not in English. "
                "Write a call as [MT(phrase) -> English] just before the phrase. "
                "Keep the rest of the text exactly as it is.",
                [
                    (
                        "Her motto was carpe diem, seize the day.",
                        "Her motto was [MT(carpe diem) -> seize the day] carpe diem, seize the day.",
                    ),
                    ("The sign said sortie, meaning exit.", "The sign said [MT(sortie) -> exit] sortie, meaning exit."),
                    ("He ordered a café con leche.", "He ordered a [MT(café con leche) -> coffee with milk] café con leche."),
                ],
            ),
            prompt_version="mt/v1",
        ),
    )
}


@dataclass(frozen=True)
class ToolOutcome:
    output: str | None = None
    error_kind: str = ""
    error: str = ""
    seconds: float = 0.0


class _Failure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ToolExecutor:
    """Runs tool calls, and keeps the search collections of the caller's tenant (`current_principal()`)."""

    def __init__(self, sandbox: Sandbox, collections: TenantCollections, complete: Complete | None = None) -> None:
        self._sandbox = sandbox
        self._collections = collections
        self._complete = complete

    def index_documents(self, collection: str, documents: list[tuple[str, str]]) -> int:
        """Adds documents to the caller's tenant's own collection (never another's,
        shared or not: only the owner indexes); returns its size."""
        return self._collections.add(current_principal().tenant, collection, documents)

    def share_collection(self, collection: str, tenant: str) -> list[str]:
        """Lets `tenant` search the caller's tenant's collection as "<owner>/<collection>"
        (admins only; idempotent). Returns every tenant it is shared with."""
        principal = current_principal()
        principal.require(ADMIN, "ShareCollection")
        if tenant == principal.tenant:
            raise InvalidArgument("tenant", f"{tenant!r} owns the collection already; name another tenant")
        return self._collections.share(principal.tenant, collection, tenant)

    async def execute(self, calls: list[tuple[str, str]], reference_date: dt.date, collection: str) -> list[ToolOutcome]:
        """Runs (tool, input) calls concurrently; one outcome each, in order."""
        return list(await asyncio.gather(*(self._timed(tool, text, reference_date, collection) for tool, text in calls)))

    async def _timed(self, name: str, text: str, reference_date: dt.date, collection: str) -> ToolOutcome:
        started = time.perf_counter()
        try:
            output = await self._run(name, text, reference_date, collection)
            if len(output) > MAX_OUTPUT_CHARS:
                raise _Failure(TOO_LARGE, f"the result has {len(output):,} characters; at most {MAX_OUTPUT_CHARS:,}")
            outcome = ToolOutcome(output=output)
        except _Failure as failure:
            outcome = ToolOutcome(error_kind=failure.kind, error=str(failure))
        except BackendFailure as failure:
            outcome = ToolOutcome(error_kind=BACKEND, error=str(failure))
        return ToolOutcome(outcome.output, outcome.error_kind, outcome.error, time.perf_counter() - started)

    async def _run(self, name: str, text: str, reference_date: dt.date, collection: str) -> str:
        tool = TOOLS.get(name)
        if tool is None:
            raise _Failure(UNKNOWN_TOOL, f"no tool named {name!r}; tools: {', '.join(TOOLS)}")
        text = text.strip()
        if not tool.takes_input and text:
            raise _Failure(PARSE, f"{name} takes no input")
        if tool.takes_input and not text:
            raise _Failure(PARSE, f"{name} needs an input")
        if len(text) > tool.max_input_chars:
            raise _Failure(TOO_LARGE, f"input has {len(text):,} characters; {name} takes at most {tool.max_input_chars:,}")
        if name == "Calculator":
            outcome = await self._sandbox.run("calculator", text)
            if outcome.output is None:
                kind = {TIMEOUT: TIMEOUT_ERROR, CRASHED: TOO_LARGE}.get(outcome.error_kind, outcome.error_kind)
                raise _Failure(kind, outcome.error)
            return outcome.output
        if name == "Calendar":
            return f"{reference_date:%A}, {reference_date:%B} {reference_date.day}, {reference_date.year}"
        if name == "Search":
            return await self._passage(collection, text, required=True)
        complete = self._complete
        if complete is None:
            raise BackendFailure(f"{name} needs the generator, and none is configured")
        if name == "QA":
            passage = await self._passage(collection, text, required=False) if collection else ""
            context = f"Passage: {passage}\n" if passage else ""
            return (await complete(f"Answer the question in a few words.\n\n{context}Question: {text}\nAnswer:")).strip()
        return (await complete(f"Translate into English.\n\nText: {text}\nEnglish:")).strip()

    async def _passage(self, collection: str, query: str, *, required: bool) -> str:
        if not collection:
            raise _Failure(PARSE, "search needs context.collection")
        # Another tenant's collection that is not shared with this one reads as missing.
        found = await asyncio.to_thread(self._collections.searchable, current_principal().tenant, collection)
        if found is None:
            if required:
                raise _Failure(UNDEFINED, f"collection {collection!r} has no documents")
            return ""
        store, name = found
        # In a thread: the first search after a change rebuilds the collection's
        # BM25 index, seconds for a large one, which on the event loop would stall
        # every other call and the health checks.
        hits = await asyncio.to_thread(store.search, name, query, 1)
        if not hits:
            if required:
                raise _Failure(UNDEFINED, "no document matches the query")
            return ""
        return _snippet(hits[0].text)


def _snippet(text: str) -> str:
    if len(text) <= SEARCH_SNIPPET_CHARS:
        return text
    cut = text.rfind(" ", 0, SEARCH_SNIPPET_CHARS)
    return text[: cut if cut > 0 else SEARCH_SNIPPET_CHARS] + " …"
