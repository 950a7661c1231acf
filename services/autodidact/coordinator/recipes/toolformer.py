"""Toolformer (Schick et al. 2023, arXiv 2302.04761; ALGORITHMS.md §1).

For every document and tool: the scorer finds the positions where the model
would most likely open a call, given the tool's prompt P(x); the generator
samples m calls at each, continuing P(x), x1..x(i−1), "["; the tool-executor
runs them; the scorer keeps a call when its result lowers the weighted loss
of the next tokens by at least τf; kept calls are spliced into the text.

Item ids: "doc00012" for a document, "doc00012/Calculator/p0057/c03" for a
candidate call (the tool, the character offset, the candidate's number).
Every model call has a seed derived from (job seed, document, tool,
position), and each step's result is stored, so a resumed job replays to
the same dataset.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from autodidact.coordinator.recipes.base import (
    ERROR_FILTER,
    REVIEW_FILTER,
    Decision,
    ItemFailed,
    JobContext,
    ServiceRefused,
    StageResult,
    derive_seed,
    ready,
)
from autodidact.coordinator.recipes.formats import check_item_count, gsm8k_document, json_lines, read_input
from autodidact.coordinator.recipes.ids import CallId, DocumentId, PositionId, ToolItemId, toolformer_id
from autodidact.coordinator.recipes.recipe import DecidingScore, Recipe
from autodidact.coordinator.recipes.replay import replay_batched
from autodidact.coordinator.records import Record
from autodidact.errors import InvalidArgument
from autodidact.tool_executor.tools import TOOLS
from autodidact.v1 import common_pb2, coordinator_pb2, generator_pb2, scorer_pb2, tool_executor_pb2
from autodidact.validation import check_range

# A candidate call's last stage is "splice"; a document's is "dataset".
STAGES = ("prefilter", "positions", "sample_call", "execute", "filter", "review", "splice", "dataset")
MAX_DOCUMENTS = 100_000
MAX_DOCUMENT_CHARS = 16_384
MAX_CALL_TOKENS = 48
SAMPLING_TEMPERATURE = 1.0  # calls are sampled from the model's own distribution
CALL_TIMEOUT_SECONDS = 900.0
EXECUTE_BATCH = 256  # calls per ExecuteTools request
# The paper's defaults; the calculator (and translation) use their own.
DEFAULTS = {"position_threshold": 0.05, "positions": 5, "calls": 5, "filter_threshold": 1.0}
TOOL_DEFAULTS = {
    "Calculator": {"position_threshold": 0.0, "positions": 20, "calls": 10, "filter_threshold": 0.5},
    "MT": {"position_threshold": 0.0, "positions": 20, "calls": 10, "filter_threshold": 0.5},
}
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")
LONE_NUMBER = re.compile(r"[-+]?\(*\s*[-+]?\d[\d,]*(?:\.\d+)?\s*\)*")
# Call grammars (llama.cpp GBNF) the generator samples calls under, so that a
# sample is always `Tool(input)`: the prompt ends with "[", and the grammar
# ends with ")", after which only end-of-text is allowed. The calculator's
# input is arithmetic (numbers, + - * /, balanced parentheses, spaces); other
# tools take any text without brackets or newlines; a tool without input
# takes none.
CALCULATOR_GRAMMAR = r"""root ::= "Calculator(" sp expr sp ")"
expr ::= term (sp [-+*/] sp term)*
term ::= number | "(" sp expr sp ")" | "-" term
number ::= [0-9]{1,12} ("." [0-9]{1,6})?
sp ::= " "?
"""


def call_grammar(tool: str, takes_input: bool) -> str:
    """The GBNF grammar of a call to `tool`, as it continues the opening "["."""
    if tool == "Calculator":
        return CALCULATOR_GRAMMAR
    if not takes_input:
        return f'root ::= "{tool}()"\n'
    return f'root ::= "{tool}(" [^()\\[\\]\\n]{{1,200}} ")"\n'


DOCUMENT_SCHEMA = pa.schema(
    (
        ("item_id", pa.string()),
        ("document_id", pa.string()),
        ("text", pa.string()),
        ("original_text", pa.string()),
        (
            "calls",
            pa.list_(
                pa.struct(
                    [
                        ("tool", pa.string()),
                        ("char_offset", pa.int64()),
                        ("call", pa.string()),
                        ("input", pa.string()),
                        ("result", pa.string()),
                        ("loss_plus", pa.float64()),
                        ("loss_minus", pa.float64()),
                        ("gain", pa.float64()),
                    ]
                )
            ),
        ),
    )
)
CALL_SCHEMA = pa.schema(
    (
        ("item_id", pa.string()),
        ("tool", pa.string()),
        ("char_offset", pa.int64()),
        ("input", pa.string()),
        ("result", pa.string()),
        ("loss_plus", pa.float64()),
        ("loss_no_call", pa.float64()),
        ("loss_without_result", pa.float64()),
        ("loss_minus", pa.float64()),
        ("kept", pa.bool_()),
        ("dropped_by", pa.string()),
    )
)


class Toolformer(Recipe["ToolformerParams"]):
    """The declared task; the parts below are its input loading, prompts and parsers, run and export."""

    name = "toolformer"
    stages = STAGES
    # A document is decided at "dataset"; a (document, tool) item and a candidate call at "splice".
    final_stages = ("dataset", "splice")
    services = ("generator", "scorer", "tool_executor")
    tables: ClassVar[dict[str, pa.Schema]] = {"documents": DOCUMENT_SCHEMA, "calls": CALL_SCHEMA}
    inputs = ("documents_path", "search_collection_path")

    def resolve(self, spec: coordinator_pb2.ToolformerSpec, job_id: str) -> ToolformerParams:
        return resolve_params(spec, f"spec.{self.name}")

    async def run(self, ctx: JobContext, params: ToolformerParams) -> dict[str, Any]:
        return await ToolformerRun(ctx, params).run()

    def item_count(self, params: ToolformerParams) -> int:
        return len(params.documents)

    def deciding_scores(self, spec: coordinator_pb2.ToolformerSpec) -> tuple[DecidingScore, ...]:
        if spec.HasField("filter_threshold"):
            thresholds = {spec.filter_threshold}
        else:  # each tool's default τf
            thresholds = {float(TOOL_DEFAULTS.get(name, DEFAULTS)["filter_threshold"]) for name in spec.tools}
            thresholds = thresholds or {DEFAULTS["filter_threshold"]}
        return (DecidingScore("filter", "L⁻ − L⁺: the loss the call's result saves", tuple(sorted(thresholds)), "at or above"),)

    def belongs(self, summary: dict[str, Any]) -> Callable[[str], bool]:
        return lambda item_id: item_id.startswith(DocumentId.PREFIX)  # a document and every part of it

    def rows(self, records: list[Record]) -> dict[str, list[dict[str, Any]]]:
        return export_rows(records)


STATEMENT_OF_RESULT = re.compile(r"(=|\bequals\b|\btotal of\b)\s*\$?\s*-?\d", re.IGNORECASE)


# --- input loading ---


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    date: str  # YYYY-MM-DD or empty


@dataclass(frozen=True)
class ToolSettings:
    tool: str
    position_threshold: float
    positions: int
    calls: int
    filter_threshold: float


@dataclass(frozen=True)
class ToolformerParams:
    documents: list[Document]
    tools: list[ToolSettings]
    placement: scorer_pb2.CallPlacement.ValueType
    reference_date: str
    collection_documents: list[tuple[str, str]]


def load_documents(path: Path, field: str, limit: int = 0) -> list[Document]:
    """Documents of a JSONL file: "text" lines, or GSM8K lines (question and annotated answer)."""
    documents = []
    for number, raw in json_lines(read_input(path, field), field, limit):
        try:
            text = raw["text"] if "text" in raw else gsm8k_document(raw["question"], raw["answer"])[0]
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidArgument(field, f'line {number} is not a JSON object with a "text" field, nor a GSM8K line ({exc})') from None
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgument(field, f'line {number}: "text" must be a non-empty string')
        if len(text) > MAX_DOCUMENT_CHARS:
            raise InvalidArgument(field, f"line {number}: text has {len(text):,} characters; at most {MAX_DOCUMENT_CHARS:,}")
        documents.append(Document(id=str(raw.get("id", number)), text=text, date=str(raw.get("date", ""))))
    check_item_count(field, documents, "documents", MAX_DOCUMENTS)
    return documents


def resolve_params(spec: coordinator_pb2.ToolformerSpec, field: str) -> ToolformerParams:
    """The spec with every default filled in, validated."""
    if not spec.documents_path:
        raise InvalidArgument(f"{field}.documents_path", "is required")
    check_range(f"{field}.max_documents", spec.max_documents, 0, MAX_DOCUMENTS)
    documents = load_documents(Path(spec.documents_path), f"{field}.documents_path", spec.max_documents)
    if not spec.tools:
        raise InvalidArgument(f"{field}.tools", f"name at least one tool: {', '.join(TOOLS)}")
    tools = []
    for i, name in enumerate(spec.tools):
        if name not in TOOLS:
            raise InvalidArgument(f"{field}.tools[{i}]", f"no tool named {name!r}; tools: {', '.join(TOOLS)}")
        defaults = TOOL_DEFAULTS.get(name, DEFAULTS)
        settings = ToolSettings(
            tool=name,
            position_threshold=spec.position_threshold if spec.HasField("position_threshold") else defaults["position_threshold"],
            positions=spec.positions_per_document or int(defaults["positions"]),
            calls=spec.calls_per_position or int(defaults["calls"]),
            filter_threshold=spec.filter_threshold if spec.HasField("filter_threshold") else defaults["filter_threshold"],
        )
        check_range(f"{field}.position_threshold", settings.position_threshold, 0.0, 1.0)
        check_range(f"{field}.positions_per_document", settings.positions, 1, 1024)
        check_range(f"{field}.calls_per_position", settings.calls, 1, 64)
        check_range(f"{field}.filter_threshold", settings.filter_threshold, -100.0, 100.0)
        tools.append(settings)
    if spec.reference_date and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", spec.reference_date):
        raise InvalidArgument(f"{field}.reference_date", f"must be YYYY-MM-DD, got {spec.reference_date!r}")
    collection: list[tuple[str, str]] = []
    if spec.search_collection_path:
        collection = [(d.id, d.text) for d in load_documents(Path(spec.search_collection_path), f"{field}.search_collection_path")]
    elif "Search" in spec.tools:
        raise InvalidArgument(f"{field}.search_collection_path", "is required with the Search tool")
    return ToolformerParams(documents, tools, spec.placement, spec.reference_date, collection)


# --- prompts and parsers (pure) ---


def looks_arithmetic(text: str) -> bool:
    """The paper's calculator pre-filter: a stated result ("=", "equals",
    "total of" before a number), or three numbers where one is the sum,
    difference, product or quotient of two others."""
    if STATEMENT_OF_RESULT.search(text):
        return True
    numbers = sorted({float(n.replace(",", "")) for n in NUMBER.findall(text)})[:40]
    present = set(numbers)
    for i, a in enumerate(numbers):
        for b in numbers[i + 1 :]:
            results = {a + b, b - a, a * b} | ({b / a} if a else set())
            if any(round(r, 6) in present and r not in (a, b) for r in results):
                return True
    return False


def call_prompt(prompt: str, text: str, char_offset: int) -> str:
    """P(x), x1..x(i−1) and the opening bracket (with the space the marker " [" carries)."""
    opening = " [" if text[char_offset : char_offset + 1] == " " else "["
    return prompt.replace("{text}", text) + text[:char_offset] + opening


def parse_call(sample: str, tool: str, takes_input: bool) -> tuple[str | None, str]:
    """The call's input from a sample continuing "[", or None and why not."""
    head = sample.lstrip()
    if not head.startswith(f"{tool}("):
        return None, f"not a {tool} call: {sample[:40]!r}"
    body = head[len(tool) + 1 :]
    depth = 1
    for index, char in enumerate(body):
        depth += (char == "(") - (char == ")")
        if depth == 0:
            argument = body[:index].strip()
            if takes_input and not argument:
                return None, "empty input"
            return argument, ""
    return None, "the call never closes"


