"""A small admin client for one vLLM server: health, models, LoRA load/unload, completions.

Every failure becomes a VllmError whose message says what went wrong in the operator's terms
(which server, which adapter, what to do), never a raw traceback or an HTTP dump.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

CONNECT_TIMEOUT_SECONDS = 5.0
REQUEST_TIMEOUT_SECONDS = 120.0
# Loading an adapter reads and checks its weights on the server; allow more than a request.
LOAD_TIMEOUT_SECONDS = 300.0

_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class VllmError(Exception):
    """A vLLM call failed; ``kind`` tells callers which case it was (for decisions and tests).

    kinds: unreachable, unauthorized, unknown_adapter, already_loaded, bad_adapter,
    bad_request, server, protocol, not_served (the API proxy answered, not vLLM).
    """

    def __init__(self, kind: str, message: str, *, status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


@dataclass(frozen=True)
class ModelCard:
    id: str
    root: str
    parent: str | None

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


@dataclass(frozen=True)
class Completion:
    """A greedy answer: its text and, when asked for, each token with its logprob."""

    text: str
    tokens: tuple[str, ...] = ()
    logprobs: tuple[float, ...] = ()
    completion_tokens: int = 0
    finish_reason: str | None = None


@dataclass(frozen=True)
class LoraActivity:
    """The newest ``vllm:lora_requests_info`` sample: adapters with running/waiting requests,
    and per adapter the time (server clock, epoch seconds) of the newest engine step that had
    one of its requests running or waiting, which a poll can miss when requests are short."""

    running: frozenset[str] = field(default_factory=frozenset)
    waiting: frozenset[str] = field(default_factory=frozenset)
    last_seen: Mapping[str, float] = field(default_factory=dict)

    def busy(self, name: str) -> bool:
        return name in self.running or name in self.waiting


def _error_text(response: httpx.Response) -> str:
    """vLLM's own message from either error shape it uses ({"error": {...}} or flat)."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text.strip()[:300]
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner.get("detail") or inner)
        if isinstance(inner, str):
            return inner
        if "detail" in body:
            return str(body["detail"])
    return str(body)[:300]


def parse_lora_activity(metrics_text: str) -> LoraActivity:
    """Read ``vllm:lora_requests_info`` from a /metrics page.

    The gauge carries the adapter lists in labels and the time of the engine step that saw
    them as its value; a Prometheus client keeps every label set it has seen, so the newest
    sample is the one with the largest value, not the last line, and the largest value of
    any label set naming an adapter is the last time that adapter had work.
    """
    newest: tuple[float, dict[str, str]] | None = None
    last_seen: dict[str, float] = {}

    def names(labels: dict[str, str], key: str) -> frozenset[str]:
        return frozenset(n for n in labels.get(key, "").split(",") if n)

    for line in metrics_text.splitlines():
        if not line.startswith("vllm:lora_requests_info{"):
            continue
        labels_text, _, rest = line.partition("}")
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        labels = dict(_LABEL_RE.findall(labels_text))
        if newest is None or value >= newest[0]:
            newest = (value, labels)
        for name in names(labels, "running_lora_adapters") | names(labels,
                                                                   "waiting_lora_adapters"):
            last_seen[name] = max(value, last_seen.get(name, value))
    if newest is None:
        return LoraActivity()
    return LoraActivity(names(newest[1], "running_lora_adapters"),
                        names(newest[1], "waiting_lora_adapters"), last_seen)


