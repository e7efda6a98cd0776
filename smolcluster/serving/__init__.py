"""Serving an inference pipeline to people and programs: ``python -m smolcluster.chat``.

- ``sessions``: every user's answers multiplexed onto one pipeline (or replicas, ``router`` picking one); each
  answer a :class:`Generation` (stream, cancel, timings); a lost pipeline answers :class:`PipelineDown` at once
  and is rebuilt in the background.
- ``fair_queue``: at most N answers in the pipeline, the rest served round-robin over users.
- ``prompting``: a conversation -> prompt ids cut to the context (the model's chat template, else a
  ``User:/Assistant:`` transcript), for the page and the API alike; ``stops``: stop strings on a stream.
- ``openai_schema``: the API's bodies as pydantic models (what is validated, returned and in /openapi.json);
  ``openai_requests`` / ``openai_api``: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.
- ``chat_ui``: the Gradio page; ``app``: both on one FastAPI app, and the server; ``config``: from Hydra.
"""