def trivial_call(argument: str, result: str) -> str:
    """Why a call teaches nothing (empty when it may): its input is a lone
    number, or its result restates its input, e.g. [Calculator(12) -> 12]."""
    if LONE_NUMBER.fullmatch(argument.strip()):
        return f"the input {argument.strip()!r} is a lone number"
    if result.strip().replace(" ", "") == argument.strip().replace(" ", ""):
        return f"the result {result.strip()!r} restates the input"
    return ""


def render_call(tool: str, argument: str, result: str | None = None) -> str:
    return f"[{tool}({argument})" + ("" if result is None else f" -> {result}") + "]"


def splice(text: str, calls: list[tuple[int, str]]) -> str:
    """Inserts calls (char offset, rendered call) at their offsets; a call
    before a space-led token gets the space in front, as the marker " [" did."""
    out, last = [], 0
    for offset, call in sorted(calls):
        out.append(text[last:offset])
        out.append((" " if text[offset : offset + 1] == " " else "") + call)
        last = offset
    out.append(text[last:])
    return "".join(out)


# --- orchestration ---


class ToolformerRun:
    """One job's run: every document through every tool's positions, calls, execution, filter and splice."""

    def __init__(self, ctx: JobContext, params: ToolformerParams) -> None:
        self.ctx = ctx
        self.params = params
        self._specs: dict[str, tool_executor_pb2.ToolSpec] = {}
        self._collection = "j" + hashlib.blake2b(ctx.job_id.encode(), digest_size=8).hexdigest()
        self._reference_date = params.reference_date

    async def run(self) -> dict[str, Any]:
        listed = await self.ctx.call(
            lambda: self.ctx.services.tool_executor.ListTools(tool_executor_pb2.ListToolsRequest(), timeout=30),
            "tool-executor (list tools)",
        )
        self._specs = {spec.name: spec for spec in listed.tools}
        missing = [t.tool for t in self.params.tools if t.tool not in self._specs]
        if missing:
            raise InvalidArgument("spec.toolformer.tools", f"the tool-executor has no {', '.join(missing)}")
        if not self._reference_date:
            # The job's first day, stored: a resumed job keeps the date it started with.
            stored = await self.ctx.job_value("reference_date", self._today)
            self._reference_date = stored["date"]
        if self.params.collection_documents:
            await self.ctx.job_value("search_collection", self._index_collection)
        kept = await self.ctx.each_item(len(self.params.documents), self._document)
        return {"documents": len(kept), "augmented": sum(kept)}

    async def _today(self) -> dict[str, Any]:
        return {"date": dt.datetime.now(dt.UTC).date().isoformat()}

    async def _index_collection(self) -> dict[str, Any]:
        documents = [tool_executor_pb2.Document(id=i, text=t) for i, t in self.params.collection_documents]
        size = 0
        for start in range(0, len(documents), 5000):
            request = tool_executor_pb2.IndexDocumentsRequest(collection=self._collection, documents=documents[start : start + 5000])
            # partial binds this loop pass's request (a lambda would close over the loop variable).
            response = await self.ctx.call(
                partial(self.ctx.services.tool_executor.IndexDocuments, request, timeout=300), "tool-executor (index)"
            )
            size = response.collection_size
        return {"collection": self._collection, "size": size}

    async def _document(self, index: int) -> bool:
        document = self.params.documents[index]
        doc_id = DocumentId(index)
        item = str(doc_id)
        kept_calls: list[dict[str, Any]] = []
        try:
            for tool in self.params.tools:
                kept_calls += await self._tool(doc_id.tool(tool.tool), document, tool)
        except ItemFailed as exc:
            await self._end_in_error(doc_id, exc, kept_calls)
            raise  # counted against the job's error budget by ctx.each_item
        # Calls held for review wait for their decisions (the document's slot is free meanwhile);
        # one a person or the deadline dropped ends there and competes for no position.
        held = [call["item"] for call in kept_calls if call["held"]]
        dropped_on_review = {item for item, decision in zip(held, await self.ctx.reviews(held), strict=True) if not decision.kept}
        kept_calls = [call for call in kept_calls if call["item"] not in dropped_on_review]
        # One call per position: the one that lowered the loss most.
        best: dict[int, dict[str, Any]] = {}
        for call in kept_calls:
            if call["char_offset"] not in best or call["gain"] > best[call["char_offset"]]["gain"]:
                best[call["char_offset"]] = call
        for call in kept_calls:
            if await self.ctx.stored(call["item"], "splice") is not None:
                continue
            winner = best[call["char_offset"]]
            decision = (
                Decision(True) if winner is call else Decision(False, "same_position", reason=f"{winner['call']} lowered the loss more")
            )
            await self.ctx.record(call["item"], "splice", StageResult(decision=decision))
        chosen = sorted(best.values(), key=lambda c: c["char_offset"])
        for tool in self.params.tools:
            await self._conclude_tool(str(doc_id.tool(tool.tool)), sum(c["tool"] == tool.tool for c in chosen))
        augmented = splice(document.text, [(c["char_offset"], c["call"]) for c in chosen])
        # `text` is what a trainer reads by default (TRL's dataset_text_field), so it is the text with the calls.
        data = {
            "document_id": document.id,
            "text": augmented,
            "original_text": document.text,
            "calls": [{k: v for k, v in c.items() if k not in ("item", "held")} for c in chosen],
        }
        decision = (
            Decision(True, score=len(chosen), reason=f"{len(chosen)} calls spliced")
            if chosen
            else Decision(False, "no_useful_call", score=0, reason="no call lowered the loss by τf")
        )
        if await self.ctx.stored(item, "dataset") is None:
            await self.ctx.record(item, "dataset", StageResult(data, decision))
        return bool(chosen)

    async def _end_in_error(self, doc_id: DocumentId, exc: ItemFailed, passed: list[dict[str, Any]]) -> None:
        """A service refused part of this document's work: the document, its (document, tool)
        items and the calls of earlier tools that passed the filter (`passed`) end with filter
        `error` (the calls it refused already did). A held call's open review closes with it."""
        error = Decision(False, ERROR_FILTER, reason=str(exc))
        for call in passed:
            if await self.ctx.stored(call["item"], "splice") is not None:
                continue
            if call["held"] and not (await self.ctx.close_review(call["item"], error)).kept:
                continue  # the error (or a person's drop) at review is its final decision
            await self.ctx.record(call["item"], "splice", StageResult(decision=error))
        item = str(doc_id)
        for tool in self.params.tools:
            tool_item = str(doc_id.tool(tool.tool))
            results = [r for s in ("prefilter", "positions", "splice") if (r := await self.ctx.stored(tool_item, s)) is not None]
            ended = any(r.decision is not None and not r.decision.kept for r in results) or await self.ctx.stored(tool_item, "splice")
            if results and not ended:
                await self.ctx.record(tool_item, "splice", StageResult(decision=error))
        if await self.ctx.stored(item, "dataset") is None:
            await self.ctx.record(item, "dataset", StageResult({"document_id": self.params.documents[doc_id.index].id}, error))

    async def _conclude_tool(self, tool_item: str, spliced: int) -> None:
        """The final decision of a (document, tool) item that passed the
        prefilter: kept when at least one of its calls was spliced. Without
        it the item's prefilter and positions decisions would end nowhere
        (the lineage contract: every decided item ends with one decision)."""
        if await self.ctx.stored(tool_item, "splice") is not None:
            return
        pre = await self.ctx.stored(tool_item, "prefilter")
        if pre is not None and pre.decision is not None and not pre.decision.kept:
            return  # its prefilter drop is its final decision
        decision = (
            Decision(True, score=spliced, reason=f"{spliced} calls spliced")
            if spliced
            else Decision(False, "no_useful_call", score=0, reason="none of its calls lowered the loss by τf")
        )
        await self.ctx.record(tool_item, "splice", StageResult(decision=decision))

    async def _tool(self, tool_id: ToolItemId, document: Document, tool: ToolSettings) -> list[dict[str, Any]]:
        """Kept calls of one tool in one document, as dicts for the dataset."""
        name = tool.tool
        if name == "Calculator":
            arithmetic = looks_arithmetic(document.text)
            pre = await self.ctx.stage(
                str(tool_id),
                "prefilter",
                ready(
                    StageResult(
                        {"tool": name},
                        Decision(
                            arithmetic,
                            "" if arithmetic else "no_arithmetic",
                            reason="" if arithmetic else "no stated result and no a∘b=c among its numbers",
                        ),
                    )
                ),
            )
            if pre.decision and not pre.decision.kept:
                return []
        spec = self._specs[name]
        positions = await self.ctx.stage(str(tool_id), "positions", lambda: self._positions(document, tool, spec))
        per_position = await asyncio.gather(
            *(self._sample_calls(tool_id.position(p["char_offset"]), document, tool, spec) for p in positions.data["positions"]),
            return_exceptions=True,
        )
        candidates = [c for found in per_position if isinstance(found, list) for c in found]
        refused = next((e for e in per_position if isinstance(e, BaseException)), None)
        if refused is not None:  # the other positions' calls never run: they end with the refusal
            if not isinstance(refused, ServiceRefused):
                raise refused
            raise await self.ctx.drop_refused([c["item"] for c in candidates], "execute", refused)
        if not candidates:
            return []
        executed = await self._execute(document, candidates)
        return await self._filter(document, tool, executed)

    async def _positions(self, document: Document, tool: ToolSettings, spec: tool_executor_pb2.ToolSpec) -> StageResult:
        request = scorer_pb2.MarkerProbabilitiesRequest(
            prompt=spec.few_shot_prompt.replace("{text}", document.text),
            text=document.text,
            threshold=tool.position_threshold,
            top_k=tool.positions,
        )
        response = await self.ctx.call(
            lambda: self.ctx.services.scorer.MarkerProbabilities(request, timeout=CALL_TIMEOUT_SECONDS), "scorer (positions)"
        )
        positions = [{"char_offset": p.char_offset, "token_index": p.token_index, "probability": p.probability} for p in response.positions]
        return StageResult(
            {"tool": tool.tool, "positions": positions},
            Decision(
                True,
                score=len(positions),
                reason=f"{len(positions)} of {response.positions_considered} positions",
                model=response.model.model,
                template_version=spec.prompt_version,
            ),
        )

    async def _sample_calls(
        self,
        position: PositionId,
        document: Document,
        tool: ToolSettings,
        spec: tool_executor_pb2.ToolSpec,
    ) -> list[dict[str, Any]]:
        """The distinct well-formed calls sampled at one position (each stored as a candidate item)."""
        group, offset = str(position), position.char_offset
        stored = await self.ctx.stored(group, "sample_call")
        if stored is None:
            seed = derive_seed(self.ctx.seed, "calls", str(DocumentId(position.index)), tool.tool, offset)
            request = generator_pb2.GenerateRequest(
                prompt=common_pb2.Prompt(text=call_prompt(spec.few_shot_prompt, document.text, offset)),
                sampling=common_pb2.SamplingParams(
                    temperature=SAMPLING_TEMPERATURE,
                    max_tokens=MAX_CALL_TOKENS,
                    stop=["]", "->", "\n"],
                    grammar=call_grammar(tool.tool, spec.takes_input),
                ),
                n=tool.calls,
                seed=seed,
            )
            response = await self.ctx.call(
                lambda: self.ctx.services.generator.Generate(request, timeout=CALL_TIMEOUT_SECONDS), "generator (calls)"
            )
            seen: dict[str, int] = {}
            for number, sample in enumerate(response.samples):
                argument, why = parse_call(sample.text, tool.tool, spec.takes_input)
                candidate_id = str(position.call(number))
                decide = partial(Decision, model=response.model.model, template_version=spec.prompt_version, seed=sample.seed)
                data = {"tool": tool.tool, "char_offset": offset, "sample": sample.text, "input": argument}
                if argument is None:
                    decision = decide(False, "malformed_call", reason=why)
                elif argument in seen:
                    decision = decide(False, "repeated_call", reason=f"same call as c{seen[argument]:02d}")
                else:
                    seen[argument] = number
                    decision = decide(True)
                await self.ctx.record(candidate_id, "sample_call", StageResult(data, decision))
            # Marks the position done only after all its candidates are stored.
            await self.ctx.record(group, "sample_call", StageResult({"candidates": len(response.samples)}))
            stored = await self.ctx.stored(group, "sample_call")
        assert stored is not None
        call_ids = [str(position.call(number)) for number in range(stored.data["candidates"])]
        sampled = await self.ctx.stored_many(call_ids, "sample_call")
        return [
            {"item": call_id, **candidate.data}
            for call_id in call_ids
            if (candidate := sampled.get(call_id)) is not None and candidate.decision is not None and candidate.decision.kept
        ]

    async def _execute(self, document: Document, candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The candidates whose call ran and taught something, each with its result."""

        async def execute(batch: list[dict[str, Any]]) -> list[StageResult]:
            request = tool_executor_pb2.ExecuteToolsRequest(
                calls=[tool_executor_pb2.ToolCall(id=c["item"], tool=c["tool"], input=c["input"]) for c in batch],
                context=tool_executor_pb2.ToolContext(
                    reference_date=document.date or self._reference_date,
                    collection=self._collection if self.params.collection_documents else "",
                ),
            )
            response = await self.ctx.call(
                lambda: self.ctx.services.tool_executor.ExecuteTools(request, timeout=CALL_TIMEOUT_SECONDS), "tool-executor (execute)"
            )
            return [execution_outcome(candidate, result) for candidate, result in zip(batch, response.results, strict=True)]

        outcomes = await replay_batched(self.ctx, "execute", candidates, lambda c: c["item"], execute, batch_size=EXECUTE_BATCH)
        return [
            {**candidate, "result": outcome.data["result"]}
            for candidate, outcome in outcomes
            if outcome.decision is not None and outcome.decision.kept
        ]

    async def _filter(self, document: Document, tool: ToolSettings, executed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The executed candidates whose result lowered the loss by τf, as dicts for the dataset."""

        async def score(batch: list[dict[str, Any]]) -> list[StageResult]:
            request = scorer_pb2.FilterToolCallsRequest(
                text=document.text,
                threshold=tool.filter_threshold,
                placement=self.params.placement,
                candidates=[
                    scorer_pb2.CandidateCall(
                        id=c["item"],
                        char_offset=c["char_offset"],
                        call_without_result=render_call(c["tool"], c["input"]),
                        call_with_result=render_call(c["tool"], c["input"], c["result"]),
                    )
                    for c in batch
                ],
            )
            response = await self.ctx.call(
                lambda: self.ctx.services.scorer.FilterToolCalls(request, timeout=CALL_TIMEOUT_SECONDS), "scorer (filter)"
            )
            by_id = {decision.id: decision for decision in response.decisions}
            outcomes = [filter_outcome(by_id[c["item"]], tool.filter_threshold, response.model.model) for c in batch]
            # A call whose L⁻ − L⁺ lies within the review band of τf is held for a person.
            return [self.ctx.held(outcome, _score(outcome) - tool.filter_threshold, tool.filter_threshold) for outcome in outcomes]

        kept = []
        for candidate, verdict in await replay_batched(self.ctx, "filter", executed, lambda c: c["item"], score):
            assert verdict.decision is not None
            if verdict.decision.kept:
                kept.append(
                    {
                        "item": candidate["item"],
                        "tool": candidate["tool"],
                        "char_offset": candidate["char_offset"],
                        "call": render_call(candidate["tool"], candidate["input"], candidate["result"]),
                        "input": candidate["input"],
                        "result": candidate["result"],
                        "gain": verdict.decision.score,
                        "loss_plus": verdict.data["loss_plus"],
                        "loss_minus": verdict.data["loss_minus"],
                        "held": verdict.decision.filter == REVIEW_FILTER,
                    }
                )
        return kept


def _score(result: StageResult) -> float:
    assert result.decision is not None and result.decision.score is not None, "a filter decision always carries its gain"
    return result.decision.score


def execution_outcome(candidate: dict[str, Any], result: tool_executor_pb2.ToolResult) -> StageResult:
    """A candidate's decision at "execute": the tool's error, a trivial call, or kept with its result."""
    if result.HasField("error"):
        code = tool_executor_pb2.ToolErrorCode.Name(result.error.code).removeprefix("TOOL_ERROR_CODE_").lower()
        return StageResult({"result": None, "error": result.error.message}, Decision(False, f"tool_{code}", reason=result.error.message))
    if why := trivial_call(candidate["input"], result.output):
        return StageResult({"result": result.output}, Decision(False, "trivial_call", reason=why))
    return StageResult({"result": result.output}, Decision(True))


def filter_outcome(decision: scorer_pb2.ToolCallDecision, threshold: float, model: str) -> StageResult:
    """A candidate's decision at "filter", with the losses the scorer measured."""
    losses = {"loss_plus": decision.loss_with_result, "loss_no_call": decision.loss_without_call}
    if decision.HasField("loss_minus"):
        losses |= {"loss_minus": decision.loss_minus, "loss_without_result": decision.loss_without_result}
    # L⁻ − L⁺ when known; otherwise L(no call) − L⁺, an upper bound that was already below τf.
    gain = losses.get("loss_minus", decision.loss_without_call) - decision.loss_with_result
    reason = f"L⁻ − L⁺ = {gain:.3f} {'≥' if decision.keep else '<'} τf = {threshold:g}"
    if "loss_minus" not in losses:
        reason = f"L(no call) − L⁺ = {gain:.3f} < τf = {threshold:g}, so L⁻ − L⁺ is too"
    return StageResult(losses, Decision(decision.keep, "" if decision.keep else "loss_not_lowered", score=gain, reason=reason, model=model))


# --- export ---


def export_rows(records: list[Record]) -> dict[str, list[dict[str, Any]]]:
    """Documents with their calls spliced in (`text`, the training text) and every executed candidate call with its losses."""
    documents, calls = [], []
    for record in records:
        item_id = toolformer_id(record.item_id)
        if not isinstance(item_id, (DocumentId, CallId)):
            continue  # a (document, tool) item: lineage only
        if isinstance(item_id, DocumentId):
            if record.kept:
                documents.append(
                    {"item_id": record.item_id, **{k: record.data[k] for k in ("document_id", "text", "original_text", "calls")}}
                )
            continue
        if "result" not in record.data:
            continue  # never executed (malformed or repeated): lineage only
        dropped = next((d.filter for _, d in record.lineage if not d.kept), "")
        calls.append(
            {
                "item_id": record.item_id,
                "tool": record.data["tool"],
                "char_offset": record.data["char_offset"],
                "input": record.data["input"],
                "result": record.data["result"],
                **{k: record.data.get(k) for k in ("loss_plus", "loss_no_call", "loss_without_result", "loss_minus")},
                "kept": record.kept,
                "dropped_by": dropped,
            }
        )
    return {"documents": documents, "calls": calls}
