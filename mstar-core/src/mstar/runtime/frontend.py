"""The frontend: where a request enters and where its events come out.

It turns a request body into a `RequestPlan` (the model's `process_prompt`, or for a chat
its chat template and `process_chat`), checks it, hands its tensors to the transport and
submits it to the conductor; it receives the workers' outputs, runs the model's
`postprocess` into `mstar.events` (with core's incremental detokenizer in the lane's
`OutputState`), applies stop strings (a completion ends before the first one; once every
completion has, the request is cancelled on every rank) and finishes a request once the
conductor says it is complete and every output has arrived.

The in-process API calls `submit` directly (one frontend, address "frontend"). When served,
each data-worker process runs one (address "frontend:<k>"): requests arrive from the API
server's gateway as `ClientRequest` messages and their events go back as `ClientEvent`s, so
the model's code (tokenising, media decoding, detokenising) never runs in the API server.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from mstar import events
from mstar.chat import IncrementalDetokenizer, StopStrings, build_chat_prompt
from mstar.communication import messages as msg
from mstar.communication.channel import Channel
from mstar.communication.transport import Transport
from mstar.config.deployment import DeploymentConfig
from mstar.engine.kv_cache import capacity_tokens, pages_for_completions
from mstar.engine.rng import draw_seed
from mstar.errors import RequestError
from mstar.events import Sink
from mstar.model.contract import Model, OutputState, RequestPlan, token_list
from mstar.model.fields import decode_inputs, input_fields
from mstar.model.sampling import SamplingParams
from mstar.runtime.entry import Entry
from mstar.runtime.routing import prefix_key

if TYPE_CHECKING:
    from pydantic import BaseModel

    from mstar.media import MediaLimits

log = logging.getLogger(__name__)


#: Stop strings a request may give at most, and their longest length.
MAX_STOPS, MAX_STOP_CHARS = 16, 256
REQUEST_KINDS = ("generate", "completion", "chat", "transcription")


@dataclass
class _Live:
    sink: Sink
    params: dict[str, Any]
    prompt_tokens: int
    completions: int = 1
    stops: list[str] = field(default_factory=list)
    states: dict[int, OutputState] = field(default_factory=dict)
    stop_state: dict[int, StopStrings] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    completion_tokens: int = 0
    complete: msg.Complete | None = None
    stopped: bool = False  # every completion met a stop string: cancelled by us


def stop_strings(value: Any) -> list[str]:
    """The request's `stop` (a string or a list of strings), checked."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in stops)):
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOPS} "
                           f"non-empty strings of at most {MAX_STOP_CHARS} characters",
                           param="stop")
    return list(stops)


def tokenizer_vocab_size(tokenizer: Any) -> int | None:
    """How many token ids `tokenizer` knows (`len()`, else its `token_bytes()`), None when
    it does not say: ids at or past it cannot be biased (`logit_bias`)."""
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    if callable(getattr(tokenizer, "token_bytes", None)):
        return len(tokenizer.token_bytes())
    return None


