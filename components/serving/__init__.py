"""Online serving: a FastAPI app answering recommendations from the registry's champion, storing feedback.

The pieces are independent so each can be replaced: an ``EngineSource`` says which model version is the
champion and loads it, a ``ModelHolder`` swaps engines in the background, a ``FeedbackStore`` persists
feedback, and ``create_app`` wires them behind HTTP. All state lives in the registry and the feedback
store, so any number of workers or instances can serve side by side.
"""