class VllmClient:
    """One vLLM server at ``base_url`` (e.g. http://127.0.0.1:8011), with its API key."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
    ):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_SECONDS),
            trust_env=False,  # never through a proxy: this is an admin API
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VllmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport and error mapping -------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        adapter: str | None = None,
        lora_path: str | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        try:
            response = self._http.request(
                method, path, json=body, timeout=timeout or httpx.USE_CLIENT_DEFAULT
            )
        except httpx.ConnectError as exc:
            raise VllmError("unreachable", (
                f"cannot reach vLLM at {self.base_url} ({_reason(exc)}); is the server running "
                "(`python -m serving local status --stack local`) and is --endpoint right?"
            )) from None
        except httpx.TimeoutException:
            raise VllmError("unreachable", (
                f"vLLM at {self.base_url} did not answer {method} {path} in time"
            )) from None
        except httpx.HTTPError as exc:
            raise VllmError("unreachable", f"vLLM at {self.base_url}: {exc}") from None
        if response.is_success:
            return response
        raise self._map_error(response, path, adapter=adapter, lora_path=lora_path)

    def _map_error(
        self, response: httpx.Response, path: str, *, adapter: str | None, lora_path: str | None
    ) -> VllmError:
        status, text = response.status_code, _error_text(response)
        low = text.lower()
        if status == 401:
            return VllmError("unauthorized", (
                f"vLLM at {self.base_url} refused the API key (401); the key from the stack's "
                "apiKey/apiKeyRef is not the one the server was started with"
            ), status=status)
        if status == 403 and "not served on this port" in low:
            # The API proxy (serving.render.proxy) answered, not vLLM: the tools belong on
            # vLLM's own loopback port, which is their default endpoint.
            return VllmError("not_served", (
                f"{self.base_url} is the API proxy, which serves no adapter administration; "
                "drop --endpoint to reach vLLM on the host's loopback"
            ), status=status)
        if path.endswith("/load_lora_adapter"):
            if "already" in low and "loaded" in low:
                return VllmError("already_loaded", (
                    f"adapter {adapter!r} is already loaded; use `adapters hotfix` to replace "
                    f"its weights (vLLM: {text})"
                ), status=status)
            if status == 404 or "no adapter found" in low or "does not exist" in low:
                return VllmError("bad_adapter", (
                    f"vLLM cannot load adapter {adapter!r} from {lora_path}: no adapter found "
                    f"there (vLLM: {text})"
                ), status=status)
            if status < 500:
                return VllmError("bad_adapter", (
                    f"vLLM refused adapter {adapter!r} from {lora_path} ({status}): {text}"
                ), status=status)
        if path.endswith("/unload_lora_adapter") and (status == 404 or "not found" in low
                                                      or "cannot be found" in low):
            return VllmError("unknown_adapter", (
                f"adapter {adapter!r} is not loaded on {self.base_url} (vLLM: {text})"
            ), status=status)
        if status == 404 and adapter:
            return VllmError("unknown_adapter", (
                f"model/adapter {adapter!r} is not served by {self.base_url} (404: {text})"
            ), status=status)
        if status == 404:
            return VllmError("protocol", (
                f"{self.base_url}{path} does not exist (404); is this a vLLM server with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true?"
            ), status=status)
        if status < 500:
            return VllmError("bad_request", f"vLLM rejected {path} ({status}): {text}",
                             status=status)
        return VllmError("server", f"vLLM failed on {path} ({status}): {text}", status=status)

    # --- read-only --------------------------------------------------------------------------

    def health(self) -> bool:
        """True when /health answers 200 (no API key needed); False when it cannot be reached."""
        try:
            return self._http.get("/health", timeout=CONNECT_TIMEOUT_SECONDS).status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[ModelCard]:
        data = self._request("GET", "/v1/models").json()
        try:
            return [
                ModelCard(str(m["id"]), str(m.get("root") or ""), m.get("parent"))
                for m in data["data"]
            ]
        except (KeyError, TypeError) as exc:
            raise VllmError("protocol", f"unexpected /v1/models answer: {exc}") from None

    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> the path vLLM loaded it from."""
        return {m.id: m.root for m in self.models() if m.is_adapter}

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    def lora_activity(self) -> LoraActivity:
        return parse_lora_activity(self.metrics())

    # --- LoRA admin ---------------------------------------------------------------------------

    def load(self, name: str, path: str, *, inplace: bool = False) -> None:
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        self._request(
            "POST", "/v1/load_lora_adapter", body=body, adapter=name, lora_path=path,
            timeout=LOAD_TIMEOUT_SECONDS,
        )

    def unload(self, name: str) -> None:
        self._request("POST", "/v1/unload_lora_adapter", body={"lora_name": name}, adapter=name)

    # --- completions ------------------------------------------------------------------------

    def complete(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        logprobs: int | None = None,
        ignore_eos: bool = False,
    ) -> Completion:
        body: dict[str, Any] = {
            "model": model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if logprobs is not None:
            body["logprobs"] = logprobs
        if ignore_eos:
            body["ignore_eos"] = True  # vLLM extension: fixed-length answers for benchmarks
        data = self._request("POST", "/v1/completions", body=body, adapter=model).json()
        try:
            choice = data["choices"][0]
            lp = choice.get("logprobs") or {}
            return Completion(
                text=str(choice["text"]),
                tokens=tuple(lp.get("tokens") or ()),
                logprobs=tuple(float(x) for x in (lp.get("token_logprobs") or ())),
                completion_tokens=int((data.get("usage") or {}).get("completion_tokens", 0)),
                finish_reason=choice.get("finish_reason"),
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise VllmError("protocol", f"unexpected /v1/completions answer: {exc}") from None

    def score(self, model: str, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Teacher-forced scoring: each text's tokens with their logprobs given the text before
        them (``echo`` + ``logprobs``, one generated token that callers drop). The raw
        choices; ``serving.adapters.answer.parse_scores`` reads them."""
        body: dict[str, Any] = {
            "model": model, "prompt": list(texts), "max_tokens": 1, "temperature": 0.0,
            "echo": True, "logprobs": 1,
        }
        data = self._request("POST", "/v1/completions", body=body, adapter=model).json()
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list):
            raise VllmError("protocol", "unexpected /v1/completions answer: no choices")
        return choices

    def stream(
        self, model: str, prompt: str, *, max_tokens: int, temperature: float = 0.0,
        ignore_eos: bool = False,
    ) -> Iterator[str]:
        """Yield text pieces of a streamed completion; errors as VllmError, also mid-stream."""
        for event in self._events(model, prompt, max_tokens=max_tokens,
                                  temperature=temperature, ignore_eos=ignore_eos):
            for choice in event.get("choices", []):
                if choice.get("text"):
                    yield str(choice["text"])

    def stream_tokens(
        self, model: str, prompt: str, *, max_tokens: int, ignore_eos: bool = False,
    ) -> int:
        """Stream a completion to its end and return how many tokens were generated (from
        the usage vLLM sends last): a count that holds even where tokens decode to no text."""
        tokens = 0
        for event in self._events(model, prompt, max_tokens=max_tokens, temperature=0.0,
                                  ignore_eos=ignore_eos, usage=True):
            usage = event.get("usage") or {}
            tokens = max(tokens, int(usage.get("completion_tokens") or 0))
        if tokens <= 0:
            raise VllmError("protocol", f"stream from {model!r} reported no generated tokens")
        return tokens

    def _events(
        self, model: str, prompt: str, *, max_tokens: int, temperature: float,
        ignore_eos: bool, usage: bool = False,
    ) -> Iterator[dict[str, Any]]:
        body: dict[str, Any] = {
            "model": model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": temperature, "stream": True,
        }
        if ignore_eos:
            body["ignore_eos"] = True
        if usage:
            body["stream_options"] = {"include_usage": True}
        try:
            with self._http.stream("POST", "/v1/completions", json=body) as response:
                if not response.is_success:
                    response.read()
                    raise self._map_error(response, "/v1/completions", adapter=model,
                                          lora_path=None)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[len("data:"):].strip()
                    if payload == "[DONE]":
                        return
                    event = json.loads(payload)
                    if "error" in event:  # vLLM reports failures inside the stream
                        raise VllmError("server", f"stream from {model!r} failed: "
                                        f"{_error_text(httpx.Response(500, json=event))}")
                    yield event
        except httpx.ConnectError as exc:
            raise VllmError("unreachable", (
                f"cannot reach vLLM at {self.base_url} ({_reason(exc)})"
            )) from None
        except httpx.HTTPError as exc:
            raise VllmError("unreachable", f"stream from {self.base_url} broke: {exc}") from None
        raise VllmError("protocol", f"stream from {model!r} ended without [DONE]")


def _reason(exc: Exception) -> str:
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    return text or type(exc).__name__