class Frontend(Entry):
    def __init__(self, model: Model, config: DeploymentConfig, channel: Channel,
                 transport: Transport, *, client: str = "api",
                 media_limits: MediaLimits | None = None,
                 request_schema: type[BaseModel] | None = None):
        """`client`: the address that `ClientRequest`s come from and whose `ClientEvent`s
        this frontend sends (the API server's gateway); `media_limits`: what decoded media
        may be (pixels, duration); `request_schema`: the model's `/generate` request, whose
        media and tensor fields are decoded before `process_prompt`."""
        super().__init__(channel.address)
        self.client = client
        self.model = model
        self.input_fields = input_fields(request_schema)
        self.tokenizer = model.tokenizer()
        self.vocab_size = tokenizer_vocab_size(self.tokenizer)
        self.media_limits = media_limits
        self.config = config
        self.channel = channel
        self.transport = transport
        self._live: dict[str, _Live] = {}

    # -- admission --------------------------------------------------------------------------
    def plan(self, request: Mapping[str, Any], kind: str = "generate",
             blobs: Sequence[bytes] = ()) -> RequestPlan:
        """The model's plan for a request, checked; bad input raises RequestError. `kind`
        "chat": `request` holds normalised `messages` (see `mstar.chat.prompt`) whose media
        parts index `blobs`, plus sampling fields; "transcription": `blobs[0]` is an audio
        file, `request` the model's transcription fields (`Model.process_transcription`);
        "generate": its media and tensor fields (`mstar.model.fields`) are decoded, fetched
        ones from `blobs`."""
        if not isinstance(request, Mapping):
            raise RequestError("the request body must be a JSON object")
        if kind not in REQUEST_KINDS:
            raise RequestError(f"unknown request kind {kind!r}; kinds: {REQUEST_KINDS}")
        try:
            if kind == "chat":
                plan = self._plan_chat(request, blobs)
            elif kind == "transcription":
                plan = self._plan_transcription(request, blobs)
            else:
                plan = self.model.process_prompt(self._decoded(request, blobs))
            for site, params in plan.sampling.items():
                try:
                    params.validate()
                except ValueError as exc:
                    field = str(exc).split(" ", 1)[0].rstrip(":")
                    raise RequestError(f"sampling[{site}]: {exc}", param=field if field in
                                       SamplingParams.__struct_fields__ else None) from None
                if self.vocab_size is not None and any(
                        token >= self.vocab_size for token in params.logit_bias):
                    raise RequestError(f"logit_bias: token ids must be below the vocabulary "
                                       f"size {self.vocab_size}", param="logit_bias")
        except RequestError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise RequestError(str(exc), code=getattr(exc, "status", 400),
                               param=getattr(exc, "param", None)) from None
        if self.tokenizer is None and any(p.response_format is not None
                                          for p in plan.sampling.values()):
            raise RequestError("response_format needs a model with a tokenizer",
                               param="response_format")
        if plan.prompt_tokens > self.config.max_seq_len:
            detail = f" ({plan.prompt_detail})" if plan.prompt_detail else ""
            raise RequestError(f"prompt of {plan.prompt_tokens} tokens{detail} is longer than "
                               f"max_seq_len={self.config.max_seq_len}", param="prompt")
        for site, params in plan.sampling.items():
            if params.max_tokens is not None and params.max_tokens > self.config.max_seq_len:
                raise RequestError(f"sampling[{site}].max_tokens={params.max_tokens} is past "
                                   f"max_seq_len={self.config.max_seq_len}", param="max_tokens")
        self._check_kv_capacity(plan)
        return plan

    def _check_kv_capacity(self, plan: RequestPlan) -> None:
        """Refuse a request whose completions can never be in the KV cache together
        (`pages_for_completions`). Config validation made one max_seq_len sequence fit, so a
        single completion always does."""
        if "kv_cache" not in self.model.node_engine_types().values():
            return
        kv, max_seq_len = self.config.kv_cache, self.config.max_seq_len
        capacity = capacity_tokens(kv.num_pages, kv.page_size, max_seq_len,
                                   self.config.scheduler.max_num_seqs)
        for params in plan.sampling.values():
            if params.max_tokens is None or params.n == 1:
                continue
            pages = pages_for_completions(plan.prompt_tokens, params.max_tokens, params.n,
                                          max_seq_len=max_seq_len, page_size=kv.page_size)
            if pages * kv.page_size > capacity:
                configured = ("" if kv.num_pages is None
                              else f"kv_cache.num_pages={kv.num_pages} x ")
                raise RequestError(
                    f"n={params.n} completions of max_tokens={params.max_tokens} after a "
                    f"prompt of {plan.prompt_tokens} tokens need {pages * kv.page_size} "
                    f"tokens of KV cache ({pages} pages), more than its capacity of "
                    f"{capacity} tokens ({configured}page_size={kv.page_size}); lower "
                    "max_tokens or n", param="max_tokens")

    def _limits(self) -> MediaLimits:
        """What decoded media may be: the server's limits, else the defaults."""
        from mstar.media import MediaLimits

        return self.media_limits or MediaLimits()

    def _decoded(self, request: Mapping[str, Any], blobs: Sequence[bytes]
                 ) -> Mapping[str, Any]:
        if not self.input_fields:
            return request
        return decode_inputs(request, self.input_fields, blobs, self._limits())

    def _plan_chat(self, request: Mapping[str, Any], blobs: Sequence[bytes]) -> RequestPlan:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list", param="messages")
        prompt = build_chat_prompt(self.model, messages, blobs, self._limits(),
                                   template_kwargs=request.get("chat_template_kwargs"))
        fields = {k: v for k, v in request.items()
                  if k not in ("messages", "chat_template_kwargs")}
        return self.model.process_chat(prompt, fields)

    def _plan_transcription(self, request: Mapping[str, Any],
                            blobs: Sequence[bytes]) -> RequestPlan:
        """The audio file decoded at the model's input rate (what is no audio or holds no
        samples: a 400 naming `file`, the form field it came in; over the duration limit
        a 413), then `process_transcription`."""
        from mstar.media import MediaError, load_audio

        if len(blobs) != 1:
            raise RequestError(f"a transcription takes one audio file, got {len(blobs)}",
                               param="file")
        try:
            audio = load_audio(blobs[0], self._limits(),
                               sample_rate=self.model.audio_input_rate())
        except MediaError as exc:
            raise RequestError(f"file: {exc}", code=exc.status, param="file") from None
        return self.model.process_transcription(audio, request)

    def submit(self, request: Mapping[str, Any], sink: Sink, *,
               request_id: str | None = None, kind: str = "generate",
               blobs: Sequence[bytes] = ()) -> str:
        if isinstance(request, Mapping) and "stop" in request:
            stops = stop_strings(request["stop"])
            request = {k: v for k, v in request.items() if k != "stop"}
        else:
            stops = []
        plan = self.plan(request, kind, blobs)
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        with self._lock:
            self._claim(rid)
        seed = plan.seed if plan.seed is not None else draw_seed()
        info = msg.RequestInfo(rid, dict(plan.params), dict(plan.sampling), seed,
                               sorted(plan.first_walks), frontend=self.channel.address)
        first = {p: msg.walk_step_msg(step, lambda t: self.transport.put(t, rid))
                 for p, step in plan.first_walks.items()}
        completions = max((p.n for p in plan.sampling.values()), default=1)
        with self._lock:
            self._live[rid] = _Live(sink, dict(plan.params), plan.prompt_tokens, completions,
                                    stops)
        self.channel.send("conductor", msg.Submit(info, first, plan.prompt_tokens,
                                                  self.config.request_timeout,
                                                  self._prefix(plan)))
        return rid

    def _prefix(self, plan: RequestPlan) -> str | None:
        """The plan's prefix-affinity key for the conductor's replica choice (only where
        prefix caching could reuse the prompt's pages)."""
        kv = self.config.kv_cache
        if plan.prompt_ids is None or self.config.replicas == 1 or not kv.enable_prefix_caching:
            return None
        return prefix_key(plan.prompt_ids, kv.page_size)

    def cancel(self, request_id: str, reason: str = "abort") -> None:
        with self._lock:
            live = request_id in self._live
        if live:
            self.channel.send("conductor", msg.CancelRequest(request_id, reason))

    # -- messages -------------------------------------------------------------------------
    def handle(self, m: msg.Message) -> None:
        if isinstance(m, msg.ClientRequest):
            self._client_request(m)
        elif isinstance(m, msg.ClientCancel):
            self.cancel(m.request_id, m.reason)
        elif isinstance(m, msg.Shutdown):
            self.stop_soon()
        elif self._on_report(m):
            pass
        elif isinstance(m, msg.Outputs):
            for output in m.items:  # each alone, as if it were its own message
                try:
                    self._output(output)
                except Exception:
                    log.exception("%s failed on an output of %s", self.channel.address,
                                  output.request_id)
        elif isinstance(m, msg.Complete):
            with self._lock:
                live = self._live.get(m.request_id)
            if live is not None:
                live.complete = m
                self._maybe_finish(m.request_id, live)
        elif isinstance(m, msg.Rejected):
            kind = "rate_limit_error" if m.code == 429 else "service_unavailable"
            self._finish(m.request_id, events.Error(m.message, m.code, kind))

    def _client_request(self, m: msg.ClientRequest) -> None:
        """Submit a request from the gateway; its events (bad input included, as a 400
        `Error`) go back to the gateway."""
        def sink(event: events.Event) -> None:
            self.channel.send(self.client, msg.ClientEvent(m.request_id, events.encode(event)))

        try:
            self.submit(msgspec.json.decode(m.body_json), sink, request_id=m.request_id,
                        kind=m.kind, blobs=m.blobs)
        except RequestError as exc:
            sink(events.Error(str(exc), exc.code, "invalid_request_error"
                              if exc.code < 500 else "internal_error", exc.param))
        except Exception as exc:  # a bug (the model's code): this request fails, not us
            log.exception("%s: submitting %s failed", self.channel.address, m.request_id)
            sink(events.Error(f"internal error: {type(exc).__name__}: {exc}", 500))
        else:
            log.info("%s: %s submitted", self.channel.address, m.request_id)

    def _output(self, m: msg.Output) -> None:
        outputs: dict[str, Any] = dict(m.host)
        for name, handle in m.tensors.items():
            outputs[name] = self.transport.get(handle)
            self.transport.free(handle)
        with self._lock:
            live = self._live.get(m.request_id)
        if live is None:
            return
        live.received[m.worker] = live.received.get(m.worker, 0) + 1
        if "token_ids" in outputs:
            live.completion_tokens += len(token_list(outputs["token_ids"]))
        state = live.states.get(m.child)
        if state is None:
            state = live.states[m.child] = OutputState(
                m.request_id, live.params, m.child,
                detokenizer=IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None)
        try:
            for event in self.model.postprocess(outputs, state):
                if isinstance(event, events.TextDelta):
                    event = self._text(live, state, event)
                    if event is None:
                        continue
                live.sink(event)
        except Exception as exc:
            log.exception("postprocess failed for %s", m.request_id)
            self.cancel(m.request_id)
            self._finish(m.request_id, events.Error(f"postprocess: {exc}", 500))
            return
        self._maybe_finish(m.request_id, live)

    def _text(self, live: _Live, state: OutputState,
              event: events.TextDelta) -> events.TextDelta | None:
        """A text event after stop strings (None once its completion has stopped), with the
        text of its logprobs' tokens."""
        if event.logprobs and state.detokenizer is not None:
            text = state.detokenizer.token_text
            event = msgspec.structs.replace(event, logprobs=[
                msgspec.structs.replace(lp, token=text(lp.token_id),
                                        top_tokens=[text(i) for i, _ in lp.top])
                for lp in event.logprobs])
        if not live.stops:
            return event
        stops = live.stop_state.setdefault(event.index, StopStrings(live.stops))
        if stops.matched:
            return None
        event = msgspec.structs.replace(event, text=stops.push(event.text))
        if stops.matched and not live.stopped and sum(
                s.matched for s in live.stop_state.values()) == live.completions:
            live.stopped = True  # every completion is done: end the request everywhere
            self.channel.send("conductor", msg.CancelRequest(state.request_id, "abort"))
        return event

    def _maybe_finish(self, rid: str, live: _Live) -> None:
        done = live.complete
        if done is None:
            return
        if done.error is not None and not live.stopped:
            kind = "invalid_request_error" if done.code < 500 else "internal_error"
            self._finish(rid, events.Error(done.error, done.code, kind))
            return
        if any(live.received.get(w, 0) < n for w, n in done.outputs_expected.items()):
            return
        reasons = dict(done.reasons)
        for index, stops in sorted(live.stop_state.items()):
            held = stops.flush()
            if held:
                live.sink(events.TextDelta(text=held, token_ids=[], index=index))
            if stops.matched:
                reasons[index] = "stop"
        reason = "stop" if live.stopped else done.reason
        if live.completions > 1 or reasons:
            # a lane with no reason of its own ended normally, unless the request was cut
            natural = "stop" if live.stopped or done.reason in ("stop", "length") \
                else done.reason
            reasons = {i: reasons.get(i, natural) for i in range(live.completions)}
        usage = events.Usage(live.prompt_tokens, live.completion_tokens)
        self._finish(rid, events.Finished(reason, usage, reasons=reasons))

    def _finish(self, rid: str, event: events.Event) -> None:
        with self._lock:
            live = self._live.pop(rid, None)
        if live is None:
            return
        self.transport.free_request(rid)
        live.sink(event)
