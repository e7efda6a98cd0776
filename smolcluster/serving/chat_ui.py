"""The chat page (Gradio Blocks): streamed answers, sampling controls, a stop button, timings.

Each browser session is one user of the sessions' fair queue (its Gradio
``session_hash``). The answer streams into the chat as the pipeline makes it; Stop
cancels the session's request in the pipeline (every stage frees its KV cache) and
the answer ends with what was made so far; with LoRA adapters served, a menu picks the base
model or an adapter. The conversation is turned into a prompt
by :mod:`smolcluster.serving.prompting` as the API does (the model's chat template, or a
transcript), oldest turns left out when it does not fit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import gradio as gr

from smolcluster.inference.adapters import adapter_of, model_ids
from smolcluster.serving.fair_queue import QueueFull
from smolcluster.serving.prompting import (
    PromptTooLong,
    build_chat_prompt,
    message_text,
    prompt_budget,
)
from smolcluster.serving.sessions import ChatDefaults, Generation, PipelineDown, Sessions, Settings


def stats_line(gen: Generation, note: str = "") -> str:
    s = gen.stats()
    parts = [f"{s['tokens']} tokens"]
    if s["tokens_per_s"] is not None and s["tokens"]:
        parts.append(f"{s['tokens_per_s']:g} tokens/s")
    if s["ttft_ms"] is not None:
        queued = f" ({s['queue_ms']:.0f} ms queued)" if s["queue_ms"] >= 1 else ""
        parts.append(f"first token after {s['ttft_ms']:.0f} ms{queued}")
    if gen.finish_reason is not None:
        parts.append(f"finished: {gen.finish_reason}")
    if gen.error is not None:
        parts.append(f"error: {gen.error}")
    return " · ".join(parts) + note


def conversation(history: list[dict], system: str, message: str) -> list[tuple[str, str]]:
    """(role, text) messages from the chat so far (Gradio's message dicts), the system prompt and the new message."""
    msgs = [("system", system)] if system and system.strip() else []
    for m in history:
        if m.get("role") in ("user", "assistant"):
            msgs.append((m["role"], message_text(m.get("content"))))
    msgs.append(("user", message))
    return msgs


def stream_answer(gen: Generation, history: list[dict], note: str) -> Iterator[tuple]:
    """(history, "", status) each time the answer grows or its place in the queue moves; the answer is the
    history's last message."""
    yield history, "", f"queued: {gen.position()} ahead" if gen.state == "queued" else "…"
    try:
        for piece in gen.stream(poll_s=0.5):
            if piece is None:
                if gen.state == "queued":
                    yield history, "", f"queued: {gen.position()} ahead"
                continue
            history[-1] = {"role": "assistant", "content": gen.text}
            yield history, "", stats_line(gen, note)
        history[-1] = {"role": "assistant", "content": gen.text}
        yield history, "", stats_line(gen, note)
    finally:
        gen.cancel()  # the page went away mid-answer: free the pipeline's caches


def build_chat_ui(sessions: Sessions, defaults: ChatDefaults, model_name: str) -> gr.Blocks:
    context = sessions.context

    def respond(message: str, history: list[dict], system: str, temperature: float, top_p: float,
                max_new_tokens: float, model: str | None = None, request: gr.Request = None) -> Iterator[tuple]:
        history = list(history or [])
        if not message or not message.strip():
            yield history, message, "Type a message first."
            return
        user = f"ui:{request.session_hash if request is not None else 'anonymous'}"
        max_new = int(max_new_tokens)
        fmt = sessions.chat_format
        adapter = adapter_of(model or model_name, model_name, sessions.adapters)
        if adapter is None:
            yield history, message, f"**error:** this server does not serve the model {model!r}"
            return
        try:
            prompt = build_chat_prompt(conversation(history, system, message), fmt, prompt_budget(context, max_new))
            gen = sessions.submit(prompt.ids, user=user, settings=Settings.for_chat(
                fmt, max_new_tokens=max_new, stop_at_eos=defaults.stop_at_eos, adapter=adapter,
                sampling=replace(defaults.sampling, temperature=float(temperature), top_p=float(top_p))))
        except (PromptTooLong, PipelineDown, QueueFull, ValueError) as e:  # ValueError: the template refused
            yield history, message, f"**error:** {e}"
            return
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        note = f" · {prompt.dropped} oldest messages left out to fit the context" if prompt.dropped else ""
        yield from stream_answer(gen, history, note)

    def stop(request: gr.Request) -> None:
        if request is not None:
            sessions.cancel_user(f"ui:{request.session_hash}")

    def clear_chat(request: gr.Request) -> tuple:
        stop(request)
        return [], "", ""

    with gr.Blocks(title=f"smolcluster chat: {model_name}") as demo:
        rendering = "its chat template" if sessions.chat_template is not None else "a User:/Assistant: transcript"
        replicas = f" x {len(sessions.replicas)} replicas" if len(sessions.replicas) > 1 else ""
        gr.Markdown(f"### smolcluster chat · `{model_name}` · {sessions.stages} pipeline stages{replicas} · "
                    f"context {context} tokens · {rendering}")
        chatbot = gr.Chatbot(elem_id="chatbot", height=420, show_label=False, feedback_options=None)
        with gr.Row():
            box = gr.Textbox(elem_id="prompt", placeholder="Say something (Enter sends)", show_label=False,
                             lines=1, max_lines=8, scale=8)
            send = gr.Button("Send", elem_id="send", variant="primary", scale=1, min_width=80)
            stop_btn = gr.Button("Stop", elem_id="stop", variant="stop", scale=1, min_width=80)
        stats = gr.Markdown(elem_id="stats")
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox(label="System prompt", value=defaults.system_prompt, lines=2)
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=defaults.sampling.temperature, step=0.05,
                                        label="Temperature (0 = greedy)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=defaults.sampling.top_p, step=0.05, label="Top-p", elem_id="top_p")
                max_new = gr.Slider(1, context, value=min(defaults.max_new_tokens, context), step=1,
                                    label="Max new tokens", elem_id="max_new_tokens")
            # LoRA adapters (adapters=): the base model or BASE:NAME, as the API names them
            models = model_ids(model_name, sessions.adapters)
            model = gr.Dropdown(models, value=model_name, label="Model (base or LoRA adapter)", elem_id="model",
                                visible=len(models) > 1)
            clear = gr.Button("Clear the conversation", elem_id="clear")

        inputs = [box, chatbot, system, temperature, top_p, max_new, model]
        outputs = [chatbot, box, stats]
        # Gradio's own queue would run one answer at a time; the sessions' fair queue decides instead.
        for trigger in (box.submit, send.click):
            trigger(respond, inputs, outputs, concurrency_limit=None, show_progress="hidden")
        stop_btn.click(stop, None, None, queue=False)
        clear.click(clear_chat, None, [chatbot, box, stats], queue=False)
    return demo
