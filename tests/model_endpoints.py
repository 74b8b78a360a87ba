"""Scripted model endpoints for running the real agent CLIs without a real model.

One local HTTP server speaks the three wire protocols the agent CLIs use, each
streaming as the vendor's API does:

* Anthropic Messages API (``POST /v1/messages``, server-sent events), for claude;
* OpenAI Responses API (``POST /v1/responses``, server-sent events), for codex;
* Gemini API (``POST /v1beta/models/<model>:streamGenerateContent``), for gemini.

Whatever the CLI, the scripted model plays the same investigation: first it has
the CLI run ``env | sort`` through its shell tool (so the agent's environment
comes back in the next request, as a tool result), then it has the CLI write
``/home/agent/output/investigation.md`` (REPORT below), then it ends its turn.
Which step comes next is read from the conversation the CLI sends (how many
tool results it holds), not counted per request, so side requests a CLI makes
(titles, routing, token counts) get a short plain answer and do not disturb the
script. Every request is recorded with its headers and body.

Run alone for manual checks: ``python3 tests/model_endpoints.py [PORT]``.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPORT_PATH = "/home/agent/output/investigation.md"
ROOT_CAUSE = "The payments container exhausts its 64Mi memory limit while warming its cache"
REPORT = f"""# Investigation

## Summary
The payments pod restarts in a loop because it is killed for using too much memory.

## Root Cause
{ROOT_CAUSE}.

**Confidence:** High

## Evidence
- `kubectl describe pod` shows OOMKilled with exit code 137 on every restart.

## Recommendations
1. Raise the memory limit of the payments container to 256Mi.
"""
SHELL_COMMAND = "env | sort"
FINAL_TEXT = "The report is in output/investigation.md."


def write_command(path: str) -> str:
    """A shell command that writes REPORT, for CLIs whose only way to write is the shell."""
    return f"cat > {path} <<'NIGHTCRIER_EOF'\n{REPORT}NIGHTCRIER_EOF"


@dataclass
class Recorded:
    """One request as the endpoint received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None

    @property
    def text(self) -> str:
        """The whole body as text, for searching the prompt and tool results in it."""
        return json.dumps(self.body) if not isinstance(self.body, str) else self.body


