"""An OpenAI-compatible server where every request picks its own delta, and all of them decode in one batch.

``settings`` (limits), ``schemas`` (OpenAI's JSON in and out), ``registry`` (served deltas and where they
may come from), ``prompts`` (text and chat messages to ids), ``text`` (ids to streamed text, stop strings),
``scheduler`` (the continuous-batching decode loop), ``service`` (requests to sequences), ``app`` (the HTTP
routes), ``server`` (assembly and uvicorn).
"""