@dataclass
class ScriptedModel:
    """A threaded HTTP server on 127.0.0.1 playing the scripted investigation.

    ``requests`` grows as requests arrive (appends are atomic); ``steps`` lists
    which step each agent-loop answer played. Start with :meth:`start`, stop with
    :meth:`stop`; both are called from the test thread.
    """

    host: str = "127.0.0.1"
    port: int = 0
    report_path: str = REPORT_PATH
    requests: list[Recorded] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ScriptedModel:
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _record(self) -> Recorded:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                rec = Recorded(self.command, self.path, dict(self.headers.items()), body)
                model.requests.append(rec)
                return rec

            def do_GET(self) -> None:
                self._record()
                path = self.path.split("?")[0]
                if path.endswith("/models"):
                    self._json(200, {"object": "list", "data": [], "models": []})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_HEAD(self) -> None:
                self._record()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                rec = self._record()
                path = self.path.split("?")[0]
                body = rec.body if isinstance(rec.body, dict) else {}
                if path.endswith("/messages/count_tokens"):
                    self._json(200, {"input_tokens": 100})
                elif path.endswith("/messages"):
                    self._sse(model.anthropic_events(body))
                elif path.endswith("/responses"):
                    self._sse(model.openai_events(body))
                elif ":streamGenerateContent" in path:
                    self._sse(model.gemini_events(body))
                elif ":generateContent" in path:
                    self._json(200, model.gemini_side_answer(body))
                elif ":countTokens" in path:
                    self._json(200, {"totalTokens": 100})
                else:
                    self._json(404, {"error": {"message": f"no scripted answer for {path}"}})

            def _json(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _sse(self, events: list[tuple[str | None, Any]]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for name, payload in events:
                    chunk = (f"event: {name}\n" if name else "") + f"data: {json.dumps(payload)}\n\n"
                    self.wfile.write(chunk.encode())
                    self.wfile.flush()
                self.close_connection = True

        self._server = _QuietServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- what the CLIs sent --------------------------------------------------------------------

    def agent_requests(self) -> list[Recorded]:
        """The requests of the agent loop (those that offered tools), in order."""
        return [r for r in self.requests if isinstance(r.body, dict) and r.body.get("tools")]

    def next_step(self, tool_results: int) -> str:
        step = ("shell", "write", "final")[min(tool_results, 2)]
        self.steps.append(step)
        return step

    # -- Anthropic Messages API ----------------------------------------------------------------

    def anthropic_events(self, body: dict[str, Any]) -> list[tuple[str | None, Any]]:
        tools = {t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
        results = sum(1 for m in body.get("messages") or [] if isinstance(m.get("content"), list)
                      for block in m["content"] if isinstance(block, dict)
                      and block.get("type") == "tool_result")
        if not {"Bash", "Write"} <= tools:
            return _anthropic_message(body, [("text", "ok")], "end_turn")
        step = self.next_step(results)
        if step == "shell":
            blocks = [("tool_use", ("Bash", {"command": SHELL_COMMAND, "description": "Show environment"}))]
            return _anthropic_message(body, blocks, "tool_use")
        if step == "write":
            blocks = [("tool_use", ("Write", {"file_path": self.report_path, "content": REPORT}))]
            return _anthropic_message(body, blocks, "tool_use")
        return _anthropic_message(body, [("text", FINAL_TEXT)], "end_turn")

    # -- OpenAI Responses API ------------------------------------------------------------------

    def openai_events(self, body: dict[str, Any]) -> list[tuple[str | None, Any]]:
        items = body.get("input") or []
        results = sum(1 for item in items if isinstance(item, dict)
                      and item.get("type") in ("function_call_output", "custom_tool_call_output",
                                               "local_shell_call_output"))
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        shell = _openai_shell_tool(tools)
        if shell is None:
            return _openai_response(body, [_openai_message("ok")])
        step = self.next_step(results)
        if step == "final":
            return _openai_response(body, [_openai_message(FINAL_TEXT)])
        command = SHELL_COMMAND if step == "shell" else write_command(self.report_path)
        return _openai_response(body, [_openai_call(shell, command)])

    # -- Gemini API ----------------------------------------------------------------------------

    def gemini_events(self, body: dict[str, Any]) -> list[tuple[str | None, Any]]:
        declared = {d.get("name") for t in body.get("tools") or [] if isinstance(t, dict)
                    for d in t.get("functionDeclarations") or [] if isinstance(d, dict)}
        results = sum(1 for c in body.get("contents") or [] if isinstance(c, dict)
                      for part in c.get("parts") or [] if isinstance(part, dict)
                      and "functionResponse" in part)
        if not {"run_shell_command", "write_file"} <= declared:
            return [(None, _gemini_chunk([{"text": "ok"}]))]
        step = self.next_step(results)
        if step == "shell":
            shell_args = {"command": SHELL_COMMAND, "description": "Show environment"}
            parts = [{"functionCall": {"name": "run_shell_command", "args": shell_args}}]
        elif step == "write":
            parts = [{"functionCall": {"name": "write_file",
                                       "args": {"file_path": self.report_path, "content": REPORT}}}]
        else:
            parts = [{"text": FINAL_TEXT}]
        return [(None, _gemini_chunk(parts))]

    def gemini_side_answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """Non-streaming calls (routing, next-speaker checks): a short JSON-friendly answer."""
        config = body.get("generationConfig") or body.get("generation_config") or {}
        if "json" in str(config.get("responseMimeType") or config.get("response_mime_type") or ""):
            text = json.dumps({"reasoning": "scripted", "next_speaker": "user", "model_choice": "pro"})
        else:
            text = "ok"
        return _gemini_chunk([{"text": text}])


class _QuietServer(ThreadingHTTPServer):
    """Drops connections the client gave up on (codex probes for a WebSocket first) silently."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


# -- wire formats -----------------------------------------------------------------------------

def _anthropic_message(body: dict[str, Any], blocks: list[tuple[str, Any]],
                       stop_reason: str) -> list[tuple[str | None, Any]]:
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    usage = {"input_tokens": 100, "output_tokens": 0}
    events: list[tuple[str | None, Any]] = [("message_start", {"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": body.get("model", "scripted"),
        "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}})]
    for index, (kind, value) in enumerate(blocks):
        if kind == "text":
            start = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": value}
        else:
            name, arguments = value
            start = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(arguments)}
        events += [("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": start}),
                   ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}),
                   ("content_block_stop", {"type": "content_block_stop", "index": index})]
    events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason,
                                                                     "stop_sequence": None},
                                  "usage": {"output_tokens": 50}}),
               ("message_stop", {"type": "message_stop"})]
    return events


def _openai_shell_tool(tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    by_name = {t.get("name") or t.get("type"): t for t in tools}
    for name in ("shell_command", "shell", "exec_command", "local_shell"):
        if name in by_name:
            return by_name[name]
    return None


def _openai_call(tool: dict[str, Any], command: str) -> dict[str, Any]:
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    name = tool.get("name") or tool.get("type")
    if name == "local_shell":
        return {"type": "local_shell_call", "id": f"lsh_{uuid.uuid4().hex[:20]}", "call_id": call_id,
                "status": "completed", "action": {"type": "exec", "command": ["bash", "-c", command]}}
    if name == "shell":
        arguments: dict[str, Any] = {"command": ["bash", "-c", command]}
    elif name == "exec_command":
        arguments = {"cmd": command}
    else:
        arguments = {"command": command}
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:20]}", "call_id": call_id,
            "name": name, "arguments": json.dumps(arguments), "status": "completed"}


def _openai_message(text: str) -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex[:20]}", "role": "assistant",
            "status": "completed", "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _openai_response(body: dict[str, Any], items: list[dict[str, Any]]) -> list[tuple[str | None, Any]]:
    response_id = f"resp_{uuid.uuid4().hex[:24]}"
    base = {"id": response_id, "object": "response", "created_at": 0, "model": body.get("model", "scripted"),
            "status": "in_progress", "output": []}
    events: list[tuple[str | None, Any]] = [
        ("response.created", {"type": "response.created", "sequence_number": 0, "response": base})]
    for index, item in enumerate(items):
        events += [("response.output_item.added", {"type": "response.output_item.added",
                                                   "output_index": index, "item": item}),
                   ("response.output_item.done", {"type": "response.output_item.done",
                                                  "output_index": index, "item": item})]
    done = dict(base, status="completed", output=items,
                usage={"input_tokens": 100, "input_tokens_details": {"cached_tokens": 0},
                       "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 0},
                       "total_tokens": 150})
    events.append(("response.completed", {"type": "response.completed", "response": done}))
    for number, (_, payload) in enumerate(events):
        payload["sequence_number"] = number
    return events


def _gemini_chunk(parts: list[dict[str, Any]]) -> dict[str, Any]:
    candidate = {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
    return {"candidates": [candidate],
            "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 50, "totalTokenCount": 150},
            "modelVersion": "scripted"}


if __name__ == "__main__":
    server = ScriptedModel(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0).start()
    print(server.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()
